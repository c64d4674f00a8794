"""Faults a workspace must survive (issue 14): concurrent first use of a fresh MLflow
store, a SIGKILL at every step of a model's publication, and names and numbers refused
before any work. Real `simtune train` processes, real signals, the real sqlite store."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE, run_cli

TRAIN = ("--max_steps", "1", "--logging_steps", "1", "--per_device_train_batch_size", "2")


def _train_cmd(tiny_model: Path, ws: Path, *extra: str) -> list[str]:
    exe = str(Path(sys.executable).with_name("simtune"))
    return [
        exe,
        "train",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(SAMPLE),
        "--workspace",
        str(ws),
        "--precision",
        "fp32",
        *TRAIN,
        *extra,
    ]


@pytest.mark.slow
def test_concurrent_jobs_on_a_fresh_workspace_all_succeed(tiny_model, tmp_path):
    import mlflow

    ws = tmp_path / "ws"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            _train_cmd(tiny_model, ws, "--run_name", f"job{i}", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(4)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llm_tuning").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"job{i}" for i in range(4)]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert not list(ws.glob(".mlflow.db-*.tmp"))


def test_a_broken_store_is_one_line_and_untouched(tiny_model, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    db = ws / "mlflow.db"
    # What a migration killed half-way leaves: some of MLflow's tables, no alembic head.
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        conn.execute("INSERT INTO alembic_version VALUES ('451aebb31d03')")
    before = db.read_bytes()
    proc = run_cli(*_train_cmd(tiny_model, ws)[1:])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("simtune: error:")]
    assert len(errors) == 1 and f"{db}: MLflow store is not usable" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert db.read_bytes() == before
    assert not (ws / "models").exists() and not (ws / "jobs").exists()


def _registry(ws: Path) -> list[str]:
    path = ws / "models" / "registry.json"
    if not path.is_file():
        return []
    return [m["model_id"] for m in json.loads(path.read_text())["models"]]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--experiment_name", "../../x"], "--experiment_name: '../../x' is not a usable name"),
        (["--experiment_name", "a\\b"], "--experiment_name: 'a\\\\b' is not a usable name"),
        (["--registered_model_name", "../x"], "--registered_model_name: '../x' is not a usable"),
        (["--registered_model_name", "a/b"], "--registered_model_name: 'a/b' may not contain"),
        (["--run_name", " "], "--run_name: must not be empty"),
        (["--max_steps", "-5"], "--max_steps: must be a positive number of steps"),
        (["--max_steps", "0"], "--max_steps: must be a positive number of steps"),
        (["--seed", "-1"], "--seed: must be in [0, 2**32)"),
        (["--learning_rate", "nan"], "--learning_rate: must be a positive number"),
        (["--lora_r", "0"], "--lora_r: must be a positive number"),
        (["--save_steps", "-2"], "--save_steps: must be >= 0"),
    ],
)
def test_names_and_numbers_are_refused_before_any_work(flags, message, tiny_model, tmp_path):
    ws = tmp_path / "ws"
    proc = run_cli(*_train_cmd(tiny_model, ws, *flags)[1:], timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("simtune: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not ws.exists()


def _state(ws: Path) -> dict:
    """Everything a half-published model could leave: MLflow versions and run statuses,
    model dirs, registry entries, staging dirs, job dirs."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llm_tuning")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return {
        "versions": [
            (v.name, v.version, v.run_id) for v in client.search_model_versions("name LIKE '%'")
        ],
        "runs": {r.info.run_id: (r.info.status, r.data.tags) for r in runs},
        "model_dirs": sorted(
            p.name for p in (ws / "models").glob("*") if p.is_dir() and not p.name.startswith(".")
        ),
        "registry": _registry(ws),
        "staging": sorted(p.name for p in ws.glob("models/.staging-*")),
        "jobs": sorted(p.name for p in ws.glob("jobs/*") if p.is_dir()),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "published"),
    [
        ("before_register", False),
        ("after_register", False),
        ("after_move", False),
        ("after_registry", True),
    ],
)
def test_sigkill_during_publication_is_finished_or_undone(point, published, tiny_model, tmp_path):
    ws = tmp_path / "ws"
    killed = subprocess.run(
        _train_cmd(tiny_model, ws),
        env={**os.environ, "SIMTUNE_FAULT_AT": point, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = _state(ws)
    (run_id,) = left["runs"]
    assert left["runs"][run_id][0] == "RUNNING"  # what the kill leaves, before repair
    if point != "before_register":
        assert [v[2] for v in left["versions"]] == [run_id]  # servable, unfinished

    # The next command in the workspace repairs it (here: `simtune models list`).
    proc = run_cli("models", "--workspace", str(ws), "list")
    assert proc.returncode == 0, proc.stderr
    after = _state(ws)
    status, tags = after["runs"][run_id]
    assert after["staging"] == [] and after["jobs"] == []
    if published:
        assert status == "FINISHED"
        assert len(after["versions"]) == 1 and after["versions"][0][2] == run_id
        assert after["registry"] == after["model_dirs"] and len(after["registry"]) == 1
    else:
        assert status == "KILLED"
        assert "died" in tags["simtune.killed_reason"]
        assert after["versions"] == [] and after["registry"] == [] and after["model_dirs"] == []

    if point == "after_register":
        # And the workspace works: a new job publishes normally next to it.
        ok = run_cli(*_train_cmd(tiny_model, ws, "--json")[1:])
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert len(_state(ws)["registry"]) == 1


@pytest.mark.slow
def test_a_job_killed_while_training_is_marked_killed_and_resumable(tiny_model, tmp_path):
    ws = tmp_path / "ws"
    # Checkpoint at step 1, die before publishing: a resumable job with a RUNNING run.
    cmd = _train_cmd(tiny_model, ws, "--save_steps", "1")
    killed = subprocess.run(
        cmd,
        env={**os.environ, "SIMTUNE_FAULT_AT": "before_register", "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(*cmd[1:], "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = _state(ws)
    statuses = sorted(s for s, _ in after["runs"].values())
    # The same run reopened and finished (it was KILLED in between, not left RUNNING).
    assert statuses == ["FINISHED"], after["runs"]
    assert len(after["registry"]) == 1 and after["staging"] == [] and after["jobs"] == []
