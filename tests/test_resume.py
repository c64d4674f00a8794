"""Resume after interruption (issue 6 item 2): checkpoints survive SIGTERM and SIGKILL,
`--resume` continues the same MLflow run to the same final step, and the registry never
holds an unfinished job."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, run_cli

# Each `simtune train` costs ~40 s of start-up (torch, transformers, MLflow) on the
# 2-core CI machine and a tiny-model step ~0.2 s, so the test chains SIGTERM -> resume
# -> SIGKILL -> resume on one job: three processes instead of four.
MAX_STEPS = 60
SAVE_STEPS = 5


def _args(tiny_model: Path, ws: Path) -> list[str]:
    return [
        "train",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(SAMPLE),
        "--workspace",
        str(ws),
        "--max_steps",
        str(MAX_STEPS),
        "--save_steps",
        str(SAVE_STEPS),
        "--per_device_train_batch_size",
        "1",
        "--max_length",
        "64",
    ]


def _checkpoint_steps(ws: Path) -> list[int]:
    found = ws.glob("jobs/*/checkpoints/checkpoint-*/trainer_state.json")
    return sorted(int(f.parent.name.split("-")[1]) for f in found)


def _start_and_wait_for_checkpoint(
    tiny_model: Path, ws: Path, *extra: str, after: int = 0
) -> subprocess.Popen:
    """Start `simtune train` and return once it has written a checkpoint past `after`
    (so it is inside the training loop)."""
    exe = Path(sys.executable).with_name("simtune")
    proc = subprocess.Popen(
        [str(exe), *_args(tiny_model, ws), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(step > after for step in _checkpoint_steps(ws)):
            return proc
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    pytest.fail(f"no checkpoint past step {after}: {proc.communicate()[1][-3000:]}")


def _runs(ws: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(ws / "mlflow.db") as con:
        return list(con.execute("select run_uuid, status from runs"))


def _loss_steps(ws: Path, run_id: str) -> list[int]:
    with sqlite3.connect(ws / "mlflow.db") as con:
        rows = con.execute(
            "select step from metrics where key = 'train/loss' and run_uuid = ?", (run_id,)
        )
        return sorted(r[0] for r in rows)


def _registry(ws: Path) -> list[dict]:
    from simtune.tracking.registry import Registry

    return Registry(ws).list()


def _assert_unpublished(ws: Path) -> None:
    assert _registry(ws) == []
    models = ws / "models"
    leftovers = [p.name for p in models.glob("*")] if models.exists() else []
    assert [n for n in leftovers if n != "registry.json.lock"] == []


def test_sigterm_resume_sigkill_resume_reaches_same_final_step(tiny_model, workspace):
    from simtune.training.job import latest_checkpoint

    # 1. SIGTERM: a checkpoint at the step it stopped at, run KILLED, exit 130.
    proc = _start_and_wait_for_checkpoint(tiny_model, workspace)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    [(run_id, status)] = _runs(workspace)
    assert status == "KILLED"
    [job_dir] = list((workspace / "jobs").iterdir())
    job = json.loads((job_dir / "job.json").read_text())
    assert job["run_id"] == run_id and job["status"] == "killed"
    ckpt = latest_checkpoint(job_dir)
    assert ckpt is not None
    first_stop = int(ckpt.name.split("-")[1])
    assert 0 < first_stop < MAX_STEPS
    assert first_stop == max(_loss_steps(workspace, run_id))
    _assert_unpublished(workspace)

    # 2. --resume continues the same run (RUNNING again); SIGKILL it after a new
    # checkpoint: the run stays RUNNING, the last checkpoint is what is left.
    proc = _start_and_wait_for_checkpoint(tiny_model, workspace, "--resume", after=first_stop)
    proc.kill()
    proc.communicate(timeout=60)
    assert _runs(workspace) == [(run_id, "RUNNING")]
    assert list((workspace / "jobs").iterdir()) == [job_dir]
    ckpt = latest_checkpoint(job_dir)
    assert ckpt is not None
    second_stop = int(ckpt.name.split("-")[1])
    assert first_stop < second_stop < MAX_STEPS
    _assert_unpublished(workspace)

    # 3. --resume to the end: same model id and run, FINISHED, registered, cleaned up.
    done = run_cli(*_args(tiny_model, workspace), "--resume", "--json", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["run_id"] == run_id and result["model_id"] == job["model_id"]
    assert result["metrics"]["global_step"] == MAX_STEPS
    assert _runs(workspace) == [(run_id, "FINISHED")]
    steps = _loss_steps(workspace, run_id)
    assert max(steps) == MAX_STEPS and set(steps) == set(range(1, MAX_STEPS + 1))
    # Every step up to the last checkpoint was logged once; only the steps the
    # SIGKILLed process trained after its last checkpoint were trained (and logged)
    # a second time.
    assert all(steps.count(s) == 1 for s in range(1, second_stop + 1)), steps
    assert len(steps) - MAX_STEPS <= MAX_STEPS - second_stop
    [entry] = _registry(workspace)
    assert entry["model_id"] == job["model_id"] and entry["mlflow"]["run_id"] == run_id
    assert Path(entry["path"]).is_dir()
    assert not job_dir.exists(), "checkpoints of a finished job are removed"


def test_resume_without_interrupted_job_is_a_usage_error(tiny_model, workspace):
    proc = run_cli(*_args(tiny_model, workspace), "--resume")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--resume: no interrupted sft job" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ppo_checkpoint_round_trips_state(tiny_model, tmp_path):
    """Unit level: adapter + value head, optimizer, scheduler, KL controller, RNGs and
    position survive save_checkpoint/load_checkpoint exactly."""
    import torch
    from transformers import get_scheduler

    from simtune.config import TuningConfig
    from simtune.training import ppo_math as pm
    from simtune.training.model import load_model, resolve_model
    from simtune.training.ppo import _PolicyAndValue, load_checkpoint, make_policy, save_checkpoint

    def build(seed: int):
        torch.manual_seed(seed)
        cfg = TuningConfig(llm_path=str(tiny_model), dataset_path=["x"])
        spec = resolve_model(str(tiny_model), tmp_path)
        module = _PolicyAndValue.build(
            make_policy(load_model(spec, trainable_adapter=True), cfg), None
        )
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
        return module, params, opt, sched, pm.AdaptiveKLController(0.05, 6.0, 100)

    module, params, opt, sched, kl = build(0)
    for _ in range(2):  # some optimizer state and a moved schedule
        sum((p.float() ** 2).sum() for p in params).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    kl.update(3.0, 8)
    rng = random.Random(1)
    rng.random()
    ckpt = save_checkpoint(tmp_path / "ck", 7, module, opt, sched, kl, rng, [3, 1], [{"a": 1.0}])
    expect_torch = torch.rand(3)
    expect_py = rng.random()

    module2, params2, opt2, sched2, kl2 = build(1)
    rng2 = random.Random(99)
    step, order, history = load_checkpoint(ckpt, module2, opt2, sched2, kl2, rng2)
    assert (step, order, history) == (7, [3, 1], [{"a": 1.0}])
    for p, q in zip(params, params2, strict=True):
        assert torch.equal(p, q)
    assert kl2.value == kl.value and sched2.get_last_lr() == sched.get_last_lr()
    state, state2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(state[k]["exp_avg"], state2[k]["exp_avg"]) for k in state)
    assert torch.equal(torch.rand(3), expect_torch) and rng2.random() == expect_py
