"""DPO and KTO recipes (`--tuning_mode dpo`, `--tuning_mode kto`) on TRL's trainers.

Both learn from the logged answers and their scores, offline, like offline PPO; a
decision's score is its `reward`, else its `rating` (offline PPO's rule); decisions with
neither are dropped and counted (`stats['unscored_dropped']`).

- DPO wants pairs. Decisions are grouped by their chat prompt (the same messages, after
  --system_prompt); in each group the best-scored answer is `chosen` and the worst-scored
  `rejected` -- one pair per prompt, the widest margin it has. A group whose answers all
  score the same (or that has one answer, or whose best and worst answers are the same
  text) gives no pair. No pair at all is a DataError saying why.
- KTO wants labels. A decision is desirable when its score is above
  --desirable_threshold (default: the mean score of the scored decisions), undesirable
  otherwise. KTO needs both kinds; one kind alone is a DataError.

The reference is the base model with the LoRA adapter disabled (TRL's default when it is
given a PEFT model). The answer is the logged `output` (not a `refined_output`: the
score belongs to what the agent actually said). TRL tokenizes with the chat template and
truncates sequences longer than --max_length from the right (the only mode DPOTrainer and
KTOTrainer have), which can cut an answer short; keep --max_length above your longest
prompt + answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simtune.config import TuningConfig
from simtune.decisions.schema import Decision
from simtune.errors import DataError

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class PreferenceData:
    """The rows a preference trainer gets, and what was dropped on the way."""

    rows: dict[str, list[Any]]
    """Columns of the TRL dataset (conversational format)."""
    stats: dict[str, Any]
    """Counts for the dataset stats logged to MLflow and simtune.json."""


def _answer(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


def _scored(decisions: list[Decision]) -> tuple[list[tuple[Decision, float]], int]:
    out = [(d, s) for d in decisions if (s := d.score) is not None]
    dropped = len(decisions) - len(out)
    if dropped:
        log.warning("%d decision(s) have neither reward nor rating and are dropped", dropped)
    if not out:
        raise DataError(
            f"none of the {len(decisions)} selected decisions has a reward or rating; "
            "DPO and KTO learn from scored decisions"
        )
    return out, dropped


def build_dpo_pairs(decisions: list[Decision], cfg: TuningConfig) -> PreferenceData:
    """One (chosen = best, rejected = worst) pair per prompt whose answers scored
    differently; see the module docstring for the rule."""
    scored, dropped = _scored(decisions)
    groups: dict[str, list[tuple[Decision, float, Messages]]] = {}
    for d, s in scored:
        prompt = d.chat_prompt(cfg.system_prompt)
        groups.setdefault(json.dumps(prompt, sort_keys=True), []).append((d, s, prompt))
    rows: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": []}
    single = tied = 0
    for members in groups.values():
        if len(members) < 2:
            single += 1
            continue
        # Stable: among equal scores the first logged answer wins, so reruns agree.
        ordered = sorted(members, key=lambda m: m[1])
        (worst, low, prompt), (best, high, _) = ordered[0], ordered[-1]
        if high <= low or best.output == worst.output:
            tied += 1
            continue
        rows["prompt"].append(prompt)
        rows["chosen"].append(_answer(best.output))
        rows["rejected"].append(_answer(worst.output))
    if not rows["prompt"]:
        raise DataError(
            f"no preference pair for DPO: {len(groups)} distinct prompt(s) among "
            f"{len(scored)} scored decision(s); {single} have a single answer and {tied} "
            "only answers that scored the same. DPO pairs differently-scored answers to the "
            "same prompt; use --tuning_mode kto (unpaired) or offline ppo instead"
        )
    stats = {
        "num_pairs": len(rows["prompt"]),
        "unscored_dropped": dropped,
        "prompts_single_answer": single,
        "prompts_tied": tied,
    }
    return PreferenceData(rows, stats)


def build_kto_examples(decisions: list[Decision], cfg: TuningConfig) -> PreferenceData:
    """(prompt, completion, label) rows, label = score > threshold."""
    scored, dropped = _scored(decisions)
    scores = [s for _, s in scored]
    threshold = (
        cfg.desirable_threshold
        if cfg.desirable_threshold is not None
        else sum(scores) / len(scores)
    )
    labels = [s > threshold for s in scores]
    good = sum(labels)
    if good == 0 or good == len(labels):
        kind = "desirable" if good else "undesirable"
        raise DataError(
            f"all {len(labels)} scored decisions are {kind} at --desirable_threshold "
            f"{threshold:g} (scores {min(scores):g} to {max(scores):g}); KTO needs answers "
            "on both sides of the threshold"
        )
    rows = {
        "prompt": [d.chat_prompt(cfg.system_prompt) for d, _ in scored],
        "completion": [_answer(d.output) for d, _ in scored],
        "label": labels,
    }
    stats = {
        "num_desirable": good,
        "num_undesirable": len(labels) - good,
        "desirable_threshold": threshold,
        "unscored_dropped": dropped,
    }
    return PreferenceData(rows, stats)


def build_preference_data(decisions: list[Decision], cfg: TuningConfig) -> PreferenceData:
    if cfg.tuning_mode == "dpo":
        return build_dpo_pairs(decisions, cfg)
    return build_kto_examples(decisions, cfg)


def preference_args(cfg: TuningConfig, output_dir: Path) -> Any:
    """TRL DPOConfig or KTOConfig from our config (`sft.training_arguments` plus theirs)."""
    from trl import DPOConfig, KTOConfig

    from simtune.training.sft import training_arguments

    args_cls = DPOConfig if cfg.tuning_mode == "dpo" else KTOConfig
    return training_arguments(
        args_cls,
        cfg,
        output_dir,
        max_length=cfg.max_length,
        **({"beta": cfg.beta} if cfg.beta is not None else {}),
    )


def train_preference(
    cfg: TuningConfig,
    data: PreferenceData,
    model: Any,
    tokenizer: Any,
    work_dir: Path,
    callbacks: list[Any],
    *,
    resume_from: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], Any]:
    """Run DPOTrainer or KTOTrainer; returns (summary metrics, the trained PEFT model).
    Checkpoints, `resume_from` and `should_stop` work as in `sft.train_sft`."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOTrainer, KTOTrainer

    from simtune.training.model import fp32_trainable
    from simtune.training.sft import _quiet_progress, lora_config, stop_callback

    trainer_cls = DPOTrainer if cfg.tuning_mode == "dpo" else KTOTrainer
    trainer = trainer_cls(
        model=model,
        args=preference_args(cfg, work_dir / "checkpoints"),
        train_dataset=Dataset.from_dict(data.rows),
        processing_class=tokenizer,
        # With a PEFT model and no ref_model, TRL's reference is the adapter disabled.
        peft_config=None if isinstance(model, PeftModel) else lora_config(cfg),
        callbacks=[*callbacks, *([stop_callback(should_stop)] if should_stop else [])],
    )
    fp32_trainable(trainer.model)
    _quiet_progress(trainer)
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics.update(train_loss=float(result.training_loss), global_step=float(result.global_step))
    return metrics, trainer.model
