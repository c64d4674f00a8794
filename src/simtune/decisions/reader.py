"""Read decision logs in every format simtune accepts, with errors that name file:line.

Formats (detected from content, not the extension):
- JSONL: one object per line; blank lines are skipped. Lines with an ``"event"`` key
  are late-arriving scores folded into their decision (see `fold_events`). An
  unparsable *last* line with no newline after it is a write cut short (a killed
  writer, or a file still being written) and is skipped with a warning naming it.
- JSON list: ``[{...}, {...}]`` (the seed simulator's ``decisions_<ts>.json`` export);
  line numbers in errors point at the start of the offending element.

Record shapes: DESIGN.md §3 decision records; the seed export (``trail_id``,
``human_rating``/``llm_rating``, ``refined_output``, ``context`` as a
JSON string); ``prompt``/``completion`` pairs; chat ``messages`` lists (OpenAI) and
TRL's conversational ``{"prompt": [...], "completion": [...]}``.

Event folding rule: ``reward`` events *add* to the decision's reward (an immediate
reward plus an episode share both count); ``rating`` and ``feedback`` events
*replace* (the newest wins), except that an ``llm`` rating never replaces a ``human``
one. Events whose decision is not in the loaded files are counted as orphans.

Repeated decision ids (YuLan-OneSim re-exports its whole cumulative list at every step,
and its UI saves it again with ratings): copies merge *in file order* -- paths as given,
a folder's files sorted by name, so OneSim's ``decisions_%Y%m%d_%H%M%S.json`` go oldest
first; modification times are not used -- field by field: a non-null later value
replaces the earlier one, except that a rating not by a ``human`` never replaces a
human's (`merge_decision`). The merged record sits where its last copy was read.
YuLan-OneSim's own ``rating`` (in files without the ``human_rating``/``llm_rating``
columns) is its LLM judge's, so it is read as ``rating_source: llm``; a path
``.../envs/<env>/datasets/...`` gives records without an ``env_name`` that env.

Two modes: `read_dataset(paths)` raises a `DataError` on the first problem (training
must not start on bad data). `read_dataset(paths, problems=[])` (or `validate_dataset`)
collects *every* problem as a `Problem` instead, skipping what is bad and keeping the
rest: one error per bad line or record (the first wrong field of a record), a JSON
list is checked up to its first structural error only (the rest cannot be located
reliably), and orphan events, repeated decision ids and torn last lines are reported
as warnings naming their file:line.

Large files: JSONL is read line by line (never whole), and `scan_dataset` streams the
folded decisions to a callback instead of returning them, in memory that does not grow
with the records (the score events, 16 B of id fingerprint per decision, one line):
what `simtune data stats|validate|export|split` use. `read_dataset` returns a list, so
it holds every decision (training needs them all anyway).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from math import isfinite as _isfinite
from pathlib import Path
from typing import Any

from simtune import jsontext
from simtune.decisions.schema import (
    ALIASES,
    DECISION_FIELDS,
    EVENT_KINDS,
    Decision,
    finite_number,
    unfence,
)
from simtune.errors import DataError
from simtune.openai.protocol import role_problem

log = logging.getLogger(__name__)

DIR_PATTERNS = ("decisions_*.jsonl", "decisions_*.json")
# Seed-export fields that are folded into canonical ones (so they don't also sit in
# metadata twice).
_CONSUMED = {
    "human_rating",
    "llm_rating",
    "refined_output",
    "human_reason",
    "llm_reason",
    "event",
} | set(ALIASES)
# Keys only YuLan-OneSim's decision records carry (its `rating` is an LLM judge's).
_ONESIM_KEYS = frozenset({"trail_id", "universe_id"})
# Top-level keys the reader interprets itself; any other key is kept in `metadata`.
RESERVED_KEYS = frozenset(DECISION_FIELDS) | frozenset(_CONSUMED)


@dataclass
class Problem:
    """One problem found by a collecting read; `text` is ``file:line: field 'x': message``."""

    text: str
    path: str | None = None
    line: int | None = None
    field: str | None = None
    severity: str = "error"  # or "warning": reported, but the data is still usable

    @classmethod
    def of(cls, exc: DataError, severity: str = "error") -> Problem:
        return cls(str(exc), exc.path, exc.line, exc.field, severity)

    @classmethod
    def warning(
        cls, message: str, path: str | None, line: int | None = None, field: str | None = None
    ) -> Problem:
        return cls.of(DataError(message, path=path, line=line, field=field), "warning")

    def __str__(self) -> str:
        return self.text


class _Sink:
    """Where problems go: raised at once (strict reads) or collected (`problems=[...]`)."""

    def __init__(self, out: list[Problem] | None) -> None:
        self.out = out

    @property
    def collecting(self) -> bool:
        return self.out is not None

    def error(self, exc: DataError) -> None:
        if self.out is None:
            raise exc
        self.out.append(Problem.of(exc))

    def warn(self, problem: Problem) -> None:
        if self.out is not None:
            self.out.append(problem)


@dataclass
class DatasetFile:
    path: str
    sha256: str
    format: str
    records: int = 0
    events: int = 0


@dataclass
class Event:
    kind: str
    decision_id: str
    value: Any
    extra: dict[str, Any]
    source: str


@dataclass
class Dataset:
    decisions: list[Decision]
    files: list[DatasetFile]
    orphan_events: int = 0
    duplicate_ids: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


def discover(paths: Iterable[str]) -> list[Path]:
    """Expand files and directories into an ordered, de-duplicated list of files."""
    return _discover(paths, _Sink(None))


def _discover(paths: Iterable[str], sink: _Sink) -> list[Path]:
    out: list[Path] = []
    seen: set[Path] = set()
    given = 0
    for raw in paths:
        given += 1
        p = Path(raw).expanduser()
        if not p.exists():
            sink.error(DataError("no such file or directory", path=str(raw)))
            continue
        if p.is_dir():
            found = sorted({f for pat in DIR_PATTERNS for f in p.rglob(pat) if f.is_file()})
            if not found:
                sink.error(
                    DataError(
                        "directory holds no decisions_*.json or decisions_*.jsonl files",
                        path=str(raw),
                    )
                )
        else:
            found = [p]
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    if not out and (not sink.collecting or not given):
        sink.error(DataError("no dataset files given"))
    return out


def read_dataset(paths: Iterable[str], *, problems: list[Problem] | None = None) -> Dataset:
    """Read every file, normalise records, fold events.

    Raises DataError on the first problem, unless `problems` is a list: then every
    problem is appended to it (warnings included), bad lines and records are skipped
    and the rest is returned (see the module docstring)."""
    sink = _Sink(problems)
    decisions: dict[str, Decision] = {}
    files: list[DatasetFile] = []
    events: list[Event] = []
    duplicates = 0
    for path in _discover(paths, sink):
        try:
            info, items = _read_file(path, sink)
        except DataError as exc:
            sink.error(exc)
            continue
        files.append(info)
        for line, obj in items:
            try:
                item = normalize(obj, str(path), line)
            except DataError as exc:
                sink.error(exc)
                continue
            if isinstance(item, Event):
                info.events += 1
                events.append(item)
                continue
            info.records += 1
            earlier = decisions.get(item.decision_id)
            if earlier is not None:
                duplicates += 1
                sink.warn(
                    Problem.warning(
                        f"repeats decision {item.decision_id!r} first read at "
                        f"{earlier.source}; {MERGED}",
                        str(path),
                        line,
                        "decision_id",
                    )
                )
                merge_decision(earlier, item)
                # At its last copy's place: where a streaming pass can give it out.
                decisions[item.decision_id] = decisions.pop(item.decision_id)
                continue
            decisions[item.decision_id] = item
    orphaned: list[Event] = []
    orphans = fold_events(decisions, events, orphaned)
    _report_leftovers(sink, orphaned, duplicates)
    return Dataset(list(decisions.values()), files, orphans, duplicates)


MERGED = "merged into it (later non-null fields win)"


def merge_decision(earlier: Decision, later: Decision) -> None:
    """Fold a later copy of a decision into the earlier one, field by field: a non-null
    later value replaces the earlier one (metadata key by key), except that a rating
    whose source is not ``human`` never replaces a ``human`` rating. This is how a
    simulator that re-exports its whole cumulative list (YuLan-OneSim's
    ``decisions_<ts>.json`` at every step, then again after rating/refining in its UI)
    ends up as one record carrying its newest scores. Copies are merged in file order
    (see `discover`: sorted names, so OneSim's timestamped names sort oldest first)."""
    human_kept = (
        earlier.rating is not None
        and earlier.metadata.get("rating_source") == "human"
        and later.metadata.get("rating_source") != "human"
    )
    for name in DECISION_FIELDS:
        if name in ("decision_id", "metadata", "rating"):  # `source` stays the first copy's
            continue
        value = getattr(later, name)
        if value is not None:
            setattr(earlier, name, value)
    if later.messages is not None:
        earlier.prompt = later.prompt
    elif later.prompt is not None:
        earlier.messages = None
    meta = {k: v for k, v in later.metadata.items() if v is not None}
    if human_kept or later.rating is None:
        meta.pop("rating_source", None)
    if later.rating is not None and not human_kept:
        earlier.rating = later.rating
        earlier.metadata.pop("rating_source", None)
    earlier.metadata.update(meta)


@functools.lru_cache(maxsize=256)
def env_from_path(path: str) -> str | None:
    """``.../envs/<env>/datasets/...`` (YuLan-OneSim's and simtune's workspace layout)
    -> ``<env>``; None for any other path."""
    parts = Path(path).parts
    for i in range(len(parts) - 3, -1, -1):
        if parts[i] == "envs" and parts[i + 2] == "datasets":
            return parts[i + 1]
    return None


# --- streaming: aggregates over files of any size ---------------------------------------------


# What statistics need of one folded decision -- (env_name, agent_type, run_id, agent_id,
# reward, rating, rating_source, has_feedback, prompt_chars, output_chars) -- as a plain
# tuple: building a NamedTuple costs ~10x more, and this is made a million times.
Brief = tuple


def brief(d: Decision) -> Brief:
    prompt = (
        sum(len(m.get("content") or "") for m in d.messages) if d.messages else len(d.prompt or "")
    )
    return (
        d.env_name,
        d.agent_type,
        d.run_id,
        d.agent_id,
        d.reward,
        d.rating,
        d.metadata.get("rating_source"),
        bool(d.feedback),
        prompt,
        len(d.output),
    )


# Keys whose handling in `normalize` is more than a type check (aliases, seed fields,
# chat messages, a context that may name the agent type): records holding any of them
# take the full path.
_SLOW_KEYS = frozenset(_CONSUMED) | {
    "messages",
    "completion",
    "context",
    "rating_source",
    "tools",
    "tool_calls",
}


def _fast_brief(obj: dict[str, Any], default_env: str | None = None) -> tuple[str, Brief] | None:
    """(decision id, Brief) of a plain DESIGN.md record without building a Decision, or
    None when the record needs `normalize` (other shapes, or anything it would reject or
    rewrite: the full path then gives the same answer or the same error). About 3x
    cheaper than `normalize` on the records simulators write."""
    if not _SLOW_KEYS.isdisjoint(obj):
        return None
    did = obj.get("decision_id")
    prompt = obj.get("prompt")
    output = obj.get("output")
    if (
        did is None
        or type(prompt) is not str
        or type(output) is not str
        or not prompt.strip()
        or not output.strip()
    ):
        return None
    feedback = obj.get("feedback")
    if feedback is not None and type(feedback) is not str:
        return None
    step = obj.get("step")
    if step is not None and type(step) is not int:
        return None
    reward = obj.get("reward")
    rating = obj.get("rating")
    latency = obj.get("latency_s")
    # Plain floats inline (the common case); anything else through `finite_number`.
    for value in (reward, rating, latency):
        if value is not None and not (type(value) is float and _isfinite(value)):
            try:
                finite_number(value)
            except ValueError:
                return None
    if type(reward) is int:
        reward = float(reward)
    if type(rating) is int:
        rating = float(rating)
    meta = obj.get("metadata")
    if type(meta) is dict and "tool_calls" in meta:  # maybe an old tool-call record
        return None
    env, agent_type, run, agent = (
        obj.get("env_name"),
        obj.get("agent_type"),
        obj.get("run_id"),
        obj.get("agent_id"),
    )
    return str(did), (
        default_env if env is None else env if type(env) is str else str(env),
        agent_type if agent_type is None or type(agent_type) is str else str(agent_type),
        run if run is None or type(run) is str else str(run),
        agent if agent is None or type(agent) is str else str(agent),
        reward,
        rating,
        meta.get("rating_source") if type(meta) is dict else None,
        bool(feedback and feedback.strip()),
        len(prompt),
        len(output),
    )


class SeenIds:
    """Which decision ids were read, in about 16 bytes per id (a Python set of the ids
    would take ~100 B each: 100 MB at a million).

    Keeps 64-bit fingerprints (`hash(id)`, SipHash: stable within the process, which is all
    this needs) with where each id was first read: the newest ones in a dict, merged every
    `batch` ids into two sorted arrays (numpy sorts them; lookups bisect). Peak: 16 B per
    id plus 16 B per id for a moment at each merge (32 MB at a million). Two different ids
    sharing a fingerprint would make the second look repeated; among n ids that has a
    chance of about n^2 / 2^65 (3e-8 at a million)."""

    def __init__(self, batch: int = 1 << 16, capacity: int = 1 << 20) -> None:
        import numpy as np

        self.batch = batch
        self.recent: dict[int, int] = {}
        # Sized for the most ids the input could hold: pages never written are never
        # resident, so this costs what is used, and nothing is copied to grow it.
        self.keys = np.empty(max(capacity, batch), dtype=np.int64)
        self.where = np.empty(len(self.keys), dtype=np.int64)
        self.n = 0
        self._view = memoryview(self.keys)  # bisect on it: ints, no numpy scalars

    def add(self, decision_id: str, where: int) -> int | None:
        """Record `decision_id` read at `where`; returns where it was first read if seen."""
        import bisect

        fp = hash(decision_id)
        first = self.recent.get(fp)
        if first is not None:
            return first
        i = bisect.bisect_left(self._view, fp, 0, self.n)
        if i < self.n and self._view[i] == fp:
            return int(self.where[i])
        self.recent[fp] = where
        if len(self.recent) >= self.batch:
            self._merge()
        return None

    def _merge(self) -> None:
        import numpy as np

        n, m = self.n, len(self.recent)
        if n + m > len(self.keys):  # more ids than the input size suggested: grow
            grow = max(2 * len(self.keys), n + m)
            self.keys = np.concatenate([self.keys[:n], np.empty(grow - n, np.int64)])
            self.where = np.concatenate([self.where[:n], np.empty(grow - n, np.int64)])
            self._view = memoryview(self.keys)
        self.keys[n : n + m] = np.fromiter(self.recent, np.int64, m)
        self.where[n : n + m] = np.fromiter(self.recent.values(), np.int64, m)
        self.recent = {}
        self.n = n + m
        # Transient: the permutation and one gathered copy, 16 B per id held.
        order = np.argsort(self.keys[: self.n], kind="stable")  # sorted run + short run
        self.keys[: self.n] = self.keys[: self.n][order]
        self.where[: self.n] = self.where[: self.n][order]


def _repeated(fps: Any) -> dict[int, int]:
    """{fingerprint: count} of the fingerprints occurring more than once (numpy sort:
    8 B per id, once)."""
    import numpy as np

    if len(fps) < 2:
        return {}
    a = np.frombuffer(fps, dtype=np.int64).copy()
    a.sort()
    starts = np.flatnonzero(np.concatenate(([True], a[1:] != a[:-1])))
    counts = np.diff(np.concatenate((starts, [len(a)])))
    many = counts > 1
    return dict(zip(a[starts[many]].tolist(), counts[many].tolist(), strict=True))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass
class Scan:
    """What a streaming pass over the files found (the decisions went to `consume`)."""

    files: list[DatasetFile]
    records: int = 0
    decisions: int = 0
    orphan_events: int = 0
    duplicate_ids: int = 0


_LINE_BITS = 40  # `where` = file index << 40 | line: a trillion lines per file


def scan_dataset(
    paths: Iterable[str],
    consume: Any,
    *,
    full: bool = False,
    problems: list[Problem] | None = None,
    on_bytes: Any = None,
) -> Scan:
    """Stream every decision, folded, to `consume` (a `Decision` when `full`, else a
    `Brief`), in file order, the copies of a repeated id merged (given out at its last
    copy, found by id fingerprints in pass 1) -- what `read_dataset` returns,
    without holding it.

    Two passes over each JSONL file: the first parses only lines holding ``"event"`` and
    keeps the score events (few: one per rating or late reward), the second parses every
    line and folds a decision's events into it as it goes by. Memory is the events, the
    `SeenIds` fingerprints (16 B per decision) and one line; JSON-list files are read
    whole (see `_read_file`). Problems are raised or collected as in `read_dataset`;
    `on_bytes(n)` is told of bytes read in both passes (2x the files' size in all)."""
    sink = _Sink(problems)
    files = _discover(paths, sink)
    # Pass 1: events, silently (pass 2 reports every problem, in line order).
    events: dict[str, list[Event]] = {}
    in_order: list[Event] = []
    from array import array

    fps = array("q")  # hash of every record's id, to find the repeated ones
    for path in files:
        try:
            _, items = _read_file(
                path, _Sink([]), digest=False, on_bytes=on_bytes, only=b'"event"', ids=fps
            )
        except DataError:
            continue  # reported by pass 2
        for line, obj in items:
            if isinstance(obj, dict) and "event" not in obj and obj.get("decision_id") is not None:
                # Only JSON lists yield records here (read whole anyway); JSONL record
                # lines went to `fps` unparsed.
                fps.append(hash(str(obj["decision_id"])))
            elif isinstance(obj, dict) and "event" in obj:
                with contextlib.suppress(DataError):
                    ev = normalize(obj, str(path), line)
                    if isinstance(ev, Event):
                        events.setdefault(ev.decision_id, []).append(ev)
                        in_order.append(ev)
    # Pass 2: records.
    scan = Scan([])
    # At most one record per 20 bytes of input (a record line is longer).
    seen = SeenIds(capacity=sum(_size(p) for p in files) // 20 + 1)
    matched: set[str] = set()
    # Ids with copies in several JSON-list records (OneSim's cumulative exports): each is
    # held until its last copy has been merged in (`merge_decision`), then consumed.
    left = _repeated(fps)  # fingerprint -> copies still to come
    del fps
    held: dict[int, Decision] = {}

    def finish(d: Decision) -> None:
        evs = events.get(d.decision_id)
        if evs:
            fold_events({d.decision_id: d}, evs)
            matched.add(d.decision_id)
        scan.decisions += 1
        consume(d if full else brief(d))

    for index, path in enumerate(files):
        try:
            info, items = _read_file(path, sink, digest=False, on_bytes=on_bytes)
        except DataError as exc:
            sink.error(exc)
            continue
        scan.files.append(info)
        spath = str(path)
        for line, obj in items:
            fast = None
            if not full and type(obj) is dict and "event" not in obj:
                fast = _fast_brief(obj, env_from_path(spath))
                if fast is not None and (fast[0] in events or (left and hash(fast[0]) in left)):
                    fast = None  # scores to fold: take the full path
            if fast is not None:
                did, item = fast
            else:
                try:
                    d = normalize(obj, spath, line)
                except DataError as exc:
                    sink.error(exc)
                    continue
                if isinstance(d, Event):
                    info.events += 1
                    continue
                did = d.decision_id
            info.records += 1
            scan.records += 1
            fp = hash(did) if fast is None and left else None
            if fp is not None and fp in left:
                earlier = held.get(fp)
                if earlier is None:
                    seen.add(did, index << _LINE_BITS | line)
                    held[fp] = d
                else:
                    scan.duplicate_ids += 1
                    if sink.collecting:
                        sink.warn(
                            Problem.warning(
                                f"repeats decision {did!r} first read at {earlier.source}; "
                                f"{MERGED}",
                                spath,
                                line,
                                "decision_id",
                            )
                        )
                    merge_decision(earlier, d)
                left[fp] -= 1
                if not left[fp]:  # its last copy: consumed here, where read_dataset has it
                    del left[fp]
                    finish(held.pop(fp))
                continue
            first = seen.add(did, index << _LINE_BITS | line)
            if first is not None:
                scan.duplicate_ids += 1
                if sink.collecting:
                    at = f"{files[first >> _LINE_BITS]}:{first & ((1 << _LINE_BITS) - 1)}"
                    sink.warn(
                        Problem.warning(
                            f"repeats decision {did!r} first read at {at}; this copy is ignored",
                            spath,
                            line,
                            "decision_id",
                        )
                    )
                continue
            if fast is None:
                evs = events.get(did)
                if evs:
                    fold_events({did: d}, evs)
                    matched.add(did)
                item = d if full else brief(d)
            scan.decisions += 1
            consume(item)
    for d in held.values():  # copies pass 1 counted but pass 2 did not read as records
        finish(d)
    orphaned = [ev for ev in in_order if ev.decision_id not in matched]
    scan.orphan_events = len(orphaned)
    _report_leftovers(sink, orphaned, scan.duplicate_ids)
    return scan


def _report_leftovers(sink: _Sink, orphaned: list[Event], duplicates: int) -> None:
    """Warn about score events whose decision is not in the files (a collecting read
    gets one warning per event line) and, in one log line each, about those and
    repeated decision ids."""
    for ev in orphaned:
        where, _, line_text = ev.source.rpartition(":")
        sink.warn(
            Problem.warning(
                f"{ev.kind} event names decision {ev.decision_id!r}, which is not in the "
                "given files; ignored",
                where,
                int(line_text),
                "decision_id",
            )
        )
    if not sink.collecting:  # a collecting read reports these as warnings, one per line
        if orphaned:
            log.warning(
                "%d score event(s) name decisions not in the given files; ignored", len(orphaned)
            )
        if duplicates:
            log.warning(
                "%d record(s) repeat an earlier decision_id; merged (later non-null fields win)",
                duplicates,
            )


def validate_dataset(paths: Iterable[str]) -> tuple[Dataset, list[Problem]]:
    """Every problem in the given files (errors and warnings) and what could be read."""
    problems: list[Problem] = []
    dataset = read_dataset(paths, problems=problems)
    return dataset, problems


def read_events(paths: Iterable[Path]) -> list[Event]:
    """The score events in these files, in order, tolerantly: records, unreadable files
    and bad lines are skipped without a word. For finding scores written *beside* the
    files a command was given (`simtune data rate` resuming on a single file)."""
    events: list[Event] = []
    for path in paths:
        try:
            _, items = _read_file(Path(path), _Sink([]))
            for line, obj in items:
                if isinstance(obj, dict) and "event" in obj:
                    with contextlib.suppress(DataError):
                        item = normalize(obj, str(path), line)
                        if isinstance(item, Event):
                            events.append(item)
        except DataError:
            continue
    return events


def _read_file(
    path: Path,
    sink: _Sink | None = None,
    *,
    digest: bool = True,
    on_bytes: Any = None,
    only: bytes | None = None,
    ids: Any = None,
) -> tuple[DatasetFile, Iterator[tuple[int, Any]]]:
    """The file's facts and its `(line, object)` pairs. Parse errors go to `sink` (raised
    when strict); after one, a JSONL file goes on with its next line (lines are
    independent) while a JSON list stops (the rest cannot be located reliably).

    JSONL is streamed line by line (memory: one line), and hashed as it is read, so
    `DatasetFile.sha256` is filled in once the iterator is exhausted (left empty when
    `digest` is false: the stats and validate passes don't need it and sha256 costs about
    a second per 500 MB). A JSON list is read whole: the seed exports it comes from are
    small, and locating elements needs the text. `on_bytes(n)` is told of bytes read, in
    steps of about a megabyte (progress bars). With `only`, JSONL lines not holding those
    bytes are skipped unparsed and bad lines silently (a pre-pass looking for events)."""
    sink = sink or _Sink(None)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", path=str(path)) from None
    # Peek at the first non-blank line to tell the format (and refuse an empty file)
    # before anything is yielded, so these errors come from this call as they always did.
    head: list[bytes] = []
    try:
        for raw in fh:
            head.append(raw)
            if raw.strip() and raw.strip() != _BOM:
                break
    except OSError as exc:
        fh.close()
        raise DataError(f"cannot read: {exc.strerror or exc}", path=str(path)) from None
    first = b"".join(head).lstrip()
    if first.startswith(_BOM):
        first = first[len(_BOM) :].lstrip()
    if not first:
        fh.close()
        raise DataError("file is empty", path=str(path))
    if first.startswith(b"["):
        fh.close()
        try:
            raw_all = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read: {exc.strerror or exc}", path=str(path)) from None
        if on_bytes is not None:
            on_bytes(len(raw_all))
        sha = hashlib.sha256(raw_all).hexdigest() if digest else ""
        try:
            text = raw_all.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw_all[: exc.start].count(b"\n") + 1
            raise DataError("not UTF-8 text", path=str(path), line=line) from None
        return DatasetFile(str(path), sha, "json"), _json_list_items(text, str(path), sink)
    info = DatasetFile(str(path), "", "jsonl")
    return info, _jsonl_stream(
        fh, head, info, sink, digest=digest, on_bytes=on_bytes, only=only, ids=ids
    )


_BOM = b"\xef\xbb\xbf"
# A top-level-looking "decision_id" (not an escaped one inside a string) and its value.
_ID_RE = re.compile(rb'(?<!\\)"decision_id"\s*:\s*("(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*)')


def _id_text(token: bytes) -> str:
    """The id `normalize` makes of a ``decision_id`` JSON token (str() of the value)."""
    if token[:1] == b'"' and b"\\" not in token:
        return token[1:-1].decode("utf-8", "replace")
    try:
        return str(json.loads(token))
    except ValueError:
        return token.decode("utf-8", "replace")


_decode = jsontext.loads  # strict: no NaN/Infinity, lone surrogates or over-deep nesting
TORN_LINE = "skipped a torn last line (no newline at the end: its write was cut short)"
_PROGRESS_STEP = 1 << 20


def _jsonl_stream(
    fh: Any,
    head: list[bytes],
    info: DatasetFile,
    sink: _Sink,
    *,
    digest: bool = True,
    on_bytes: Any = None,
    only: bytes | None = None,
    ids: Any = None,
) -> Iterator[tuple[int, Any]]:
    """`(line, object)` for each non-blank line of an open JSONL file (`head`: the lines
    already read from it). With `only`, lines not holding those bytes are not parsed and
    no problem is reported (a pre-pass looking for events); `ids` (an ``array('q')``),
    if given, gets the `hash` of the ``decision_id`` of each line so skipped, found by a
    regular expression (no JSON parse): how the pre-pass finds repeated ids cheaply."""
    import itertools

    path = info.path
    hasher = hashlib.sha256() if digest else None
    pending = 0
    with fh:
        # Lines split at b"\n" only (bytes iteration), like split("\n") on the text: JSON
        # strings may hold raw U+2028, U+0085 and the like.
        for lineno, raw in enumerate(itertools.chain(head, fh), start=1):
            if hasher is not None:
                hasher.update(raw)
            if on_bytes is not None:
                pending += len(raw)
                if pending >= _PROGRESS_STEP:
                    on_bytes(pending)
                    pending = 0
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if only is not None and only not in raw:
                if ids is not None:
                    m = _ID_RE.search(raw)
                    if m is not None:
                        ids.append(hash(_id_text(m.group(1))))
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if only is None:
                    # The whole file is suspect (another encoding): stop reading it.
                    sink.error(DataError("not UTF-8 text", path=path, line=lineno))
                return
            if not line.strip():
                continue
            try:
                obj = _decode(line)
            except jsontext.JSONTextError as exc:
                if only is not None:
                    continue
                # Writers end every line with "\n" in one write, so an unparsable last
                # line without one is a write cut short (a crash, or a file still being
                # written): skip it, loudly.
                if exc.column is not None and not raw.endswith(b"\n"):
                    if sink.collecting:
                        sink.warn(Problem.warning(TORN_LINE, path, lineno))
                    else:
                        log.warning("%s:%d: %s", path, lineno, TORN_LINE)
                    continue
                sink.error(_json_error(exc, path, lineno))
                continue
            yield lineno, obj
    if on_bytes is not None and pending:
        on_bytes(pending)
    if hasher is not None:
        info.sha256 = hasher.hexdigest()


def _json_list_items(text: str, path: str, sink: _Sink) -> Iterator[tuple[int, Any]]:
    try:
        yield from _json_list(text, path)
    except DataError as exc:
        sink.error(exc)


def _json_error(exc: jsontext.JSONTextError, path: str, line: int) -> DataError:
    """``FILE:LINE: field 'x': ...`` for a value the strict parser refused, else
    ``FILE:LINE: invalid JSON (... column N)``."""
    if exc.field is not None:
        return DataError(exc.message, path=path, line=line, field=exc.field)
    if exc.column is not None:  # a syntax error: its column within the line
        msg = exc.message.rsplit(" at line ", 1)[0]
        return DataError(f"invalid JSON ({msg}, column {exc.column})", path=path, line=line)
    return DataError(f"invalid JSON ({exc.message})", path=path, line=line)


def _json_list(text: str, path: str) -> Iterator[tuple[int, Any]]:
    """Decode a JSON array element by element so each element keeps its line number."""
    pos = text.index("[") + 1
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, msg: str) -> DataError:
        return DataError(f"invalid JSON ({msg})", path=path, line=text.count("\n", 0, i) + 1)

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    start_line, counted = 1, 0  # count newlines incrementally (a full recount is quadratic)
    while True:
        pos = skip_ws(pos)
        start_line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, pos = jsontext.raw_decode(text, pos)
        except jsontext.JSONTextError as exc:
            if exc.pos is not None:
                raise fail(exc.pos, exc.message.rsplit(" at line ", 1)[0]) from None
            raise _json_error(exc, path, start_line) from None
        yield start_line, obj
        pos = skip_ws(pos)
        if pos >= n:
            raise fail(pos, "unterminated list")
        if text[pos] == "]":
            if text[pos + 1 :].strip():
                raise fail(skip_ws(pos + 1), "extra data after the list")
            return
        if text[pos] != ",":
            raise fail(pos, "expected ',' or ']'")
        pos += 1


def normalize(obj: Any, path: str, line: int) -> Decision | Event:
    """One raw JSON object -> Decision (or a score Event). Raises DataError naming the field."""

    def bad(fld: str | None, msg: str) -> DataError:
        return DataError(msg, path=path, line=line, field=fld)

    if not isinstance(obj, dict):
        raise bad(None, f"expected a JSON object, got {type(obj).__name__}")
    source = f"{path}:{line}"
    if "event" in obj:
        return _event(obj, bad, source)

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    output = obj.get("output", obj.get("completion"))
    raw_prompt = obj.get("prompt")
    if isinstance(obj.get("messages"), list):
        messages = _messages(obj["messages"], "messages", bad)
    elif isinstance(raw_prompt, list):  # TRL conversational prompt/completion
        messages = _messages(raw_prompt, "prompt", bad)
    elif isinstance(raw_prompt, str):
        prompt = raw_prompt
    elif raw_prompt is not None or obj.get("messages") is not None:
        fld = "messages" if obj.get("messages") is not None else "prompt"
        raise bad(fld, "expected a string or a list of chat messages")

    tools = _protocol(bad, "check_tools", obj.get("tools"), "tools")
    tool_calls = None
    if obj.get("tool_calls") not in (None, []):
        tool_calls = _protocol(bad, "check_tool_calls", obj["tool_calls"], "tool_calls")
    if isinstance(output, list):  # conversational completion: the assistant turn(s)
        turns = _messages(output, "completion" if "completion" in obj else "output", bad)
        output = "".join(m["content"] for m in turns if m["role"] == "assistant")
        tool_calls = tool_calls or next(
            (m["tool_calls"] for m in reversed(turns) if m.get("tool_calls")), None
        )
    if output is None and messages and messages[-1]["role"] == "assistant":
        output = messages[-1]["content"]
        tool_calls = tool_calls or messages[-1].get("tool_calls")
        messages = messages[:-1]
    if not messages and not (prompt and prompt.strip()):
        raise bad("prompt", "missing: a record needs 'prompt' or 'messages'")
    if output is None and tool_calls:
        output = ""  # an answer that only called tools
    if output is None:
        raise bad("output", "missing: a record needs 'output' (or 'completion')")
    if not isinstance(output, str):
        raise bad("output", f"expected a string, got {type(output).__name__}")
    if tool_calls is None and tools is None and isinstance(obj.get("metadata"), dict):
        tools, tool_calls, output = _legacy_tools(obj["metadata"], output)
    if not tool_calls and not unfence(output).strip():  # an empty fence is no answer either
        raise bad("output", "is empty")

    def number(fld: str) -> float | None:
        try:
            return finite_number(obj.get(fld))
        except ValueError as exc:
            raise bad(fld, str(exc)) from None

    # Seed export: a human's rating outranks the judge's.
    human, llm, plain = number("human_rating"), number("llm_rating"), number("rating")
    rating = human if human is not None else plain if plain is not None else llm
    reward = number("reward")
    latency = number("latency_s") if obj.get("latency_s") is not None else number("processing_time")

    feedback = obj.get("feedback") or obj.get("refined_output")
    if feedback is not None and not isinstance(feedback, str):
        raise bad("feedback", f"expected a string, got {type(feedback).__name__}")
    feedback = feedback if feedback and feedback.strip() else None

    step = obj.get("step")
    if step is not None:
        if isinstance(step, bool) or not (
            isinstance(step, int) or (isinstance(step, float) and step.is_integer())
        ):
            raise bad("step", f"expected an integer, got {step!r}")
        step = int(step)

    context = obj.get("context")
    if isinstance(context, str):
        try:
            context = jsontext.loads(context)
        except jsontext.JSONTextError:
            pass
    agent_type = obj.get("agent_type")
    if agent_type is None and isinstance(context, dict):
        agent_type = context.get("agent_type")

    reason = (
        obj.get("reason")
        or obj.get("low_quality_reason")
        or obj.get("human_reason")
        or obj.get("llm_reason")
    )
    metadata = dict(obj["metadata"]) if isinstance(obj.get("metadata"), dict) else {}
    metadata.update(
        {
            k: v
            for k, v in obj.items()
            if k not in DECISION_FIELDS and k not in _CONSUMED and v is not None
        }
    )
    if human is not None:
        metadata["rating_source"] = "human"
    elif rating is not None and plain is None:
        metadata["rating_source"] = "llm"
    elif (
        plain is not None
        and "rating_source" not in metadata
        and _ONESIM_KEYS & obj.keys()
        and "human_rating" not in obj
        and "llm_rating" not in obj
    ):
        # YuLan-OneSim's step/UI files (no human_/llm_rating columns, which its database
        # export and `data export --format seed` carry): their `rating` (1-5) comes from
        # its LLM judge (the UI's "rate" button), so a person's rating read later wins.
        metadata["rating_source"] = "llm"

    decision_id = obj.get("decision_id")
    if decision_id is None:
        # Stable across re-reads of the same file, so filters and splits are reproducible;
        # the record's content keeps same-named files in different directories apart.
        body = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
        decision_id = hashlib.sha1(f"{Path(path).name}:{line}:{body}".encode()).hexdigest()[:32]

    def text(*names: str) -> str | None:
        value = next((obj[k] for k in names if obj.get(k) is not None), None)
        return None if value is None else str(value)

    return Decision(
        decision_id=str(decision_id),
        output=output,
        prompt=prompt,
        messages=messages,
        tools=tools,
        tool_calls=tool_calls,
        env_name=text("env_name") or env_from_path(path),
        run_id=text("run_id", "trail_id"),
        agent_id=text("agent_id"),
        agent_type=None if agent_type is None else str(agent_type),
        step=step,
        timestamp=text("timestamp"),
        reward=reward,
        rating=rating,
        feedback=feedback,
        reason=None if reason is None else str(reason),
        model=text("model"),
        latency_s=latency,
        context=context,
        metadata=metadata,
        source=source,
    )


def _messages(value: list[Any], fld: str, bad: Any) -> list[dict[str, Any]]:
    """Chat messages as ``role`` + ``content`` (text), keeping the tool-call parts of the
    OpenAI shape: an assistant turn's ``tool_calls`` (content may then be null) and a
    ``tool`` result's ``tool_call_id`` (required, as OpenAI requires it)."""
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"{fld}[{i}]", "expected an object with 'role' and 'content'")
        if why := role_problem(m["role"]):
            raise bad(f"{fld}[{i}].role", why)
        calls = None
        if m.get("tool_calls") not in (None, []):  # [] on a text turn: no calls
            if m["role"] != "assistant":
                raise bad(f"{fld}[{i}].tool_calls", "only an assistant message calls tools")
            calls = _protocol(bad, "check_tool_calls", m["tool_calls"], f"{fld}[{i}].tool_calls")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI multi-part content: keep the text parts
            parts = [p.get("text", "") for p in content if isinstance(p, dict)]
            content = "".join(parts) if all(isinstance(t, str) for t in parts) else None
        elif content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise bad(f"{fld}[{i}].content", "expected a string")
        msg: dict[str, Any] = {"role": m["role"], "content": content}
        if calls:
            msg["tool_calls"] = calls
        if m["role"] == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad(f"{fld}[{i}].tool_call_id", "a tool message needs the id of its call")
            msg["tool_call_id"] = call_id
        if m["role"] in ("tool", "function") and isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    if not out:
        raise bad(fld, "is an empty list")
    return out


