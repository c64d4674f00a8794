"""make-tiny-model, ui and demo: the commands a newcomer runs first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, run_cli, wait_http


def test_make_tiny_model_writes_a_loadable_chat_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = run_cli("make-tiny-model", str(tmp_path / "tiny"))
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert 10_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    assert not list((tmp_path / "tiny").glob("*.bin"))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "求职 jobs?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok("求职 jobs?")["input_ids"]
    assert tok.decode(ids) == "求职 jobs?"  # byte-level: any UTF-8 round-trips


@pytest.mark.slow
def test_ui_serves_the_workspace_store(tmp_path):
    port = free_port()
    exe = Path(sys.executable).with_name("simtune")
    proc = subprocess.Popen(
        [str(exe), "ui", "--workspace", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert "MLflow" in resp.read().decode("utf-8", "replace")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in err.decode()
    assert (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_demo_trains_registers_and_says_where_to_look(tmp_path):
    import mlflow

    ws = tmp_path / "demo"
    proc = run_cli("demo", "--workspace", str(ws), "--num_train_epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = json.loads((ws / "models" / "registry.json").read_text())["models"]
    assert len(entries) == 1
    model_id = entries[0]["model_id"]
    for needle in (model_id, "simtune ui", "models:/simtune-demo-sft/1"):
        assert needle in " ".join(proc.stdout.split()), needle
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    run = client.get_run(entries[0]["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses[-1] < losses[0]
