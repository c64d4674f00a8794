"""Read decision logs in every format simtune accepts, with errors that name file:line.

Formats (detected from content, not the extension):
- JSONL: one object per line; blank lines are skipped. Lines with an ``"event"`` key
  are late-arriving scores folded into their decision (see `fold_events`). An
  unparsable *last* line with no newline after it is a write cut short (a killed
  writer, or a file still being written) and is skipped with a warning naming it.
- JSON list: ``[{...}, {...}]`` (the seed simulator's ``decisions_<ts>.json`` export);
  line numbers in errors point at the start of the offending element.

Record shapes: DESIGN.md §3 decision records; the seed export (``trail_id``,
``human_rating``/``llm_rating``, ``refined_output``, fenced outputs, ``context`` as a
JSON string); ``prompt``/``completion`` pairs; chat ``messages`` lists (OpenAI) and
TRL's conversational ``{"prompt": [...], "completion": [...]}``.

Event folding rule: ``reward`` events *add* to the decision's reward (an immediate
reward plus an episode share both count); ``rating`` and ``feedback`` events
*replace* (the newest wins), except that an ``llm`` rating never replaces a ``human``
one. Events whose decision is not in the loaded files are counted as orphans.

Two modes: `read_dataset(paths)` raises a `DataError` on the first problem (training
must not start on bad data). `read_dataset(paths, problems=[])` (or `validate_dataset`)
collects *every* problem as a `Problem` instead, skipping what is bad and keeping the
rest: one error per bad line or record (the first wrong field of a record), a JSON
list is checked up to its first structural error only (the rest cannot be located
reliably), and orphan events, repeated decision ids and torn last lines are reported
as warnings naming their file:line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simtune.decisions.schema import (
    ALIASES,
    DECISION_FIELDS,
    EVENT_KINDS,
    Decision,
    finite_number,
    unfence,
)
from simtune.errors import DataError

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
            if item.decision_id in decisions:
                duplicates += 1
                sink.warn(
                    Problem.warning(
                        f"repeats decision {item.decision_id!r} first read at "
                        f"{decisions[item.decision_id].source}; this copy is ignored",
                        str(path),
                        line,
                        "decision_id",
                    )
                )
                continue
            decisions[item.decision_id] = item
    orphaned: list[Event] = []
    orphans = fold_events(decisions, events, orphaned)
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
        if orphans:
            log.warning("%d score event(s) name decisions not in the given files; ignored", orphans)
        if duplicates:
            log.warning(
                "%d record(s) repeat an earlier decision_id; the first one is kept", duplicates
            )
    return Dataset(list(decisions.values()), files, orphans, duplicates)


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
    path: Path, sink: _Sink | None = None
) -> tuple[DatasetFile, Iterator[tuple[int, Any]]]:
    """The file's facts and its `(line, object)` pairs. Parse errors go to `sink` (raised
    when strict); after one, a JSONL file goes on with its next line (lines are
    independent) while a JSON list stops (the rest cannot be located reliably)."""
    sink = sink or _Sink(None)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", path=str(path)) from None
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError("not UTF-8 text", path=str(path), line=line) from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError("file is empty", path=str(path))
    if stripped[0] == "[":
        return DatasetFile(str(path), digest, "json"), _json_list_items(text, str(path), sink)
    return DatasetFile(str(path), digest, "jsonl"), _jsonl(text, str(path), sink)


TORN_LINE = "skipped a torn last line (no newline at the end: its write was cut short)"


def _json_list_items(text: str, path: str, sink: _Sink) -> Iterator[tuple[int, Any]]:
    try:
        yield from _json_list(text, path)
    except DataError as exc:
        sink.error(exc)


def _jsonl(text: str, path: str, sink: _Sink | None = None) -> Iterator[tuple[int, Any]]:
    sink = sink or _Sink(None)
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028, U+0085 and the like.
    lines = text.split("\n")
    # Writers end every line with "\n" in one write, so an unparsable last line without
    # one is a write cut short (a crash, or a file still being written): skip it, loudly.
    torn = len(lines) if lines[-1].strip() else 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == torn:
                if sink.collecting:
                    sink.warn(Problem.warning(TORN_LINE, path, lineno))
                else:
                    log.warning("%s:%d: %s", path, lineno, TORN_LINE)
                return
            sink.error(
                DataError(f"invalid JSON ({exc.msg}, column {exc.colno})", path=path, line=lineno)
            )
            continue
        except (RecursionError, ValueError) as exc:  # too deep; an over-long integer
            sink.error(DataError(f"invalid JSON ({_json_problem(exc)})", path=path, line=lineno))
            continue
        yield lineno, obj


def _json_problem(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]


def _json_list(text: str, path: str) -> Iterator[tuple[int, Any]]:
    """Decode a JSON array element by element so each element keeps its line number."""
    decoder = json.JSONDecoder()
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
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise fail(exc.pos, exc.msg) from None
        except (RecursionError, ValueError) as exc:
            raise fail(counted, _json_problem(exc)) from None
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

    if isinstance(output, list):  # conversational completion: the assistant turn(s)
        turns = _messages(output, "completion" if "completion" in obj else "output", bad)
        output = "".join(m["content"] for m in turns if m["role"] == "assistant")
    if output is None and messages and messages[-1]["role"] == "assistant":
        output = messages[-1]["content"]
        messages = messages[:-1]
    if not messages and not (prompt and prompt.strip()):
        raise bad("prompt", "missing: a record needs 'prompt' or 'messages'")
    if output is None:
        raise bad("output", "missing: a record needs 'output' (or 'completion')")
    if not isinstance(output, str):
        raise bad("output", f"expected a string, got {type(output).__name__}")
    output = unfence(output)
    if not output.strip():
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
    feedback = unfence(feedback) if feedback and feedback.strip() else None

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
            context = json.loads(context)
        except json.JSONDecodeError:
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
        env_name=text("env_name"),
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


def _messages(value: list[Any], fld: str, bad: Any) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"{fld}[{i}]", "expected an object with 'role' and 'content'")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI multi-part content: keep the text parts
            parts = [p.get("text", "") for p in content if isinstance(p, dict)]
            content = "".join(parts) if all(isinstance(t, str) for t in parts) else None
        if not isinstance(content, str):
            raise bad(f"{fld}[{i}].content", "expected a string")
        out.append({"role": m["role"], "content": content})
    if not out:
        raise bad(fld, "is an empty list")
    return out


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
        value = unfence(value)
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
                d.feedback = unfence(str(ev.extra["feedback"]))
            if ev.extra.get("reason"):
                d.reason = str(ev.extra["reason"])
        else:
            d.feedback = ev.value
    return orphans


@dataclass
class Selection:
    decisions: list[Decision]
    dropped: dict[str, int]


def select(
    decisions: list[Decision],
    *,
    min_rating: float | None = None,
    min_reward: float | None = None,
    agent_types: list[str] | None = None,
    max_samples: int | None = None,
) -> Selection:
    """Apply the training filters; counts why records were dropped."""
    dropped = {"min_rating": 0, "min_reward": 0, "agent_types": 0, "max_samples": 0}
    kept = []
    wanted = set(agent_types or ())
    for d in decisions:
        if wanted and d.agent_type not in wanted:
            dropped["agent_types"] += 1
        elif min_rating is not None and (d.rating is None or d.rating < min_rating):
            dropped["min_rating"] += 1
        elif min_reward is not None and (d.reward is None or d.reward < min_reward):
            dropped["min_reward"] += 1
        else:
            kept.append(d)
    if max_samples is not None and len(kept) > max_samples:
        dropped["max_samples"] = len(kept) - max_samples
        kept = kept[:max_samples]
    return Selection(kept, dropped)


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
