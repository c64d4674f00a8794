"""Reward functions of three shapes for the online PPO benchmark (`--reward_fn FILE:NAME`)."""

from __future__ import annotations

from typing import Any


def digits(completion: str, **_: Any) -> float:
    """Share of the answer's characters that are digits."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def length(completion: str, **_: Any) -> float:
    """1 at exactly 12 characters, falling linearly to 0 at 0 or 24."""
    return max(0.0, 1.0 - abs(len(completion) - 12) / 12)


def keyword(completion: str, **_: Any) -> float:
    """1 if the answer contains "on" anywhere, else 0."""
    return float("on" in completion.lower())
