"""Which logged decisions become training examples, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from simtune.config import checks

# The flags `simtune data export/split` share with `simtune train`.
FILTERS = ("min_rating", "min_reward", "agent_types", "max_samples")


@dataclass
class DataArgs:
    """Which logged decisions become training examples, and how."""

    cli_group: ClassVar[str] = "data options"
    doc_section: ClassVar[str] = "data"

    min_rating: float | None = None
    """Keep only decisions rated at least this (unrated decisions are dropped when set)."""

    min_reward: float | None = None
    """Keep only decisions whose reward is at least this (decisions without reward are
    dropped when set)."""

    agent_types: list[str] = field(default_factory=list)
    """Keep only decisions of these agent types (default: all)."""

    system_prompt: str | None = None
    """System message put before each prompt that has none."""

    unfence_outputs: bool = False
    """Train on the answer inside a markdown code fence (```json ... ```) instead of
    the answer as the simulation produced it. Off by default: simulators whose parser
    needs the fence (YuLan-OneSim's JsonBlockParser) must keep getting it; turn on when
    the fence was only the model's habit and nothing parses it."""

    max_samples: int | None = None
    """Use at most this many training examples (a quick dry run on a subset)."""

    def problems(self) -> list[str]:
        out = checks.each(checks.finite, self, ("min_rating", "min_reward"))
        if self.max_samples is not None and self.max_samples <= 0:
            out.append(f"--max_samples: must be positive, got {self.max_samples!r}")
        return [p for p in out if p]