def _protocol(bad: Any, check: str, value: Any, where: str) -> Any:
    """A `simtune.openai.protocol` check (the one parser of the OpenAI shape), its
    `ProtocolError` as the reader's `DataError` naming the field."""
    from simtune.openai import protocol

    try:
        return getattr(protocol, check)(value, where)
    except protocol.ProtocolError as exc:
        param = exc.param or where
        raise bad(param, exc.message.removeprefix(f"{param}: ")) from None


def _legacy_tools(metadata: dict[str, Any], output: str) -> tuple[Any, Any, str]:
    """(tools, tool_calls, output) of a record written before tool calls were fields: the
    proxy kept the calls in ``metadata.tool_calls`` and the tools in
    ``metadata.params.tools``, the Recorder the tools in ``metadata.tools``, and both wrote
    a tool-call-only answer's ``output`` as the JSON list of its calls. Read as a tool-call
    decision when that is what it is; as it was (text) when anything does not fit."""
    from simtune.openai import protocol

    params = metadata.get("params")
    raw_tools = metadata.get("tools")
    if raw_tools is None and isinstance(params, dict):
        raw_tools = params.get("tools")
    try:
        tools = protocol.check_tools(raw_tools)
    except protocol.ProtocolError:
        tools = None
    calls = metadata.get("tool_calls")
    if not calls or not output.startswith("["):
        return tools, None, output
    try:
        checked = protocol.check_tool_calls(calls)
        said = jsontext.loads(output)
    except (protocol.ProtocolError, jsontext.JSONTextError):
        return tools, None, output
    if said != calls and said != checked:
        return tools, None, output
    return tools, checked, ""


