"""Bad input: one line naming the problem, exit code 2, no traceback, nothing left behind."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import SAMPLE, free_port, run_cli


def assert_nothing_left(ws: Path) -> None:
    models = ws / "models"
    leftovers = [p.name for p in models.iterdir()] if models.exists() else []
    assert not [n for n in leftovers if n not in ("registry.json.lock",)], leftovers
    db = ws / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            statuses = [r[0] for r in con.execute("select status from runs")]
        assert "RUNNING" not in statuses and "FINISHED" not in statuses, statuses


def one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("simtune")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


CASES = {
    "missing file": (lambda d: d / "nope.jsonl", ["nope.jsonl", "no such file"]),
    "invalid json": (
        lambda d: write(d / "bad.jsonl", '{"prompt": "a", "output": "b"}\n{oops\n'),
        ["bad.jsonl:2", "invalid JSON"],
    ),
    "no prompt": (
        lambda d: write(d / "np.jsonl", '{"prompt": "a", "output": "b"}\n{"output": "b"}\n'),
        ["np.jsonl:2", "'prompt'"],
    ),
    "no output": (
        lambda d: write(d / "no.json", '[\n {"prompt": "a", "output": "b"},\n {"prompt": "a"}\n]'),
        ["no.json:3", "'output'"],
    ),
    "nan rating": (
        lambda d: write(d / "nan.jsonl", '{"prompt": "a", "output": "b", "rating": NaN}\n'),
        ["nan.jsonl:1", "'rating'"],
    ),
    "text reward": (
        lambda d: write(d / "tr.jsonl", '{"prompt": "a", "output": "b", "reward": "high"}\n'),
        ["tr.jsonl:1", "'reward'"],
    ),
    "empty dataset": (lambda d: write(d / "empty.jsonl", "\n\n"), ["empty.jsonl", "empty"]),
    # issue 14: each of these trained, or failed with a bare UnicodeEncodeError
    "unknown chat role": (
        lambda d: write(
            d / "role.jsonl", '{"messages": [{"role": "wizard", "content": "x"}], "output": "y"}\n'
        ),
        ["role.jsonl:1", "field 'messages[0].role'", "unknown role 'wizard'"],
    ),
    "lone surrogate": (
        lambda d: write(
            d / "sur.jsonl", '{"decision_id": "d1", "prompt": "a\\ud800b", "output": "y"}\n'
        ),
        ["sur.jsonl:1", "field 'prompt'", "lone surrogate"],
    ),
    "nan in metadata": (
        lambda d: write(
            d / "nanm.jsonl",
            '{"prompt": "a", "output": "b", "metadata": {"params": {"temperature": NaN}}}\n',
        ),
        ["nanm.jsonl:1", "field 'metadata.params.temperature'", "finite"],
    ),
    "nested too deep": (
        lambda d: write(
            d / "deep.jsonl",
            '{"prompt": "a", "output": "b", "metadata": ' + "[" * 975 + "]" * 975 + "}\n",
        ),
        ["deep.jsonl:1", "nested more than 100 levels deep"],
    ),
    "unreadable dir": (lambda d: (d / "sub").mkdir() or d / "sub", ["sub", "no decisions_"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_dataset(case, tmp_path, tiny_model, workspace):
    make, needles = CASES[case]
    data = make(tmp_path)
    proc = run_cli(
        "train",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(data),
        "--workspace",
        str(workspace),
    )
    one_line_error(proc, *needles)
    assert_nothing_left(workspace)
    assert not (workspace / "mlflow.db").exists() and not (workspace / "jobs").exists()


def test_offline_ppo_without_scores_names_the_file(tmp_path, tiny_model, workspace):
    data = write(tmp_path / "unscored.jsonl", '{"prompt": "a", "output": "b"}\n' * 3)
    before = sorted(p.name for p in workspace.iterdir())
    proc = run_cli(
        "train",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(data),
        "--tuning_mode",
        "ppo",
        "--workspace",
        str(workspace),
    )
    one_line_error(proc, f"{data}: no scored records for offline PPO")
    assert_nothing_left(workspace)
    assert sorted(p.name for p in workspace.iterdir()) == before  # nothing created


def test_zero_records_after_filters(tiny_model, workspace):
    proc = run_cli(
        "train",
        "--llm-path",
        str(tiny_model),
        "--dataset-path",
        str(SAMPLE),
        "--min-rating",
        "9",
        "--workspace",
        str(workspace),
    )
    one_line_error(proc, "no usable records", "min_rating: 48")
    assert_nothing_left(workspace)


def test_unknown_tuning_mode(tiny_model, workspace):
    proc = run_cli(
        "train",
        "--tuning_mode",
        "rlhf",  # dpo was the example until it became a mode
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(SAMPLE),
        "--workspace",
        str(workspace),
    )
    one_line_error(proc, "--tuning_mode")
    assert_nothing_left(workspace)


@pytest.mark.parametrize("kind", ["not a model", "pickle weights", "missing"])
def test_model_path_that_is_not_a_model(kind, tmp_path, tiny_model, workspace):
    path = tmp_path / "m"
    if kind == "not a model":
        path.mkdir()
        (path / "README.md").write_text("hi")
    elif kind == "pickle weights":
        shutil.copytree(tiny_model, path)
        (path / "model.safetensors").rename(path / "pytorch_model.bin")
    proc = run_cli(
        "train",
        "--llm_path",
        str(path),
        "--dataset_path",
        str(SAMPLE),
        "--workspace",
        str(workspace),
    )
    one_line_error(proc, "--llm_path")
    assert_nothing_left(workspace)


def test_unreachable_tracking_server(tiny_model, workspace):
    uri = f"http://127.0.0.1:{free_port()}"
    proc = run_cli(
        "train",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(SAMPLE),
        "--workspace",
        str(workspace),
        "--tracking_uri",
        uri,
    )
    one_line_error(proc, "--tracking_uri", uri)
    assert_nothing_left(workspace)


@pytest.mark.slow
def test_failure_during_training_marks_run_failed_and_registers_nothing(
    tmp_path, tiny_model, workspace
):
    """Weights that only break at load time fail inside the run: FAILED, nothing registered."""
    import mlflow

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    proc = run_cli(
        "train",
        "--llm_path",
        str(broken),
        "--dataset_path",
        str(SAMPLE),
        "--workspace",
        str(workspace),
    )
    one_line_error(proc, "--llm_path", "cannot load model")
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llm_tuning").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_registered_models() == []
    assert_nothing_left(workspace)


@pytest.mark.slow
def test_sigterm_marks_run_killed_and_leaves_nothing(tiny_model, workspace):
    import os
    import signal
    import subprocess
    import sys
    import time

    exe = Path(sys.executable).with_name("simtune")
    proc = subprocess.Popen(
        [
            str(exe),
            "train",
            "--llm_path",
            str(tiny_model),
            "--dataset_path",
            str(SAMPLE),
            "--workspace",
            str(workspace),
            "--max_steps",
            "100000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    db = workspace / "mlflow.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists() and list(workspace.glob("jobs/*/job.json")):
            break  # the MLflow run is open and training is starting
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    with sqlite3.connect(db) as con:
        assert [r[0] for r in con.execute("select status from runs")] == ["KILLED"]
    assert_nothing_left(workspace)
