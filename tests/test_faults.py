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
