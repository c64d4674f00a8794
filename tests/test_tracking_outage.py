"""A real `mlflow server` killed mid-training: the job finishes, the model is kept
locally with an outbox record, and `simtune sync` delivers it once the server is back."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, free_port, run_cli, wait_http

MAX_STEPS = 8
KILL_AT = 3


class Server:
    """A real MLflow server on a fixed port and store, so it can be killed and restarted."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # The GenAI job runner only costs start-up time here.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        log.close()
        try:
            wait_http(self.uri + "/health", proc=self.proc)
        except Exception:
            self.kill()
            raise RuntimeError((self.root / "server.log").read_text()[-3000:]) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "mlflow-server"
    root.mkdir()
    srv = Server(root)
    yield srv
    srv.kill()


@pytest.mark.slow
def test_server_killed_mid_training_then_sync(server, tiny_model, workspace, caplog):
    import mlflow

    from simtune import run_tuning

    server.start()
    killed_at: list[int] = []

    def progress(step: int) -> None:
        if step >= KILL_AT and not killed_at:
            server.kill()
            killed_at.append(step)

    caplog.set_level(logging.INFO, logger="simtune")
    started = time.monotonic()
    result = run_tuning(
        llm_path=str(tiny_model),
        dataset_path=[str(SAMPLE)],
        workspace=str(workspace),
        tracking_uri=server.uri,
        max_steps=MAX_STEPS,
        logging_steps=1,
        per_device_train_batch_size=8,
        seed=0,
        progress=progress,
    )
    job_s = time.monotonic() - started
    assert killed_at == [KILL_AT]
    assert mlflow.active_run() is None
    # MLflow's retries were bounded: the dead server cost seconds, not minutes.
    assert job_s < 60, job_s

    # Training finished; the model is published locally but not synced.
    assert not result.synced and result.registered_model_version == ""
    model_dir = Path(result.adapter_path)
    assert (model_dir / "adapter_model.safetensors").is_file()
    registry = json.loads((workspace / "models" / "registry.json").read_text())
    (entry,) = registry["models"]
    assert entry["model_id"] == result.model_id
    assert entry["mlflow"]["synced"] is False
    outbox = workspace / "outbox" / f"{result.model_id}.json"
    assert entry["mlflow"]["outbox"] == str(outbox)
    record = json.loads(outbox.read_text())
    assert record["run_id"] == result.run_id and record["status"] == "FINISHED"
    assert record["registration"]["adapter_dir"] == str(model_dir)
    assert {m[3] for m in record["metrics"] if m[0] == "train/loss"} >= set(
        range(KILL_AT + 1, MAX_STEPS + 1)
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("metric(s) buffered" in w for w in warnings) == 1, warnings
    assert any("simtune sync --workspace" in w for w in warnings), warnings

    # Sync while the server is still down: one error line, outbox untouched.
    before = outbox.read_bytes()
    down = run_cli("sync", "--workspace", str(workspace), timeout=120)
    assert down.returncode == 2, down.stderr
    assert "cannot reach MLflow server" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert outbox.read_bytes() == before

    # Server back on the same port and store: sync delivers everything.
    server.start()
    done = run_cli("sync", "--workspace", str(workspace), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"synced {result.model_id}" in done.stdout
    assert not outbox.exists()

    client = mlflow.MlflowClient(server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(result.run_id, "train/loss")}
    assert steps == set(range(1, MAX_STEPS + 1))
    assert "final/train_loss" in run.data.metrics
    versions = client.search_model_versions(f"run_id='{result.run_id}'")
    assert len(versions) == 1
    version = versions[0]
    assert version.tags["simtune.model_id"] == result.model_id
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "adapter")}
    assert "adapter/simtune.json" in artifacts

    entry = json.loads((workspace / "models" / "registry.json").read_text())["models"][0]
    assert entry["mlflow"]["synced"] is True and "outbox" not in entry["mlflow"]
    assert entry["mlflow"]["registered_model_version"] == version.version
    meta = json.loads((model_dir / "simtune.json").read_text())
    assert meta["mlflow"]["model_uri"] == f"models:/{version.name}/{version.version}"

    mlflow.set_tracking_uri(server.uri)  # the autouse fixture unsets it again
    model = mlflow.pyfunc.load_model(meta["mlflow"]["model_uri"])
    assert model.metadata.get_model_info().flavors

    again = run_cli("sync", "--workspace", str(workspace), timeout=120)
    assert again.returncode == 0 and "nothing to sync" in again.stdout


def test_sync_with_nothing_to_do(workspace):
    out = run_cli("sync", "--workspace", str(workspace), timeout=60)
    assert out.returncode == 0 and "nothing to sync" in out.stdout, out.stderr
