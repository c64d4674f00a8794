"""make-tiny-model and ui: the commands a newcomer runs first (the demo: test_demo.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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
        assert _processes_mentioning(str(tmp_path))  # the server tree is running
        proc.send_signal(signal.SIGTERM)  # to simtune only, as a scheduler or `kill` would
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0
    assert f"http://127.0.0.1:{port}" in err.decode()
    assert (tmp_path / "mlflow.db").exists()
    # ...and it took the whole MLflow server tree (workers included) down with it.
    deadline = time.monotonic() + 20
    while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(str(tmp_path))


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # gone meanwhile
            continue
    return found
