"""The value checks every args class shares, each written once.

A check returns a problem message (naming the flag) or None, so that an args class can
collect all of its problems and report them together; `raise_problems` turns the list
into one `ConfigError`. `positive_int` is the same count check as an argparse `type=`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from typing import Any

from simtune.errors import ConfigError


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_number(flag: str, value: Any) -> str | None:
    """A finite number > 0 (rates, sizes, timeouts)."""
    if _number(value) and math.isfinite(value) and value > 0:
        return None
    return f"{flag}: must be a positive number, got {value!r}"


def non_negative(flag: str, value: Any) -> str | None:
    """A finite number >= 0 (coefficients, retries)."""
    if _number(value) and math.isfinite(value) and value >= 0:
        return None
    return f"{flag}: must be >= 0, got {value!r}"


def finite(flag: str, value: Any) -> str | None:
    """None or a finite number (thresholds)."""
    if value is None or (_number(value) and math.isfinite(value)):
        return None
    return f"{flag}: must be a finite number, got {value!r}"


def in_range(flag: str, value: Any, low: float, high: float, *, closed: bool = True) -> str | None:
    """low <= value <= high, or low <= value < high with closed=False."""
    if _number(value) and low <= value and (value <= high if closed else value < high):
        return None
    bracket = "]" if closed else ")"
    return f"{flag}: must be in [{low:g}, {high:g}{bracket}, got {value!r}"


def one_of(flag: str, value: Any, allowed: Iterable[str], what: str = "value") -> str | None:
    allowed = tuple(allowed)
    if value in allowed:
        return None
    return f"{flag}: unknown {what} {value!r} (choose from {', '.join(allowed)})"


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def positive_int_problem(flag: str, value: Any) -> str | None:
    """A count (episodes, steps, tokens, samples): an integer >= 1."""
    if is_positive_int(value):
        return None
    return f"{flag}: expected a positive integer, got {value!r}"


def check_positive_int(flag: str, value: Any) -> None:
    """`positive_int_problem` raised at once, for the API functions that take counts."""
    problem = positive_int_problem(flag, value)
    if problem:
        raise ConfigError(problem)


def positive_int(text: str) -> int:
    """argparse `type=` for counts: the same test, a usage error (exit 2) before any work."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not is_positive_int(value):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def each(check: Callable[[str, Any], str | None], obj: Any, names: Iterable[str]) -> list[str]:
    """`check` applied to the fields `names` of `obj` (flag --<name>): their problems."""
    found = (check(f"--{name}", getattr(obj, name)) for name in names)
    return [p for p in found if p]


def raise_problems(problems: Iterable[str | None]) -> None:
    """One ConfigError listing every problem, one per line; a single problem reads
    exactly as it would alone."""
    found = [p for p in problems if p]
    if not found:
        return
    if len(found) == 1:
        raise ConfigError(found[0])
    error = ConfigError(f"{len(found)} problems:\n" + "\n".join(f"  {p}" for p in found))
    error.problems = found  # type: ignore[attr-defined]
    raise error