def _event(obj: dict[str, Any], bad: Any, source: str) -> Event:
    kind = obj["event"]
    if kind not in EVENT_KINDS:
        raise bad("event", f"unknown event {kind!r} (expected one of {', '.join(EVENT_KINDS)})")
    if not obj.get("decision_id"):
        raise bad("decision_id", f"missing on a {kind} event")
    value = obj.get("value")
    if kind == "feedback":
        if not isinstance(value, str):
            raise bad("value", "a feedback event needs a string value")
    else:
        try:
            value = finite_number(value)
        except ValueError as exc:
            raise bad("value", str(exc)) from None
        if value is None:
            raise bad("value", f"missing on a {kind} event")
    extra = {k: v for k, v in obj.items() if k not in ("event", "decision_id", "value")}
    return Event(kind, str(obj["decision_id"]), value, extra, source)


def fold_events(
    decisions: dict[str, Decision], events: list[Event], orphaned: list[Event] | None = None
) -> int:
    """Apply score events in file order; returns how many named unknown decisions (and
    appends those events to `orphaned` when given)."""
    orphans = 0
    for ev in events:
        d = decisions.get(ev.decision_id)
        if d is None:
            orphans += 1
            if orphaned is not None:
                orphaned.append(ev)
            continue
        if ev.kind == "reward":
            d.reward = (d.reward or 0.0) + ev.value
        elif ev.kind == "rating":
            src = ev.extra.get("source", "human")
            if src != "human" and d.metadata.get("rating_source") == "human":
                continue  # a judge never overrides a person
            d.rating = ev.value
            d.metadata["rating_source"] = src
            if ev.extra.get("feedback"):
                d.feedback = str(ev.extra["feedback"])
            if ev.extra.get("reason"):
                d.reason = str(ev.extra["reason"])
        else:
            d.feedback = ev.value
    return orphans


