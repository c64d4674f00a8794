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

Streaming versions for files of any size (what the CLI uses): `stream_stats`,
`stream_export` and `stream_split` give the same results and bytes as the in-memory
functions, reading through `reader.scan_dataset` (memory: see there) and writing
through `AtomicFiles`. `stream_stats` parses big JSONL inputs in several processes.
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

from simtune import jsontext
from simtune.decisions.reader import (  # Filters: beside reader.select, which uses it too
    RESERVED_KEYS,
    Brief,
    Dataset,
    Filters,
    Scan,
    scan_dataset,
)
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


class StatsAccumulator:
    """`dataset_stats` folded one decision at a time (`add` takes a `Brief`), for files too
    big to hold: memory is a few numbers per (env, agent type) group plus the distinct
    (env, run) and (env, agent) pairs -- it grows with runs and agents, not decisions.
    Pairs are counted (not just collected) so that a decision can be taken out again
    (`remove`: a repeated id found after the fact by the parallel pass)."""

    _ZERO = (0, 0, 0, 0, 0, 0, 0.0, 0.0, 0, 0)

    def __init__(self) -> None:
        # [records, with_reward, with_rating, with_feedback, human, llm, sum_reward,
        #  sum_rating, sum_prompt_chars, sum_output_chars]
        self.groups: dict[tuple[str | None, str | None], list[Any]] = {}
        self.runs: dict[tuple[str | None, str], int] = {}
        self.agents: dict[tuple[str | None, str], int] = {}

    def add(self, b: Brief) -> None:
        env, agent_type, run, agent, reward, rating, source, feedback, p_chars, o_chars = b
        g = self.groups.get((env, agent_type))
        if g is None:
            g = self.groups[(env, agent_type)] = list(self._ZERO)
        g[0] += 1
        if reward is not None:
            g[1] += 1
            g[6] += reward
        if rating is not None:
            g[2] += 1
            g[7] += rating
        if feedback:
            g[3] += 1
        if source == "human":
            g[4] += 1
        elif source == "llm":
            g[5] += 1
        g[8] += p_chars
        g[9] += o_chars
        if run:
            self.runs[(env, run)] = self.runs.get((env, run), 0) + 1
        if agent:
            self.agents[(env, agent)] = self.agents.get((env, agent), 0) + 1

    def remove(self, b: Brief) -> None:
        """Undo `add(b)`."""
        env, agent_type, run, agent, reward, rating, source, feedback, p_chars, o_chars = b
        undo = (
            1,
            reward is not None,
            rating is not None,
            bool(feedback),
            source == "human",
            source == "llm",
            reward or 0.0,
            rating or 0.0,
            p_chars,
            o_chars,
        )
        g = self.groups[(env, agent_type)]
        for i, v in enumerate(undo):
            g[i] -= v
        for pairs, key in ((self.runs, (env, run)), (self.agents, (env, agent))):
            if key[1]:
                pairs[key] -= 1
                if not pairs[key]:
                    del pairs[key]

    def merge(self, other: StatsAccumulator) -> None:
        for key, g in other.groups.items():
            mine = self.groups.setdefault(key, list(self._ZERO))
            for i, v in enumerate(g):
                mine[i] += v
        for mine_pairs, theirs in ((self.runs, other.runs), (self.agents, other.agents)):
            for key, n in theirs.items():
                mine_pairs[key] = mine_pairs.get(key, 0) + n

    @staticmethod
    def _row(g: list[Any]) -> dict[str, Any]:
        n, rw, rt, fb, human, llm, s_rw, s_rt, s_p, s_o = g

        def pct(k: int) -> float:
            return round(100.0 * k / n, 1) if n else 0.0

        def mean(total: float, k: int) -> float | None:
            return round(total / k, 4) if k else None

        return {
            "records": n,
            "with_reward": rw,
            "with_rating": rt,
            "with_feedback": fb,
            "reward_pct": pct(rw),
            "rating_pct": pct(rt),
            "feedback_pct": pct(fb),
            "rated_by_human": human,
            "rated_by_llm": llm,
            "mean_reward": mean(s_rw, rw),
            "mean_rating": mean(s_rt, rt),
            "mean_prompt_chars": mean(float(s_p), n),
            "mean_output_chars": mean(float(s_o), n),
        }

    def result(self, scan: Scan) -> dict[str, Any]:
        total = list(self._ZERO)
        for g in self.groups.values():
            total = [a + b for a, b in zip(total, g, strict=True)]
        rows = [
            {"env_name": env, "agent_type": agent, **self._row(g)}
            for (env, agent), g in sorted(
                self.groups.items(), key=lambda kv: (kv[0][0] or "", kv[0][1] or "")
            )
        ]
        return {
            "groups": rows,
            "total": self._row(total),
            "files": len(scan.files),
            "events": sum(f.events for f in scan.files),
            "orphan_events": scan.orphan_events,
            "duplicate_ids": scan.duplicate_ids,
            "runs": len(self.runs),
            "agents": len(self.agents),
        }


