"""Regenerate docs/images/mlflow-run.png: the MLflow UI showing one simtune run.

    .venv/bin/python scripts/docs_screenshot.py [--out docs/images/mlflow-run.png]

Trains a tiny SFT run (the tiny random model, the bundled sample decisions) into a
temporary workspace, starts `simtune ui` on it, opens the run's page in headless
Chromium (Debian's chromium + chromedriver, as tests/test_ui_browser.py uses) at
1280x900 and saves a screenshot. No network is needed. Not run by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "simtune" / "data" / "sample_decisions.jsonl"
CHROMIUM = os.environ.get("SIMTUNE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SIMTUNE_CHROMEDRIVER", "/usr/bin/chromedriver")
EXPERIMENT = "market"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def body_text(drv) -> str:
    return drv.execute_script("return document.body ? document.body.innerText : ''") or ""


def wait_for(drv, cond, timeout: float = 120.0):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(
        drv, timeout, poll_frequency=0.5, ignored_exceptions=(StaleElementReferenceException,)
    ).until(cond)


def close_overlays(drv) -> bool:
    from selenium.webdriver.common.by import By

    css = (
        'button[data-component-id="mlflow.assistant.chat_panel.close"], '
        '[role="dialog"] button.du-bois-light-modal-close'
    )
    for button in drv.find_elements(By.CSS_SELECTOR, css):
        with contextlib.suppress(Exception):
            if button.is_displayed():
                button.click()
    masks = ".du-bois-light-modal-wrap, .du-bois-light-modal-mask"
    return not any(d.is_displayed() for d in drv.find_elements(By.CSS_SELECTOR, masks))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "images" / "mlflow-run.png"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["SE_OFFLINE"] = "true"

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from simtune import run_tuning
    from simtune.training.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        model = make_tiny_model(Path(tmp) / "model")
        result = run_tuning(
            tuning_mode="sft",
            llm_path=str(model),
            dataset_path=[str(SAMPLE)],
            workspace=str(ws),
            experiment_name=EXPERIMENT,
            max_steps=12,
            logging_steps=1,
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            warmup_ratio=0.0,
            lr_scheduler_type="constant",
        )
        port = free_port()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        exe = Path(sys.executable).with_name("simtune")
        proc = subprocess.Popen(
            [str(exe), "ui", "--workspace", str(ws), "--port", str(port)],
            env=env,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health", proc)
            opts = webdriver.ChromeOptions()
            opts.binary_location = CHROMIUM
            for arg in (
                "--headless=new",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                "--force-device-scale-factor=1",
                "--lang=en-US",
            ):
                opts.add_argument(arg)
            drv = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
            try:
                drv.set_page_load_timeout(120)
                run_url = f"{url}/#/experiments/{result.experiment_id}/runs/{result.run_id}"
                drv.get(run_url)
                needles = (result.model_id, "train/loss", result.registered_model_name)
                wait_for(drv, lambda d: all(n in body_text(d) for n in needles))
                wait_for(drv, close_overlays)
                time.sleep(2)
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                drv.save_screenshot(str(out))
            finally:
                drv.quit()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    size = Path(args.out).stat().st_size
    sys.stdout.write(f"wrote {args.out} ({size // 1024} KB) of run {result.run_id}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
