"""The LoRA adapter (PEFT names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from simtune.config import checks


@dataclass
class LoraArgs:
    """The LoRA adapter (PEFT names)."""

    cli_group: ClassVar[str] = "LoRA options"
    doc_section: ClassVar[str] = "LoRA (PEFT names)"

    lora_r: int = 16
    """LoRA rank."""

    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""

    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""

    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: names such as q_proj v_proj, or 'all-linear'."""

    def problems(self) -> list[str]:
        out: list[str | None] = [
            *checks.each(checks.positive_number, self, ("lora_r", "lora_alpha"))
        ]
        out.append(checks.in_range("--lora_dropout", self.lora_dropout, 0, 1, closed=False))
        return [p for p in out if p]
