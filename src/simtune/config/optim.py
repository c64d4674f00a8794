"""The optimiser, schedule, precision and checkpoints (Hugging Face TrainingArguments names)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from simtune.config import checks

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


@dataclass
class OptimArgs:
    """The optimiser, schedule, precision and checkpoints (Hugging Face TrainingArguments names)."""

    cli_group: ClassVar[str] = "optimisation options"
    doc_section: ClassVar[str] = "optimisation (Hugging Face TrainingArguments names)"

    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""

    num_train_epochs: float = 3.0
    """Passes over the training set (ignored when max_steps > 0)."""

    max_steps: int = -1
    """Total optimizer steps; overrides num_train_epochs when > 0 (-1: train
    num_train_epochs)."""

    per_device_train_batch_size: int = 4
    """Examples per device per forward pass."""

    gradient_accumulation_steps: int = 1
    """Forward passes accumulated into one optimizer step."""

    max_length: int = 1024
    """Longest tokenized example; longer prompts are cut from the left so the answer
    (what the loss is on) survives, with a warning counting them. Simulation prompts can
    be long (YuLan-OneSim trains with 8192): raise it when the warning appears."""

    warmup_ratio: float = 0.03
    """Fraction of steps spent warming the learning rate up."""

    lr_scheduler_type: str = "cosine"
    """Learning-rate schedule: linear, cosine, cosine_with_restarts, polynomial,
    constant or constant_with_warmup."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    max_grad_norm: float = 1.0
    """Gradient clipping norm."""

    logging_steps: int = 1
    """Log metrics every N optimizer steps."""

    save_steps: int = 0
    """Save a resumable checkpoint (adapter, optimizer, scheduler, RNG; PPO also value
    head and KL controller) every N steps under <workspace>/jobs/<model_id>/checkpoints
    (0: none, except the one SIGTERM/Ctrl-C saves). Removed when the job succeeds."""

    resume: bool = False
    """Continue the most recent interrupted job with the same --tuning_mode, --llm_path,
    --dataset_path and --output_dir from its latest checkpoint, in the same MLflow run
    (also after SIGKILL: from the last checkpoint written); fails if there is none."""

    resume_from: str | None = None
    """Continue from this checkpoint directory (.../checkpoint-<step>), or from the
    latest checkpoint of a job directory <workspace>/jobs/<model_id>."""

    seed: int = 42
    """Random seed for data order, LoRA init and dropout."""

    precision: str = "auto"
    """Precision of the base model's weights and matmuls: 'auto' picks bf16 where the
    hardware does it fast (a CUDA GPU with bf16, or a CPU with AMX/AVX512-BF16) and fp32
    elsewhere; or bf16, fp16 (CUDA only) or fp32. LoRA weights and optimizer state stay
    fp32 in every case. The choice and its reason are logged and saved in simtune.json."""

    bf16: bool = False
    """Same as --precision bf16 (bfloat16 mixed precision; on CPU too)."""

    fp16: bool = False
    """Same as --precision fp16 (float16 mixed precision; CUDA only)."""

    gradient_checkpointing: bool = False
    """Trade compute for memory by recomputing activations."""

    padding_free: bool = False
    """Concatenate a batch without padding (needs a flash-attention model on GPU)."""

    def problems(self) -> list[str]:
        out = [
            checks.one_of("--lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS, "schedule"),
            *checks.each(
                checks.positive_number,
                self,
                (
                    "learning_rate",
                    "per_device_train_batch_size",
                    "gradient_accumulation_steps",
                    "max_length",
                    "logging_steps",
                    "max_grad_norm",
                ),
            ),
        ]
        if self.max_steps == 0 or self.max_steps < -1:
            out.append(
                f"--max_steps: must be a positive number of steps (or -1: train "
                f"--num_train_epochs), got {self.max_steps!r}"
            )
        if not 0 <= self.seed < 2**32:
            out.append(f"--seed: must be in [0, 2**32), got {self.seed!r}")
        if self.max_steps <= 0 and not (
            math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0
        ):
            out.append("--num_train_epochs: must be a finite number > 0 (or set --max_steps)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            out.append(f"--weight_decay: must be >= 0, got {self.weight_decay!r}")
        out.append(checks.in_range("--warmup_ratio", self.warmup_ratio, 0, 1, closed=False))
        if self.save_steps < 0:
            out.append(f"--save_steps: must be >= 0, got {self.save_steps!r}")
        if self.resume and self.resume_from:
            out.append("--resume and --resume_from exclude each other")
        if self.bf16 and self.fp16:
            out.append("--bf16 and --fp16 exclude each other")
        out.append(checks.one_of("--precision", self.precision, PRECISIONS))
        for flag in ("bf16", "fp16"):
            if getattr(self, flag) and self.precision in PRECISIONS:
                if self.precision not in ("auto", flag):
                    out.append(f"--{flag} contradicts --precision {self.precision}")
        return [p for p in out if p]

    def requested_precision(self) -> str:
        """--precision with the --bf16/--fp16 flags folded in: 'auto', 'bf16', 'fp16' or
        'fp32' (what `simtune.training.model.resolve_precision` takes)."""
        if self.bf16:
            return "bf16"
        if self.fp16:
            return "fp16"
        return self.precision
