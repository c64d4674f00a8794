"""Curation of decision datasets: statistics, export and train/held-out splits.

All of it works on folded records (`read_dataset`: events applied) and never touches
the files it read; outputs are new files written atomically (a temporary file in the
same folder, then a rename), so an interrupted export leaves no half-written file.

Export formats (`export_records`):

- ``jsonl``: one DESIGN.md §3 record per line, events folded in (``reward``,
  ``rating``, ``feedback``, ``reason``; where the rating came from is kept as
  ``metadata.rating_source``).
- ``seed``: one JSON list in the seed simulator's export format (``trail_id``,
  ``universe_id``, ``processing_time``, ``human_rating`` or ``llm_rating`` by the
  rating's source -- a rating of unknown source is written as ``rating`` --,
  ``refined_output`` for the improved answer, ``low_quality_reason``, ``context`` as a
  JSON string). Keys the reader kept in ``metadata`` (``universe_id``,
  ``created_at``, ...) go back to the top level. A decision with a chat ``messages``
  prompt keeps it as ``messages`` (the seed format only knows a ``prompt`` string).

Both re-read to the same decisions (ids, fields, scores, feedback, metadata).

Splits (`split_decisions`) assign whole groups -- a run, or an agent -- to one side by
hashing ``seed, env_name, key``: the same group always lands on the same side, and
adding data never moves an existing group. The held-out share is a target (each group
lands there with probability `held_out`), not an exact count. A decision without the
key (no ``run_id`` / ``agent_id``) is grouped by the name of the file it came from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simtune.decisions.reader import RESERVED_KEYS, Dataset
from simtune.decisions.schema import Decision
from simtune.errors import ConfigError, DataError

EXPORT_FORMATS = ("jsonl", "seed")
SPLIT_KEYS = ("run", "agent")

# The seed export's keys, written null when a decision has no value for them (as the
# seed does), so tools written for it find every key they expect.
_SEED_KEYS = (
    "decision_id",
    "trail_id",
    "universe_id",
    "agent_id",
    "step",
    "timestamp",
    "event_id",
    "context",
    "prompt",
    "output",
    "processing_time",
    "feedback",
    "created_at",
    "llm_rating",
    "human_rating",
    "llm_feedback",
    "human_feedback",
    "llm_reason",
    "human_reason",
    "reward",
    "low_quality_reason",
    "refined_output",
)


# --- statistics ----------------------------------------------------------------------------


def prompt_chars(d: Decision) -> int:
    """Characters of model input: the prompt, or all chat messages together."""
    if d.messages:
        return sum(len(m.get("content") or "") for m in d.messages)
    return len(d.prompt or "")


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def _group_stats(ds: list[Decision]) -> dict[str, Any]:
    n = len(ds)

    def pct(k: int) -> float:
        return round(100.0 * k / n, 1) if n else 0.0

    with_reward = sum(d.reward is not None for d in ds)
    with_rating = sum(d.rating is not None for d in ds)
    with_feedback = sum(bool(d.feedback) for d in ds)
    return {
        "records": n,
        "with_reward": with_reward,
        "with_rating": with_rating,
        "with_feedback": with_feedback,
        "reward_pct": pct(with_reward),
        "rating_pct": pct(with_rating),
        "feedback_pct": pct(with_feedback),
        "rated_by_human": sum(d.metadata.get("rating_source") == "human" for d in ds),
        "rated_by_llm": sum(d.metadata.get("rating_source") == "llm" for d in ds),
        "mean_reward": _mean([d.reward for d in ds if d.reward is not None]),
        "mean_rating": _mean([d.rating for d in ds if d.rating is not None]),
        "mean_prompt_chars": _mean([float(prompt_chars(d)) for d in ds]),
        "mean_output_chars": _mean([float(len(d.output)) for d in ds]),
    }


def dataset_stats(dataset: Dataset) -> dict[str, Any]:
    """Counts and coverage per (env_name, agent_type), a total, and file-level facts."""
    groups: dict[tuple[str | None, str | None], list[Decision]] = {}
    for d in dataset.decisions:
        groups.setdefault((d.env_name, d.agent_type), []).append(d)
    rows = [
        {"env_name": env, "agent_type": agent, **_group_stats(ds)}
        for (env, agent), ds in sorted(
            groups.items(), key=lambda kv: (kv[0][0] or "", kv[0][1] or "")
        )
    ]
    return {
        "groups": rows,
        "total": _group_stats(dataset.decisions),
        "files": len(dataset.files),
        "events": sum(f.events for f in dataset.files),
        "orphan_events": dataset.orphan_events,
        "duplicate_ids": dataset.duplicate_ids,
        "runs": len({(d.env_name, d.run_id) for d in dataset.decisions if d.run_id}),
        "agents": len({(d.env_name, d.agent_id) for d in dataset.decisions if d.agent_id}),
    }


# --- export --------------------------------------------------------------------------------


def _split_metadata(metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keys that can sit at the top level, keys that must stay nested): a nested
    ``metadata`` key named like a field the reader interprets would change meaning."""
    top = {k: v for k, v in metadata.items() if k not in RESERVED_KEYS and k != "rating_source"}
    nested = {k: v for k, v in metadata.items() if k in RESERVED_KEYS}
    return top, nested


def to_record(d: Decision) -> dict[str, Any]:
    """A decision as a DESIGN.md §3 record (None fields left out)."""
    out: dict[str, Any] = {"decision_id": d.decision_id}
    for name in ("env_name", "run_id", "agent_id", "agent_type", "step", "timestamp"):
        value = getattr(d, name)
        if value is not None:
            out[name] = value
    if d.messages:
        out["messages"] = d.messages
    else:
        out["prompt"] = d.prompt
    out["output"] = d.output
    for name in ("reward", "rating", "feedback", "reason", "model", "latency_s", "context"):
        value = getattr(d, name)
        if value is not None:
            out[name] = value
    if d.metadata:
        out["metadata"] = dict(d.metadata)
    return out


