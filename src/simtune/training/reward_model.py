"""Reward-model recipe (`--tuning_mode reward`): learn to predict a decision's score.

Read top to bottom: scored decisions -> (chat-template(prompt + answer) token ids,
normalised score) pairs -> the base model as a one-output sequence classifier with a
LoRA adapter (the score head trained in full and saved with the adapter) -> HF
`Trainer` regression (MSE) -> a PEFT adapter that `rewards.RewardModelScorer` (and so
online PPO's `--reward_model`) loads.

The label is a decision's `reward`, else its `rating`, normalised per source (rewards
among rewards, ratings among ratings) so that a 1-5 rating and a 0/1 reward can share
one dataset. Long prompts are cut from the left, as in SFT: the head reads the last
token, which is the end of the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simtune.config import TuningConfig
from simtune.decisions.schema import Decision
from simtune.errors import ConfigError, DataError, ModelError
from simtune.rewards import normalise_scores, reward_input_ids

log = logging.getLogger(__name__)


def scored(decisions: list[Decision]) -> list[tuple[Decision, str, float]]:
    """(decision, 'reward' | 'rating', raw score) for each decision that has a score."""
    out = []
    for d in decisions:
        if d.reward is not None:
            out.append((d, "reward", float(d.reward)))
        elif d.rating is not None:
            out.append((d, "rating", float(d.rating)))
    return out


def build_reward_examples(
    decisions: list[Decision],
    tokenizer: Any,
    cfg: TuningConfig,
    *,
    normalise: str | None = None,
) -> tuple[list[list[int]], list[float]]:
    """(input_ids per example, normalised label per example) from the scored decisions.

    `normalise` defaults to cfg.score_normalization (zscore when the config has none).

    Raises DataError when no decision has a reward or rating, or all scores are equal
    (nothing to learn)."""
    method = normalise or getattr(cfg, "score_normalization", None) or "zscore"
    rows = scored(decisions)
    if not rows:
        raise DataError(
            f"none of the {len(decisions)} selected decisions has a reward or rating; "
            "--tuning_mode reward learns from scored decisions"
        )
    labels = [0.0] * len(rows)
    for kind in ("reward", "rating"):
        idx = [i for i, (_, k, _) in enumerate(rows) if k == kind]
        for i, value in zip(idx, normalise_scores([rows[i][2] for i in idx], method), strict=True):
            labels[i] = value
    if len({round(v, 12) for v in labels}) < 2:
        raise DataError(
            f"all {len(rows)} scored decisions have the same score; a reward model needs "
            "decisions that scored differently"
        )
    input_ids: list[list[int]] = []
    truncated = 0
    for d, _, _ in rows:
        ids, cut = reward_input_ids(
            tokenizer, d.chat_prompt(cfg.system_prompt), d.output, cfg.max_length
        )
        truncated += cut
        input_ids.append(ids)
    if truncated:
        log.warning(
            "%d example(s) longer than --max_length %d were cut from the left",
            truncated,
            cfg.max_length,
        )
    return input_ids, labels


def reward_lora_config(cfg: TuningConfig) -> Any:
    from simtune.training.sft import lora_config

    # The new one-output head is trained in full and saved with the adapter.
    return lora_config(cfg, "SEQ_CLS", modules_to_save=["score"])


def reward_args(cfg: TuningConfig, output_dir: Path) -> Any:
    """TrainingArguments with the same choices as sft.sft_args."""
    from transformers import TrainingArguments

    from simtune.training.sft import training_arguments

    return training_arguments(
        TrainingArguments,
        cfg,
        output_dir,
        remove_unused_columns=False,
        label_names=["labels"],
    )


def load_reward_base(spec: Any, tokenizer: Any, cfg: TuningConfig) -> Any:
    """The base model as a one-output classifier (+ a reward adapter to continue from)."""
    from transformers import AutoModelForSequenceClassification

    if spec.adapter:
        import json

        task = json.loads((Path(spec.adapter) / "adapter_config.json").read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise ConfigError(
                f"--llm_path: {spec.adapter} is a {task} adapter; --tuning_mode reward starts "
                "from a base model or continues a reward-model (SEQ_CLS) adapter"
            )
    from simtune.training.model import resolve_precision

    # The base in the training precision; the LoRA adapter and the score head stay fp32.
    dtype = resolve_precision(cfg.requested_precision()).dtype
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            spec.base,
            num_labels=1,
            problem_type="regression",
            pad_token_id=tokenizer.pad_token_id,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code,
            local_files_only=spec.base_is_local,
        )
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ModelError(
            f"--llm_path: cannot load {spec.base} as a sequence classifier: "
            f"{text[0] if text else type(exc).__name__}"
        ) from None
    if spec.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter, is_trainable=True)
    return model


def train_reward_model(
    cfg: TuningConfig,
    decisions: list[Decision] | tuple[list[list[int]], list[float]],
    spec: Any,
    tokenizer: Any,
    work_dir: Path,
    callbacks: list[Any],
    *,
    normalise: str | None = None,
    resume_from: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], Any]:
    """Train a LoRA reward model; returns (summary metrics, the trained PeftModel).

    Checkpoints, `resume_from` and `should_stop` work as in `sft.train_sft`.

    `decisions` are the selected decisions, or what `build_reward_examples` made of
    them. `spec` is the `training.model.ModelSpec` of --llm_path. Save the result with
    `model.save_pretrained(dir)` + `tokenizer.save_pretrained(dir)`."""
    import transformers
    from datasets import Dataset
    from peft import PeftModel, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer

    from simtune.training.model import fp32_trainable
    from simtune.training.sft import _quiet_progress, stop_callback

    if cfg.padding_free:
        log.info("--padding_free does not apply to --tuning_mode reward; padding instead")
    if isinstance(decisions, tuple):  # already built by build_reward_examples
        input_ids, labels = decisions
    else:
        input_ids, labels = build_reward_examples(decisions, tokenizer, cfg, normalise=normalise)
    transformers.set_seed(cfg.seed)  # LoRA init and the new head's init
    verbosity = transformers.logging.get_verbosity()
    # "Some weights ... newly initialized: ['score.weight']" is expected: that head is
    # what we train.
    transformers.logging.set_verbosity_error()
    try:
        model = load_reward_base(spec, tokenizer, cfg)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if not isinstance(model, PeftModel):
        model = get_peft_model(model, reward_lora_config(cfg))
    fp32_trainable(model)

    train = Dataset.from_dict(
        {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(ids) for ids in input_ids],
            "labels": labels,
        }
    )
    trainer = Trainer(
        model=model,
        args=reward_args(cfg, work_dir / "checkpoints"),
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[*callbacks, *([stop_callback(should_stop)] if should_stop else [])],
    )
    _quiet_progress(trainer)
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics.update(
        train_loss=float(result.training_loss),
        global_step=float(result.global_step),
        num_examples=float(len(labels)),
    )
    return metrics, trainer.model
