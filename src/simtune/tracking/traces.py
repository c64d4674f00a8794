"""MLflow traces <-> decision records (DESIGN.md §6). JSONL stays the record of truth.

`import_traces` (`simtune data import-traces`): users who already trace their agents with
MLflow (`mlflow.openai.autolog()`, `@mlflow.trace`) train on those traces. Each trace's
first chat-model span (span type CHAT_MODEL or LLM: request messages, response message,
model, start and end time) becomes one decision, written through the append-only writer
into a new file of ``envs/<env>/datasets/``. The trace id is the decision id, so a rerun
skips traces already imported (a trace imported once is not re-read when feedback is
added to it later: collected data is never rewritten). Feedback assessments
(`mlflow.log_feedback`) become scores: by default a feedback named ``reward`` is the
reward and one named ``rating`` the rating; `--feedback NAME=reward|rating` maps others.
A numeric value is kept as it is, a boolean (the UI's thumbs up/down) is 1.0/0.0, other
values are ignored; of several feedbacks with one name the latest valid one counts.

`mirror_traces` (`simtune data mirror-traces`): the other way, opt-in. One trace per
recorded decision of an env, in an experiment, so decisions can be browsed beside the
training runs: a CHAT_MODEL span with the decision's messages and answer (and its
timestamp and latency), trace tags ``simtune.decision_id``, ``simtune.env``,
``simtune.agent_id``/``agent_type``/``step``/``run_id`` where known, and the reward and
rating as feedback of those names. A rerun mirrors only decisions not mirrored yet;
decisions that came from traces (`import_traces`) are not mirrored back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from simtune.config.datasets import parse_feedback_map
from simtune.errors import ConfigError

log = logging.getLogger(__name__)

CHAT_SPAN_TYPES = ("CHAT_MODEL", "LLM")
SOURCE_ID = "simtune"
TAG_DECISION = "simtune.decision_id"
PAGE = 500


@contextlib.contextmanager
def _store(tracking_uri: str | None, workspace: Path, *, create: bool) -> Iterator[Any]:
    """An MlflowClient on the resolved store, with the fluent API pointed at it for the
    block (restored after). A missing sqlite store is an error unless `create`."""
    from simtune.tracking.tracker import (
        check_reachable,
        prepare_store,
        resolve_tracking_uri,
        sqlite_path,
    )

    uri = resolve_tracking_uri(tracking_uri, workspace)
    db = sqlite_path(uri)
    if not create and db is not None and not db.is_file():
        raise ConfigError(f"--tracking_uri: no MLflow store at {db}, so no traces to import")
    check_reachable(uri)
    prepare_store(uri)
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri)
    finally:
        mlflow.set_tracking_uri(previous)


def _all_traces(client: Any, experiment_id: str, run_id: str | None, spans: bool) -> list[Any]:
    out, token = [], None
    while True:
        page = client.search_traces(
            locations=[experiment_id],
            run_id=run_id,
            max_results=PAGE,
            page_token=token,
            include_spans=spans,
            order_by=["timestamp_ms ASC"],
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def _iso(ns: int | None) -> str | None:
    if not ns:
        return None
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat()


def _content(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else message
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _chat_span(trace: Any) -> Any | None:
    spans = [s for s in trace.data.spans if str(s.span_type) in CHAT_SPAN_TYPES]
    return min(spans, key=lambda s: s.start_time_ns or 0) if spans else None


def _answer(outputs: Any) -> str | None:
    if isinstance(outputs, str):
        return outputs
    if isinstance(outputs, dict):
        choices = outputs.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            first = choices[0]
            if "message" in first:
                return _content(first["message"])
            if "text" in first:
                return str(first["text"])
        if "content" in outputs:
            return _content(outputs)
    return None


def _score(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _scores(trace: Any, mapping: dict[str, str]) -> dict[str, float]:
    latest: dict[str, tuple[int, float]] = {}
    for a in trace.info.assessments or []:
        feedback = getattr(a, "feedback", None)
        score = mapping.get(a.name)
        if feedback is None or score is None or a.valid is False:
            continue
        value = _score(feedback.value)
        stamp = int(a.last_update_time_ms or a.create_time_ms or 0)
        if value is not None and stamp >= latest.get(score, (-1, 0.0))[0]:
            latest[score] = (stamp, value)
    return {k: v for k, (_, v) in latest.items()}


def trace_to_record(
    trace: Any, *, env: str, mapping: dict[str, str], experiment: str
) -> dict[str, Any] | None:
    """The decision record of one trace, or None when it holds no chat-model span."""
    span = _chat_span(trace)
    if span is None:
        return None
    inputs = span.inputs if isinstance(span.inputs, dict) else {}
    messages = inputs.get("messages")
    if isinstance(span.inputs, list):
        messages = span.inputs
    if not isinstance(messages, list) or not messages:
        return None
    answer = _answer(span.outputs)
    if answer is None:
        return None
    tags = trace.info.tags or {}
    outputs = span.outputs if isinstance(span.outputs, dict) else {}
    record: dict[str, Any] = {
        "decision_id": trace.info.trace_id,
        "env_name": env,
        "messages": [
            {"role": str(m.get("role", "user")), "content": _content(m)}
            for m in messages
            if isinstance(m, dict)
        ],
        "output": answer,
        "model": outputs.get("model") or inputs.get("model"),
        "timestamp": _iso(span.start_time_ns),
        "metadata": {
            "source": "mlflow-trace",
            "mlflow_trace_id": trace.info.trace_id,
            "mlflow_experiment": experiment,
        },
    }
    if span.start_time_ns and span.end_time_ns:
        record["latency_s"] = round((span.end_time_ns - span.start_time_ns) / 1e9, 6)
    run_id = (trace.info.request_metadata or {}).get("mlflow.sourceRun")
    if run_id:
        record["metadata"]["mlflow_run_id"] = run_id
    for key in ("agent_id", "agent_type", "run_id"):
        if tags.get(f"simtune.{key}"):
            record[key] = tags[f"simtune.{key}"]
    if str(tags.get("simtune.step", "")).isdigit():
        record["step"] = int(tags["simtune.step"])
    record.update(_scores(trace, mapping))
    return {k: v for k, v in record.items() if v is not None}


@dataclass
class ImportReport:
    imported: int = 0
    already: int = 0
    """traces imported by an earlier run (their id is a decision id of the env)"""
    not_chat: int = 0
    """traces without a chat-model span with messages and an answer"""
    with_reward: int = 0
    with_rating: int = 0
    path: str | None = None
    """the new decision file (None when nothing was imported)"""
    feedback: dict[str, str] = field(default_factory=dict)


def _known_ids(directory: Path) -> set[str]:
    from simtune.decisions.reader import read_dataset

    if not directory.is_dir():
        return set()
    return {d.decision_id for d in read_dataset([str(directory)], problems=[]).decisions}


def import_traces(
    *,
    experiment_name: str,
    env: str,
    workspace: str | Path | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    feedback: list[str] | None = None,
) -> ImportReport:
    """Traces of `experiment_name` (optionally of one run) -> decision records of `env`
    (see the module docstring)."""
    from simtune.config import resolve_workspace
    from simtune.decisions.writer import DecisionLog, datasets_dir

    ws = resolve_workspace(workspace)
    mapping = parse_feedback_map(feedback)
    directory = datasets_dir(ws, env)
    report = ImportReport(feedback=mapping)
    with _store(tracking_uri, ws, create=False) as client:
        exp = client.get_experiment_by_name(experiment_name)
        if exp is None:
            raise ConfigError(f"--experiment_name {experiment_name!r}: no such MLflow experiment")
        traces = _all_traces(client, exp.experiment_id, run_id, spans=True)
    known = _known_ids(directory)
    out = DecisionLog(directory)
    try:
        for trace in traces:
            if trace.info.trace_id in known:
                report.already += 1
                continue
            record = trace_to_record(trace, env=env, mapping=mapping, experiment=experiment_name)
            if record is None:
                report.not_chat += 1
                continue
            out.append(record)
            known.add(trace.info.trace_id)
            report.imported += 1
            report.with_reward += "reward" in record
            report.with_rating += "rating" in record
    finally:
        out.close()
    report.path = str(out.path) if out.path else None
    return report


@dataclass
class MirrorReport:
    mirrored: int = 0
    already: int = 0
    """decisions with a trace in the experiment already"""
    from_traces: int = 0
    """decisions that came from MLflow traces (not mirrored back)"""
    experiment_id: str = ""
    trace_ids: list[str] = field(default_factory=list)


def _ns(stamp: str | None) -> int | None:
    if not stamp:
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1e9)


def mirror_traces(
    *,
    env: str,
    experiment_name: str,
    workspace: str | Path | None = None,
    tracking_uri: str | None = None,
) -> MirrorReport:
    """One MLflow trace per decision of `env` not mirrored yet (see the module docstring)."""
    from simtune.config import resolve_workspace
    from simtune.decisions.reader import read_dataset
    from simtune.decisions.writer import datasets_dir

    ws = resolve_workspace(workspace)
    directory = datasets_dir(ws, env)
    if not directory.is_dir():
        raise ConfigError(f"--env {env}: no decisions in {directory}")
    decisions = read_dataset([str(directory)]).decisions
    report = MirrorReport()
    with _store(tracking_uri, ws, create=True) as client:
        import mlflow
        from mlflow.entities import AssessmentSource, SpanType

        exp = client.get_experiment_by_name(experiment_name)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment_name)
        report.experiment_id = exp_id
        done = {
            (t.info.tags or {}).get(TAG_DECISION)
            for t in _all_traces(client, exp_id, None, spans=False)
        }
        source = AssessmentSource(source_type="CODE", source_id=SOURCE_ID)
        for d in decisions:
            if (d.metadata or {}).get("mlflow_trace_id"):
                report.from_traces += 1
                continue
            if d.decision_id in done:
                report.already += 1
                continue
            tags = {TAG_DECISION: d.decision_id, "simtune.env": env}
            for key in ("agent_id", "agent_type", "run_id", "step"):
                if getattr(d, key) is not None:
                    tags[f"simtune.{key}"] = str(getattr(d, key))
            start = _ns(d.timestamp)
            end = start + int((d.latency_s or 0) * 1e9) if start else None
            span = mlflow.start_span_no_context(
                name=f"decision {d.agent_type or ''}".strip(),
                span_type=SpanType.CHAT_MODEL,
                inputs={"messages": d.chat_prompt(), "model": d.model},
                tags=tags,
                experiment_id=exp_id,
                start_time_ns=start,
            )
            answer = {"role": "assistant", "content": d.output}
            span.end(
                outputs={"model": d.model, "choices": [{"index": 0, "message": answer}]},
                end_time_ns=end,
            )
            report.trace_ids.append(span.trace_id)
            scores = {"reward": d.reward, "rating": d.rating}
            if any(v is not None for v in scores.values()):
                mlflow.flush_trace_async_logging()
                for name, value in scores.items():
                    if value is not None:
                        mlflow.log_feedback(
                            trace_id=span.trace_id, name=name, value=value, source=source
                        )
            report.mirrored += 1
            done.add(d.decision_id)
    return report