def to_seed_record(d: Decision) -> dict[str, Any]:
    """A decision in the seed simulator's export format (see the module docstring)."""
    top, nested = _split_metadata(d.metadata)
    out: dict[str, Any] = dict.fromkeys(_SEED_KEYS)
    out.update(top)
    source = d.metadata.get("rating_source")
    rating_key = {"human": "human_rating", "llm": "llm_rating"}.get(source or "", "rating")
    context = d.context
    if context is not None and not isinstance(context, str):
        context = json.dumps(context, ensure_ascii=False)
    out.update(
        {
            "decision_id": d.decision_id,
            "trail_id": d.run_id,
            "agent_id": d.agent_id,
            "step": d.step,
            "timestamp": d.timestamp,
            "context": context,
            "output": d.output,
            "processing_time": d.latency_s,
            "reward": d.reward,
            "low_quality_reason": d.reason,
            "refined_output": d.feedback,
        }
    )
    if d.messages:
        del out["prompt"]
        out["messages"] = d.messages
    else:
        out["prompt"] = d.prompt
    if d.rating is not None:
        out[rating_key] = d.rating
    for name in ("env_name", "agent_type", "model"):
        value = getattr(d, name)
        if value is not None:
            out[name] = value
    if nested:
        out["metadata"] = nested
    return out


def export_records(decisions: Iterable[Decision], fmt: str = "jsonl") -> list[dict[str, Any]]:
    """Decisions as plain records in `fmt` (``jsonl`` or ``seed``)."""
    check_format(fmt)
    convert: Callable[[Decision], dict[str, Any]] = to_seed_record if fmt == "seed" else to_record
    return [convert(d) for d in decisions]


def check_format(fmt: str) -> None:
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")


def render(records: list[dict[str, Any]], fmt: str) -> bytes:
    """The bytes of an export file: a JSON list (``seed``) or one record per line."""
    if fmt == "seed":
        return (json.dumps(records, ensure_ascii=False, indent=2, default=str) + "\n").encode()
    return "".join(
        json.dumps(r, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
        for r in records
    ).encode()


def write_export(
    path: str | os.PathLike[str], decisions: list[Decision], fmt: str, *, force: bool = False
) -> Path:
    """Write `decisions` to `path` atomically; refuses an existing file unless `force`."""
    check_format(fmt)
    return write_atomic({Path(path): render(export_records(decisions, fmt), fmt)}, force=force)[0]


def write_atomic(files: dict[Path, bytes], *, force: bool = False, flag: str = "-o") -> list[Path]:
    """Write each file through a temporary file in its folder and a rename. Every file is
    fully written and flushed before the first rename, so a failure while writing (a full
    disk, Ctrl-C) changes none of them. An existing file is an error naming `flag` unless
    `force`."""
    if not force:
        for path in files:
            if path.exists():
                raise ConfigError(f"{flag} {path}: already exists; pass --force to replace it")
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            if path.is_dir():
                raise ConfigError(f"{flag} {path}: is a directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    except OSError as exc:
        raise DataError(
            f"cannot write: {exc.strerror or exc}", path=str(exc.filename or "")
        ) from None
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return list(files)


# --- train / held-out split ----------------------------------------------------------------


@dataclass
class Split:
    train: list[Decision]
    heldout: list[Decision]
    train_groups: int
    heldout_groups: int
    by: str
    keyless: int = 0
    """Decisions without the key (grouped by their file instead)."""


def group_key(d: Decision, by: str) -> tuple[str, bool]:
    """(the group a decision belongs to, whether it had the key itself)."""
    key = d.run_id if by == "run" else d.agent_id
    has_key = key is not None
    if key is None:
        key = "file:" + Path(d.source.rpartition(":")[0] or d.source).name
    return f"{d.env_name or ''}\x1f{key}", has_key


def _bucket(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key)."""
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_split(by: str, held_out: float) -> None:
    if by not in SPLIT_KEYS:
        raise ConfigError(f"--by: expected one of {', '.join(SPLIT_KEYS)}, got {by!r}")
    if not 0.0 < float(held_out) < 1.0:
        raise ConfigError(f"--held-out: expected a fraction between 0 and 1, got {held_out!r}")


def split_decisions(
    decisions: list[Decision], *, by: str = "run", held_out: float = 0.2, seed: int = 0
) -> Split:
    """Assign whole groups to train or held-out (deterministic; see the module docstring).

    Raises ConfigError naming --held-out when either side would be empty."""
    check_split(by, held_out)
    if not decisions:
        raise DataError("nothing to split: no decisions left after the filters")
    train: list[Decision] = []
    heldout: list[Decision] = []
    sides: dict[str, bool] = {}
    keyless = 0
    for d in decisions:
        key, has_key = group_key(d, by)
        keyless += not has_key
        if key not in sides:
            sides[key] = _bucket(key, seed) < held_out
        (heldout if sides[key] else train).append(d)
    n_held = sum(sides.values())
    n_train = len(sides) - n_held
    if not train or not heldout:
        side = "held-out" if not heldout else "train"
        raise ConfigError(
            f"--held-out {held_out}: the {side} side would be empty ({len(sides)} {by} "
            f"group(s) in all, split whole by --by {by}); change --held-out or --seed, or "
            + ("use --by agent" if by == "run" else "add data from more agents")
        )
    return Split(train, heldout, n_train, n_held, by, keyless)
