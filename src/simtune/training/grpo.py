"""GRPO recipe (`--tuning_mode grpo`): TRL's GRPOTrainer scored by simtune's reward sources.

Read top to bottom: decisions -> one dataset row per decision (its chat prompt and
`record_index`, the decision's position in the selection) -> the job's reward source
(`simtune.rewards.make_reward_source`: --reward_fn, --reward_model or --judge_url)
wrapped as one GRPO reward function that maps each sampled answer back to its decision
record through `record_index` -> GRPOTrainer with the same LoRA, TrainingArguments,
tracking and stop callbacks as SFT -> the trained adapter.

GRPO samples `--num_generations` answers per prompt and scores each against its group:
advantage = (reward - group mean) / group std (TRL's default `scale_rewards`), so no
value model is trained and reward scale matters less than in PPO. Sampling uses the job's
--max_new_tokens, --temperature, --top_p and --top_k; an answer ends at any stop id PPO
uses (`ppo.stop_token_ids`: the tokenizer's EOS, the model's and the chat template's
end-of-turn), which GRPOTrainer reads from the model's generation_config. The KL term
(--beta, TRL's default 0.0: no reference at all) pulls towards the base model with the
adapter disabled, which is what TRL does with a PEFT model.

Limits, said plainly:
- Prompts are not truncated (GRPOTrainer has no prompt limit in TRL 1.16): prompts longer
  than --max_length - --max_new_tokens tokens are counted and logged as a warning.
- Single-step only. TRL's `environment_factory`/`rollout_func` could make a simtune
  simulation the environment of multi-step episodes; that is not built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simtune.config import TuningConfig
from simtune.decisions.schema import Decision
from simtune.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class GRPOInputs:
    """What `build_grpo_inputs` checked before any run opens."""

    decisions: list[Decision]
    prompts: list[list[dict[str, str]]]
    source: Any
    """The RewardSource (`simtune.rewards`)."""
    stop_ids: list[int]
    long_prompts: int


def build_grpo_inputs(
    decisions: list[Decision], tokenizer: Any, cfg: TuningConfig, spec: Any
) -> GRPOInputs:
    """Chat prompts of the decisions, the reward source (checked fail-fast) and the stop
    ids; counts prompts too long for --max_length."""
    from simtune.rewards import make_reward_source
    from simtune.training.ppo import load_generation_config, stop_token_ids
    from simtune.training.sft import batch_chat_ids

    budget = cfg.max_length - cfg.max_new_tokens
    if budget < 8:
        raise DataError(
            f"--max_length {cfg.max_length} leaves no room for the prompt next to "
            f"--max_new_tokens {cfg.max_new_tokens}"
        )
    prompts = [d.chat_prompt(cfg.system_prompt) for d in decisions]
    long_prompts = sum(len(ids) > budget for ids in batch_chat_ids(tokenizer, prompts, True))
    if long_prompts:
        log.warning(
            "%d prompt(s) are longer than --max_length - --max_new_tokens = %d tokens; GRPO "
            "uses them whole (TRL's GRPOTrainer does not truncate prompts)",
            long_prompts,
            budget,
        )
    stop_ids = stop_token_ids(tokenizer, load_generation_config(spec))
    return GRPOInputs(decisions, prompts, make_reward_source(cfg), stop_ids, long_prompts)


def reward_function(source: Any, decisions: list[Decision]) -> Callable[..., list[float]]:
    """`source` as a GRPO reward function: GRPOTrainer passes every dataset column as a
    keyword list aligned with the completions, so `record_index` names each answer's
    decision; conversational completions arrive as [{"role": "assistant", ...}]."""

    def simtune_reward(
        prompts: list[Any], completions: list[Any], record_index: list[int], **_: Any
    ) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        messages = [
            p if isinstance(p, list) else [{"role": "user", "content": str(p)}] for p in prompts
        ]
        records = [decisions[int(i)] for i in record_index]
        return [float(v) for v in source.score(messages, texts, records)]

    # TRL names the reward's metrics after the function: train/rewards/<name>/mean.
    simtune_reward.__name__ = "simtune_reward"
    return simtune_reward


def grpo_args(cfg: TuningConfig, output_dir: Path) -> Any:
    """TRL GRPOConfig from our config (`sft.training_arguments` plus GRPO's own)."""
    from trl import GRPOConfig

    from simtune.training.sft import training_arguments

    return training_arguments(
        GRPOConfig,
        cfg,
        output_dir,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        # Our record_index column must reach the reward function.
        remove_unused_columns=False,
        **({"beta": cfg.beta} if cfg.beta is not None else {}),
    )


def train_grpo(
    cfg: TuningConfig,
    inputs: GRPOInputs,
    model: Any,
    tokenizer: Any,
    work_dir: Path,
    callbacks: list[Any],
    *,
    resume_from: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], Any]:
    """Run GRPOTrainer; returns (summary metrics, the trained PEFT model). Checkpoints,
    `resume_from` and `should_stop` work as in `sft.train_sft`."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import GRPOTrainer

    from simtune.training.model import fp32_trainable
    from simtune.training.sft import _quiet_progress, lora_config, stop_callback

    train = Dataset.from_dict(
        {"prompt": inputs.prompts, "record_index": list(range(len(inputs.prompts)))}
    )
    # GRPOTrainer ends answers at the model's generation_config EOS ids (plus the
    # tokenizer's): give it every stop id, as PPO's rollouts use.
    model.generation_config.eos_token_id = list(inputs.stop_ids)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward_function(inputs.source, inputs.decisions)],
        args=grpo_args(cfg, work_dir / "checkpoints"),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=None if isinstance(model, PeftModel) else lora_config(cfg),
        callbacks=[*callbacks, *([stop_callback(should_stop)] if should_stop else [])],
    )
    fp32_trainable(trainer.model)
    _quiet_progress(trainer)
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics.update(train_loss=float(result.training_loss), global_step=float(result.global_step))
    for key, value in inputs.source.stats().items():
        metrics[f"reward_source/{key}"] = float(value)
    return metrics, trainer.model