@dataclass
class Selection:
    decisions: list[Decision]
    dropped: dict[str, int]


class Filters:
    """The training filters (--agent_types, --min_rating, --min_reward, --max_samples),
    one decision at a time: `keep(d)` says whether `d` passes, and `dropped` counts why
    the others did not. The one implementation: `select` runs it over a list, the
    streaming `simtune data export/split` over a scan."""

    def __init__(
        self,
        *,
        min_rating: float | None = None,
        min_reward: float | None = None,
        agent_types: list[str] | None = None,
        max_samples: int | None = None,
    ) -> None:
        self.min_rating, self.min_reward, self.max_samples = min_rating, min_reward, max_samples
        self.wanted = set(agent_types or ())
        self.dropped = {"min_rating": 0, "min_reward": 0, "agent_types": 0, "max_samples": 0}
        self.kept = 0

    def keep(self, d: Decision) -> bool:
        if self.wanted and d.agent_type not in self.wanted:
            self.dropped["agent_types"] += 1
        elif self.min_rating is not None and (d.rating is None or d.rating < self.min_rating):
            self.dropped["min_rating"] += 1
        elif self.min_reward is not None and (d.reward is None or d.reward < self.min_reward):
            self.dropped["min_reward"] += 1
        elif self.max_samples is not None and self.kept >= self.max_samples:
            # Counted after the other tests: a decision is dropped "by --max_samples"
            # only when it passed them (so the counts match filtering, then cutting).
            self.dropped["max_samples"] += 1
        else:
            self.kept += 1
            return True
        return False