def stream_stats(
    paths: Iterable[str],
    *,
    on_bytes: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """`dataset_stats(read_dataset(paths))` in bounded memory (see `scan_dataset`).

    JSONL inputs of more than `_PARALLEL_MIN_BYTES` are parsed by `workers` processes
    (default: the CPU count, at most 8), each on its own byte range (`_stats_parallel`);
    parsing JSON is nearly all of the time, and one core does ~100-150k records/s."""
    paths = list(paths)
    n = workers if workers is not None else min(os.cpu_count() or 1, 8)
    if n > 1:
        from simtune.decisions.reader import _discover, _Sink

        files = _discover(paths, _Sink(None))
        if all(_is_jsonl(f) for f in files) and (
            sum(f.stat().st_size for f in files) >= _PARALLEL_MIN_BYTES
        ):
            try:
                return _stats_parallel(files, n, on_bytes)
            except _RepeatedIds:
                pass  # merging copies needs them in file order: one pass, below
    acc = StatsAccumulator()
    scan = scan_dataset(paths, acc.add, on_bytes=on_bytes)
    return acc.result(scan)


class _RepeatedIds(Exception):
    """`_stats_parallel` found a repeated decision id (copies merge in file order)."""


# Below this a pool's start-up (~0.1-0.3 s) costs more than it saves.
_PARALLEL_MIN_BYTES = 32 << 20
_CHUNK_BYTES = 8 << 20
_WORKER_EVENTS: dict[str, Any] = {}


def _is_jsonl(path: Path) -> bool:
    with contextlib.suppress(OSError), path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return bool(head) and not head.startswith(b"[")
    return False


def _prepass(
    path: Path,
    events: dict[str, list[Any]],
    in_order: list[Any],
    on_bytes: Callable[[int], None] | None,
) -> list[tuple[str, int, int, int]]:
    """Pass 1 of `_stats_parallel` over one JSONL file: collect its score events (as
    `scan_dataset` does) and cut it into byte ranges of about `_CHUNK_BYTES` at line
    starts, as (path, start, end, line number before start), so workers report true
    line numbers and derive the ids of id-less records as `read_dataset` does."""
    from simtune.decisions.reader import Event, normalize

    tasks: list[tuple[str, int, int, int]] = []
    start = start_line = pos = line = pending = 0
    name = str(path)
    with path.open("rb") as fh:
        for raw in fh:
            pos += len(raw)
            line += 1
            pending += len(raw)
            if b'"event"' in raw:
                with contextlib.suppress(ValueError, DataError):  # reported by pass 2
                    obj = jsontext.loads(raw.removeprefix(b"\xef\xbb\xbf"))
                    if isinstance(obj, dict) and "event" in obj:
                        ev = normalize(obj, name, line)
                        if isinstance(ev, Event):
                            events.setdefault(ev.decision_id, []).append(ev)
                            in_order.append(ev)
            if pos - start >= _CHUNK_BYTES:
                tasks.append((name, start, pos, start_line))
                start, start_line = pos, line
                if on_bytes is not None:
                    on_bytes(pending)
                    pending = 0
    if pos > start:
        tasks.append((name, start, pos, start_line))
    if on_bytes is not None and pending:
        on_bytes(pending)
    return tasks


def _brief_of(obj: Any, path: str, line: int) -> tuple[str, Brief] | None:
    """(id, folded Brief) of one parsed record; None for an event. Raises DataError."""
    from simtune.decisions.reader import (
        Event,
        _fast_brief,
        brief,
        env_from_path,
        fold_events,
        normalize,
    )

    if type(obj) is dict and "event" not in obj:
        fast = _fast_brief(obj, env_from_path(path))
        if fast is not None and fast[0] not in _WORKER_EVENTS:
            return fast
    d = normalize(obj, path, line)
    if isinstance(d, Event):
        return None
    evs = _WORKER_EVENTS.get(d.decision_id)
    if evs:
        fold_events({d.decision_id: d}, evs)
    return d.decision_id, brief(d)


def _stats_chunk(task: tuple[str, int, int]) -> dict[str, Any]:
    """Statistics of one byte range (run in a worker): the records' aggregates, their id
    fingerprints, byte offsets and lines (for the parent's check across ranges), and the
    first problem, if any (stats stops at it, like a strict read)."""
    from array import array

    from simtune.decisions.reader import _BOM, _decode, _json_error
    from simtune.jsontext import JSONTextError

    path, start, end, line = task
    acc = StatsAccumulator()
    fps, offsets, lines = array("q"), array("q"), array("q")
    local: set[int] = set()
    out: dict[str, Any] = {"lines": 0, "records": 0, "events": 0, "dups": 0, "torn": None}
    out["error"] = None
    matched: set[str] = set()
    pos = start
    with open(path, "rb") as fh:
        fh.seek(start)
        while pos < end:
            raw = fh.readline()
            if not raw:
                break
            at = pos
            pos += len(raw)
            line += 1
            if at == 0 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                out["error"] = (line, "not UTF-8 text", None)
                break
            if not text.strip():
                continue
            try:
                obj = _decode(text)
            except JSONTextError as exc:
                if exc.column is not None and not raw.endswith(b"\n"):
                    out["torn"] = line
                    break
                err = _json_error(exc, path, line)
                out["error"] = (line, _bare(err), err.field)
                break
            try:
                got = _brief_of(obj, path, line)
            except DataError as exc:
                out["error"] = (line, _bare(exc), exc.field)
                break
            if got is None:
                out["events"] += 1
                continue
            did, b = got
            out["records"] += 1
            fp = hash(did)  # the same in every worker: forked, they share the hash seed
            if fp in local:
                out["dups"] += 1
                continue
            local.add(fp)
            if did in _WORKER_EVENTS:
                matched.add(did)
            fps.append(fp)
            offsets.append(at)
            lines.append(line)
            acc.add(b)
    out.update(acc=acc, fps=fps.tobytes(), offsets=offsets.tobytes(), lines=lines.tobytes())
    out.update(matched=matched, nbytes=end - start)
    return out


def _worker_signals() -> None:
    """Workers die on SIGTERM and leave Ctrl-C to the parent. They are forked from the
    CLI, whose SIGTERM handler raises KeyboardInterrupt: in a worker that would fire
    inside the pool's queue lock when the pool stops them, and hang the other workers."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _bare(exc: DataError) -> str:
    """The message of a DataError without its ``file:line: field 'x': `` prefix."""
    text = str(exc)
    if exc.path is not None:
        text = text.removeprefix(f"{exc.path}:{exc.line}: " if exc.line else f"{exc.path}: ")
    return text.removeprefix(f"field '{exc.field}': ") if exc.field else text


def _stats_parallel(
    files: list[Path], workers: int, on_bytes: Callable[[int], None] | None
) -> dict[str, Any]:
    """`stream_stats` over JSONL files with a process pool (Linux fork; elsewhere one
    process). Memory: the parent keeps the sorted fingerprints of the ids read so far
    (8 B per decision: 8 MB at a million) to find ids repeated across ranges. A repeated
    id raises `_RepeatedIds` (its copies merge field by field in file order, which ranges
    counted apart cannot do) and `stream_stats` takes the one-process pass instead."""
    import logging
    import multiprocessing

    import numpy as np

    from simtune.decisions.reader import TORN_LINE, DatasetFile

    log = logging.getLogger("simtune.decisions.reader")
    events: dict[str, list[Any]] = {}
    in_order: list[Any] = []
    tasks = [t for path in files for t in _prepass(path, events, in_order, on_bytes)]
    _WORKER_EVENTS.clear()
    _WORKER_EVENTS.update(events)  # inherited by the forked workers
    acc = StatsAccumulator()
    # Fingerprints of the ids kept so far, sorted, in a buffer sized for the most records
    # the files could hold (a record line is > 20 bytes): pages never written are never
    # resident, so memory is 8 B per decision read, plus the sort's n/2 scratch.
    seen = np.empty(sum(p.stat().st_size for p in files) // 20 + 1, dtype=np.int64)
    n_seen = 0
    infos = {str(p): DatasetFile(str(p), "", "jsonl") for p in files}
    scan = Scan(list(infos.values()))
    matched: set[str] = set()
    try:
        ctx = multiprocessing.get_context("fork")
    except ValueError:
        ctx = None
    pool = ctx.Pool(workers, initializer=_worker_signals) if ctx is not None else None
    ok = False
    try:
        results = pool.imap(_stats_chunk, tasks) if pool else map(_stats_chunk, tasks)
        for (path, _, _, _), res in zip(tasks, results, strict=True):
            if res["error"] is not None:
                line, msg, fld = res["error"]
                raise DataError(msg, path=path, line=line, field=fld)
            if res["torn"] is not None:
                log.warning("%s:%d: %s", path, res["torn"], TORN_LINE)
            info = infos[path]
            info.records += res["records"]
            info.events += res["events"]
            scan.records += res["records"]
            if res["dups"]:
                raise _RepeatedIds
            matched |= res["matched"]
            fps = np.frombuffer(res["fps"], dtype=np.int64)
            acc.merge(res["acc"])
            kept = seen[:n_seen]
            i = np.searchsorted(kept, fps)
            if n_seen and (kept[np.minimum(i, n_seen - 1)] == fps).any():
                raise _RepeatedIds
            if n_seen + len(fps) > len(seen):  # shorter lines than assumed: grow
                seen = np.concatenate([seen[:n_seen], np.empty(n_seen + len(fps), np.int64)])
            seen[n_seen : n_seen + len(fps)] = fps
            n_seen += len(fps)
            seen[:n_seen].sort(kind="stable")  # a sorted run plus a short one: ~linear
            if on_bytes is not None:
                on_bytes(res["nbytes"])
        ok = True
    finally:
        if pool is not None:
            if ok:
                pool.close()  # idle workers exit on their own
            else:
                pool.terminate()  # an error or Ctrl-C: stop the others now
            pool.join()
        _WORKER_EVENTS.clear()
    scan.decisions = scan.records - scan.duplicate_ids
    scan.orphan_events = sum(ev.decision_id not in matched for ev in in_order)
    if scan.orphan_events:
        log.warning(
            "%d score event(s) name decisions not in the given files; ignored", scan.orphan_events
        )
    if scan.duplicate_ids:
        log.warning(
            "%d record(s) repeat an earlier decision_id; merged (later non-null fields win)",
            scan.duplicate_ids,
        )
    return acc.result(scan)


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
    for name in ("tools", "tool_calls"):
        if getattr(d, name):
            out[name] = getattr(d, name)
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


class AtomicFiles:
    """Streaming counterpart of `write_atomic`: `files[i]` are open temporary files next to
    `paths[i]`; `commit()` flushes, fsyncs and renames them all. Leaving the `with` block
    without a commit (an error, Ctrl-C) removes the temporary files and any folder this
    created, so a failed export or split leaves nothing behind. Memory: one write buffer
    per file, whatever is written."""

    def __init__(self, paths: list[Path], *, force: bool = False, flag: str = "-o") -> None:
        if not force:
            for path in paths:
                if path.exists():
                    raise ConfigError(f"{flag} {path}: already exists; pass --force to replace it")
        for path in paths:
            if path.is_dir():
                raise ConfigError(f"{flag} {path}: is a directory")
        self.paths = paths
        self.files: list[Any] = []
        self._temps: list[str] = []
        self._made: list[Path] = []
        self._done = False

    def __enter__(self) -> AtomicFiles:
        try:
            for path in self.paths:
                missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
                path.parent.mkdir(parents=True, exist_ok=True)
                self._made += [p for p in missing if p not in self._made]
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                self._temps.append(tmp)
                self.files.append(os.fdopen(fd, "wb", buffering=1 << 20))
        except OSError as exc:
            self.__exit__(None, None, None)
            raise DataError(
                f"cannot write: {exc.strerror or exc}", path=str(exc.filename or "")
            ) from None
        return self

    def commit(self) -> None:
        try:
            for fh in self.files:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
            for tmp, path in zip(self._temps, self.paths, strict=True):
                os.replace(tmp, path)
        except OSError as exc:
            raise DataError(
                f"cannot write: {exc.strerror or exc}", path=str(exc.filename or "")
            ) from None
        self._done = True

    def __exit__(self, *exc: object) -> None:
        for fh in self.files:
            with contextlib.suppress(OSError):
                fh.close()
        if self._done:
            return
        for tmp in self._temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        # Deepest first; a folder something else has written into meanwhile stays.
        for folder in sorted(self._made, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()


def dropped_text(dropped: dict[str, int]) -> str:
    """`` (dropped 3 by --min-rating, ...)`` or nothing."""
    parts = [f"{n} by --{k.replace('_', '-')}" for k, n in dropped.items() if n]
    return f" (dropped {', '.join(parts)})" if parts else ""


def _jsonl_line(record: dict[str, Any]) -> bytes:
    return (
        json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
    ).encode()


def stream_export(
    paths: Iterable[str],
    output: str | os.PathLike[str],
    fmt: str,
    filters: Filters,
    *,
    force: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[Path, Scan]:
    """`write_export` of the filtered, folded decisions of `paths`, streamed: the same
    bytes, written as they are read (memory: see `scan_dataset`). Raises DataError when
    the filters leave nothing (and writes nothing)."""
    check_format(fmt)
    out = Path(output)
    convert: Callable[[Decision], dict[str, Any]] = to_seed_record if fmt == "seed" else to_record
    with AtomicFiles([out], force=force, flag="-o") as files:
        fh = files.files[0]

        def consume(d: Decision) -> None:
            if not filters.keep(d):
                return
            if fmt == "seed":
                # What json.dumps(list, indent=2) writes for this element.
                text = json.dumps(convert(d), ensure_ascii=False, indent=2, default=str)
                lead = "[\n  " if filters.kept == 1 else ",\n  "
                fh.write((lead + text.replace("\n", "\n  ")).encode())
            else:
                fh.write(_jsonl_line(convert(d)))

        scan = scan_dataset(paths, consume, full=True, on_bytes=on_bytes)
        if not filters.kept:
            raise DataError(
                f"nothing to export: the filters left none of {scan.decisions} "
                f"decision(s){dropped_text(filters.dropped)}"
            )
        if fmt == "seed":
            fh.write(b"\n]\n")
        files.commit()
    return out, scan


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
        raise _empty_side(held_out, by, len(sides), "held-out" if not heldout else "train")
    return Split(train, heldout, n_train, n_held, by, keyless)


def _empty_side(held_out: float, by: str, groups: int, side: str) -> ConfigError:
    return ConfigError(
        f"--held-out {held_out}: the {side} side would be empty ({groups} {by} "
        f"group(s) in all, split whole by --by {by}); change --held-out or --seed, or "
        + ("use --by agent" if by == "run" else "add data from more agents")
    )


@dataclass
class SplitCounts:
    """What `stream_split` wrote (`Split` without the decisions)."""

    train: int
    heldout: int
    train_groups: int
    heldout_groups: int
    by: str
    keyless: int
    scan: Scan


def stream_split(
    paths: Iterable[str],
    out_dir: str | os.PathLike[str],
    filters: Filters,
    *,
    by: str = "run",
    held_out: float = 0.2,
    seed: int = 0,
    force: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> SplitCounts:
    """`split_decisions` written to OUT/train.jsonl and OUT/heldout.jsonl as the records
    are read (the same files, the same errors; nothing written on one). Memory: one
    side per group (a run or agent), plus `scan_dataset`'s."""
    check_split(by, held_out)
    out = Path(out_dir)
    sides: dict[str, bool] = {}
    counts = [0, 0]  # train, held-out
    keyless = 0
    with AtomicFiles([out / "train.jsonl", out / "heldout.jsonl"], force=force, flag="--out") as f:
        train_fh, held_fh = f.files

        def consume(d: Decision) -> None:
            nonlocal keyless
            if not filters.keep(d):
                return
            key, has_key = group_key(d, by)
            keyless += not has_key
            held = sides.get(key)
            if held is None:
                held = sides[key] = _bucket(key, seed) < held_out
            counts[held] += 1
            (held_fh if held else train_fh).write(_jsonl_line(to_record(d)))

        scan = scan_dataset(paths, consume, full=True, on_bytes=on_bytes)
        if not filters.kept:
            raise DataError("nothing to split: no decisions left after the filters")
        n_held = sum(sides.values())
        if not counts[0] or not counts[1]:
            raise _empty_side(held_out, by, len(sides), "held-out" if not counts[1] else "train")
        f.commit()
    return SplitCounts(counts[0], counts[1], len(sides) - n_held, n_held, by, keyless, scan)
