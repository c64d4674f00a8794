"""SFT recipe: imitate good decisions with a LoRA adapter and TRL's SFTTrainer.

Read top to bottom: decisions -> tokenized prompt/completion examples -> SFTTrainer
with a PEFT LoRA config (or the adapter being continued) -> adapter saved.

We tokenize ourselves (the same way TRL does for conversational prompt/completion
rows: chat template with a generation prompt, completion = the rest) because TRL only
truncates from the right, which would cut off the answer -- the only part the loss
sees -- whenever a simulation prompt is long. We cut long prompts from the left
instead, keeping the instruction that simulators put last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simtune.config import TuningConfig
from simtune.decisions.schema import Decision
from simtune.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Examples:
    input_ids: list[list[int]]
    completion_mask: list[list[int]]
    truncated_prompts: int
    num_tokens: int
    num_completion_tokens: int


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
    )
    return list(out)


def split_prompt_answer(
    tokenizer: Any, prompt: list[dict[str, str]], answer: str
) -> tuple[list[int], list[int]]:
    """Token ids of chat-template(prompt + assistant answer), split into (prompt, answer)
    where the prompt rendered alone with a generation prompt diverges (TRL's rule):
    usually right after the generation prompt."""
    p_ids = chat_ids(tokenizer, prompt, True)
    full = chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": answer}], False)
    cut = 0
    for a, b in zip(p_ids, full, strict=False):
        if a != b:
            break
        cut += 1
    return full[:cut], full[cut:]


def build_examples(decisions: list[Decision], tokenizer: Any, cfg: TuningConfig) -> Examples:
    """Chat-template each decision into (input_ids, completion_mask), answer-preserving."""
    input_ids: list[list[int]] = []
    masks: list[list[int]] = []
    truncated = 0
    n_tok = n_comp = 0
    for d in decisions:
        prompt_part, answer = split_prompt_answer(
            tokenizer, d.chat_prompt(cfg.system_prompt), d.target
        )
        if not answer:
            raise DataError(
                "the chat template renders no answer tokens", path=d.source, field="output"
            )
        budget = cfg.max_length - len(answer)
        if budget < 1:
            # The answer alone overflows: keep its start and a token of prompt.
            answer = answer[: cfg.max_length - 1]
            budget = 1
        if len(prompt_part) > budget:
            truncated += 1
            prompt_part = prompt_part[len(prompt_part) - budget :]
        ids = prompt_part + answer
        input_ids.append(ids)
        masks.append([0] * len(prompt_part) + [1] * len(answer))
        n_tok += len(ids)
        n_comp += len(answer)
    if truncated:
        log.warning(
            "%d prompt(s) longer than --max_length %d were cut from the left",
            truncated,
            cfg.max_length,
        )
    return Examples(input_ids, masks, truncated, n_tok, n_comp)


def lora_config(cfg: TuningConfig, task_type: str = "CAUSAL_LM", **extra: Any) -> Any:
    from peft import LoraConfig

    targets: Any = cfg.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        bias="none",
        **extra,
    )


def training_arguments(args_cls: type, cfg: TuningConfig, output_dir: Path, **extra: Any) -> Any:
    """`args_cls` (TrainingArguments or a TRL subclass) filled from our config: the one
    place that maps simtune options onto Hugging Face names across versions."""
    import dataclasses

    import torch

    names = {f.name for f in dataclasses.fields(args_cls)}
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio) ...
    warmup = "warmup_ratio" if "warmup_ratio" in names else "warmup_steps"
    # ... and renamed gradient_checkpointing to activation_checkpointing.
    ckpt = (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )
    checkpointing: dict[str, Any] = {ckpt: cfg.gradient_checkpointing}
    if cfg.gradient_checkpointing:
        checkpointing[f"{ckpt}_kwargs"] = {"use_reentrant": False}
    return args_cls(
        **{warmup: cfg.warmup_ratio},
        **checkpointing,
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        **extra,
    )


def sft_args(cfg: TuningConfig, output_dir: Path) -> Any:
    """TRL SFTConfig from our config."""
    from trl import SFTConfig

    return training_arguments(
        SFTConfig,
        cfg,
        output_dir,
        padding_free=cfg.padding_free,
        max_length=cfg.max_length,
        completion_only_loss=True,
        remove_unused_columns=True,
        save_only_model=False,
    )


def train_sft(
    cfg: TuningConfig,
    examples: Examples,
    model: Any,
    tokenizer: Any,
    work_dir: Path,
    callbacks: list[Any],
) -> tuple[dict[str, float], Any]:
    """Run SFTTrainer; returns (summary metrics, the trained PEFT model)."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTTrainer

    train = Dataset.from_dict(
        {"input_ids": examples.input_ids, "completion_mask": examples.completion_mask}
    )
    trainer = SFTTrainer(
        model=model,
        args=sft_args(cfg, work_dir / "checkpoints"),
        train_dataset=train,
        processing_class=tokenizer,
        # A model that already carries an adapter (continued training) keeps it.
        peft_config=None if isinstance(model, PeftModel) else lora_config(cfg),
        callbacks=callbacks,
    )
    _quiet_progress(trainer)
    result = trainer.train()
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics.update(train_loss=float(result.training_loss), global_step=float(result.global_step))
    return metrics, trainer.model


def _quiet_progress(trainer: Any) -> None:
    """Keep the progress bar (stderr) but show loss on it instead of printing every log
    dict to stdout, which would interleave with `--json` output."""
    from transformers.trainer_callback import ProgressCallback

    class LossOnBar(ProgressCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any
        ) -> None:
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LossOnBar())