def select(
    decisions: list[Decision],
    *,
    min_rating: float | None = None,
    min_reward: float | None = None,
    agent_types: list[str] | None = None,
    max_samples: int | None = None,
    unfence_outputs: bool = False,
) -> Selection:
    """Apply the training filters (`Filters`); counts why records were dropped. With
    `unfence_outputs`, the kept records' output and feedback lose a markdown code fence
    around them (--unfence_outputs; records are read verbatim)."""
    filters = Filters(
        min_rating=min_rating,
        min_reward=min_reward,
        agent_types=agent_types,
        max_samples=max_samples,
    )
    kept = [d for d in decisions if filters.keep(d)]
    if unfence_outputs:
        for d in kept:
            d.output = unfence(d.output)
            d.feedback = unfence(d.feedback) if d.feedback else d.feedback
    return Selection(kept, filters.dropped)


def describe(dataset: Dataset, selection: Selection) -> dict[str, Any]:
    """Dataset statistics logged to MLflow and saved in simtune.json."""
    ds = selection.decisions
    n = len(ds)

    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "files": [vars(f) for f in dataset.files],
        "num_records": len(dataset.decisions),
        "num_used": n,
        "dropped": selection.dropped,
        "orphan_events": dataset.orphan_events,
        "duplicate_ids": dataset.duplicate_ids,
        "with_reward": sum(d.reward is not None for d in ds),
        "with_rating": sum(d.rating is not None for d in ds),
        "with_feedback_target": sum(bool(d.feedback) for d in ds),
        "mean_reward": mean([d.reward for d in ds if d.reward is not None]),
        "mean_rating": mean([d.rating for d in ds if d.rating is not None]),
        "mean_target_chars": mean([float(len(d.target)) for d in ds]),
        "agent_types": sorted({d.agent_type for d in ds if d.agent_type}),
    }
