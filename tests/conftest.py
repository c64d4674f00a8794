"""Shared fixtures: offline env, a tiny model, per-test workspaces, a real MLflow server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Tests never touch the network (DESIGN.md §9).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("SIMTUNE_HOME", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures" / "onesim"
SAMPLE = REPO / "src" / "simtune" / "data" / "sample_decisions.jsonl"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simtune.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def stub():
    """A scripted OpenAI-compatible model server on loopback (`StubLLM`), per module."""
    from simtune.testing.stub_llm import StubLLM

    with StubLLM() as llm:
        yield llm


@pytest.fixture(scope="module")
def tiny_server(tiny_model: Path):
    """A real `simtune serve` (`Server` over an `Engine`) of the tiny model, on CPU in
    fp32, answering at most 4 tokens; per module."""
    from simtune.serving.engine import Engine
    from simtune.serving.server import Server

    engine = Engine.load([str(tiny_model)], max_new_tokens=4, device="cpu", precision="fp32")
    try:
        with Server(engine) as srv:
            yield srv
    finally:
        engine.close()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A fresh workspace (own embedded MLflow store) per test."""
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture
def onesim(tmp_path: Path) -> Path:
    """The seed simulator's sample files, copied so nothing can write next to them."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(
            f"shared fixtures not present at {SHARED_FIXTURES} (only in the team's checkout)"
        )
    dst = tmp_path / "onesim"
    dst.mkdir()
    for f in SHARED_FIXTURES.glob("*.json"):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(autouse=True)
def _no_run_left_open():
    """Fail any test that leaves an MLflow run active (MLflow's own test suite does this),
    and undo a test's mlflow.set_tracking_uri, which would leak into later tests and
    their subprocesses through MLFLOW_TRACKING_URI."""
    yield
    if "mlflow" in sys.modules:
        import mlflow

        run = mlflow.active_run()
        if run is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        if run is not None:
            pytest.fail(f"test left MLflow run {run.info.run_id} open")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 240.0, proc: subprocess.Popen | None = None) -> None:
    # Generous: `mlflow ui`/`mlflow server` migrate a fresh sqlite store before they
    # answer, which took over 90 s on a 2-core machine under load. A server that dies
    # is caught at once by `proc.poll()`, so the long wait only costs time when it hangs.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 with its own sqlite store, per test module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", proc=proc)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError((root / "server.log").read_text()[-3000:]) from None
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the real `simtune` console script in a subprocess."""
    exe = Path(sys.executable).with_name("simtune")
    return subprocess.run(
        [str(exe), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
