"""GRPO, DPO and KTO: the options they add to the shared ones (TRL names).

The rest is shared on purpose: GRPO samples with PPO's --max_new_tokens, --temperature,
--top_p and --top_k and is scored by the same --reward_fn / --reward_model /
--judge_url; all three train with the optimisation and LoRA options of SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from simtune.config import checks


@dataclass
class PreferenceArgs:
    """GRPO, DPO and KTO: the options they add to the shared ones (TRL names)."""

    cli_group: ClassVar[str] = "GRPO, DPO and KTO options"
    doc_section: ClassVar[str] = "GRPO, DPO and KTO (TRL names)"

    num_generations: int = 4
    """GRPO: answers sampled per prompt; each answer's advantage is its reward relative
    to the others of its group. The batch (per_device_train_batch_size x
    gradient_accumulation_steps x processes) must be a multiple of it; at least 2."""

    beta: float | None = None
    """GRPO, DPO, KTO: weight of the KL term that keeps the policy near the reference
    (the base model with the LoRA adapter disabled). None: TRL's default for the mode
    (GRPO 0.0: no reference model at all; DPO and KTO 0.1). Online PPO's is --kl_coef."""

    desirable_threshold: float | None = None
    """KTO: a decision whose score (its reward, else its rating) is above this is
    desirable, the others undesirable; decisions with neither are dropped and counted.
    None: the mean score of the selected scored decisions."""

    def problems(self) -> list[str]:
        out = [
            checks.positive_int_problem("--num_generations", self.num_generations),
            checks.finite("--desirable_threshold", self.desirable_threshold),
        ]
        if self.beta is not None:
            out.append(checks.non_negative("--beta", self.beta))
        if checks.is_positive_int(self.num_generations) and self.num_generations < 2:
            out.append(
                "--num_generations: GRPO needs at least 2 answers per prompt to compare, "
                f"got {self.num_generations}"
            )
        return [p for p in out if p]
