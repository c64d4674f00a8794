"""MLflow traces <-> decisions: `data import-traces` reads real traces (made by
mlflow.openai.autolog on the official openai client, feedback by mlflow.log_feedback) into
decision records with their scores; `data mirror-traces` writes one trace per decision,
tagged with its id, its scores as feedback. Real sqlite stores, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SAMPLE, run_cli

openai = pytest.importorskip("openai")


def _store(ws: Path) -> str:
    from simtune.tracking.tracker import prepare_store

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    prepare_store(uri)
    return uri


def _traced_calls(uri: str, stub_url: str) -> list[str]:
    """Three autologged chat calls, one plain span; feedback on two calls."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("agents")
    mlflow.openai.autolog()
    try:
        client = openai.OpenAI(base_url=stub_url, api_key="x", max_retries=0)
        ids = []
        for i in range(3):
            client.chat.completions.create(
                model="stub-model",
                messages=[
                    {"role": "system", "content": "You are a job seeker."},
                    {"role": "user", "content": f"Round {i}: how many jobs do you apply to?"},
                ],
            )
            ids.append(mlflow.get_last_active_trace_id())
    finally:
        mlflow.openai.autolog(disable=True)
    with mlflow.start_span("not a chat call") as span:
        span.set_inputs({"x": 1})
    mlflow.flush_trace_async_logging()
    mlflow.log_feedback(trace_id=ids[0], name="reward", value=0.5)
    mlflow.log_feedback(trace_id=ids[1], name="thumbs", value=True)
    mlflow.log_feedback(trace_id=ids[1], name="reward", value=-1)
    mlflow.log_feedback(trace_id=ids[1], name="reward", value=2.0)  # the latest counts
    mlflow.set_tracking_uri(None)
    return ids


def test_import_traces_keeps_messages_answers_and_scores(stub, workspace):
    from simtune.decisions.reader import read_dataset

    ids = _traced_calls(_store(workspace), stub.url)
    args = ("data", "import-traces", "--env", "agents", "--experiment_name", "agents")
    ws = ("--workspace", str(workspace))
    r = run_cli(*args, "--feedback", "thumbs=rating", *ws, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["imported"], report["not_chat"], report["already"]) == (3, 1, 0)
    assert (report["with_reward"], report["with_rating"]) == (2, 1)

    folder = workspace / "envs" / "agents" / "datasets"
    (path,) = folder.glob("decisions_*.jsonl")
    decisions = {d.decision_id: d for d in read_dataset([str(folder)]).decisions}
    assert set(decisions) == set(ids)
    first, second, third = (decisions[i] for i in ids)
    assert first.messages[0] == {"role": "system", "content": "You are a job seeker."}
    assert first.messages[1]["content"] == "Round 0: how many jobs do you apply to?"
    assert first.output and first.model and first.timestamp and first.latency_s is not None
    assert first.env_name == "agents" and first.metadata["mlflow_trace_id"] == ids[0]
    assert (first.reward, first.rating) == (0.5, None)
    assert (second.reward, second.rating) == (2.0, 1.0)
    assert (third.reward, third.rating) == (None, None)
    r = run_cli("data", "validate", "--env", "agents", *ws)
    assert r.returncode == 0, r.stdout + r.stderr

    # A rerun imports nothing and writes no file; a bad experiment or mapping: one line, 2.
    r = run_cli(*args, *ws)
    assert r.returncode == 0 and "imported 0 trace(s)" in r.stdout, r.stderr
    assert "skipped 3 already imported" in r.stdout
    assert list(folder.glob("decisions_*.jsonl")) == [path]
    for bad, message in (
        (("--experiment_name", "nope"), "--experiment_name 'nope': no such MLflow experiment"),
        (("--experiment_name", "agents", "--feedback", "x=loss"), "--feedback 'x=loss'"),
    ):
        r = run_cli("data", "import-traces", "--env", "agents", *bad, *ws)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    empty = workspace.parent / "empty"
    empty.mkdir()
    r = run_cli(*args, "--workspace", str(empty))
    assert r.returncode == 2 and "no MLflow store" in r.stderr
    assert not (empty / "mlflow.db").exists()


def test_mirror_traces_tags_each_decision_and_logs_its_scores(workspace):
    import mlflow

    from simtune.decisions.reader import read_dataset

    folder = workspace / "envs" / "market" / "datasets"
    folder.mkdir(parents=True)
    lines = SAMPLE.read_text().splitlines()[:5]
    (folder / "decisions_sample.jsonl").write_text("\n".join(lines) + "\n")
    before = (folder / "decisions_sample.jsonl").read_bytes()
    decisions = {d.decision_id: d for d in read_dataset([str(folder)]).decisions}
    ws = ("--workspace", str(workspace))
    r = run_cli(
        "data", "mirror-traces", "--env", "market", "--experiment_name", "decisions", *ws, "--json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mirrored"] == 5

    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("decisions")
    traces = client.search_traces(locations=[exp.experiment_id], max_results=100)
    assert len(traces) == 5
    for t in traces:
        d = decisions[t.info.tags["simtune.decision_id"]]
        assert t.info.tags["simtune.env"] == "market"
        assert t.info.tags["simtune.agent_type"] == d.agent_type
        scores = {a.name: a.feedback.value for a in t.info.assessments}
        want = {k: v for k, v in (("reward", d.reward), ("rating", d.rating)) if v is not None}
        assert scores == want and want
        (span,) = t.data.spans
        assert span.inputs["messages"] == d.chat_prompt()
        assert span.outputs["choices"][0]["message"]["content"] == d.output
    r = run_cli("data", "mirror-traces", "--env", "market", "--experiment_name", "decisions", *ws)
    assert r.returncode == 0 and "mirrored 0 decision(s)" in r.stdout, r.stderr
    assert len(client.search_traces(locations=[exp.experiment_id])) == 5
    assert (folder / "decisions_sample.jsonl").read_bytes() == before
    assert list(folder.iterdir()) == [folder / "decisions_sample.jsonl"]
