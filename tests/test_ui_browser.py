"""The MLflow UI that `simtune ui` starts, looked at the way a person does: headless Chromium.

One SFT run on the tiny model (experiment `simtune-demo`, `train/loss` logged at every step,
a registered model), then the real `simtune ui` CLI on 127.0.0.1, then Debian's Chromium
driven through selenium checks what a user must be able to see: the experiment with its run,
the run's `train/loss` curve, and the registered model with its version. Screenshots land in
the test's temporary folder.

The browser comes from Debian (`scripts/install-browser.sh`, run by `make test`): selenium is
pointed at /usr/bin/chromedriver explicitly so that selenium-manager never tries to download
a driver (no network here). Where the browser cannot be had the test skips with the reason,
except under CI=true, where it fails: a skip there would hide a broken setup.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from conftest import REPO, SAMPLE, free_port, wait_http

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("SIMTUNE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SIMTUNE_CHROMEDRIVER", "/usr/bin/chromedriver"))
INSTALL_SCRIPT = REPO / "scripts" / "install-browser.sh"
INSTALL_LOG = Path("/tmp/simtune-install-browser.log")
EXPERIMENT = "simtune-demo"
STEPS = 6
# The SPA renders after several API round trips; on a loaded 2-core CI machine a page can
# take well over 10 s, so waits are generous (they return as soon as the condition holds).
PAGE_TIMEOUT = 90.0


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> NoReturn:
    """Skip on a developer's machine, fail in CI (where setup must have provided it)."""
    if _in_ci():
        log = INSTALL_LOG.read_text(errors="replace")[-2000:] if INSTALL_LOG.is_file() else ""
        pytest.fail(f"CI=true but {reason}\n{log}")
    pytest.skip(reason)


def _browser_present() -> bool:
    return all(p.is_file() and os.access(p, os.X_OK) for p in (CHROMIUM, CHROMEDRIVER))


@pytest.fixture(scope="module")
def browser_binaries() -> tuple[Path, Path]:
    if not _browser_present() and INSTALL_SCRIPT.is_file() and shutil.which("bash"):
        # `make test` has normally done this already; running plain pytest as root on
        # Debian gets the same install here. The script is a no-op when it cannot install.
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=False, timeout=600)
    if not _browser_present():
        _unavailable(
            f"{CHROMIUM} and {CHROMEDRIVER} are needed (Debian packages chromium and "
            "chromium-driver; scripts/install-browser.sh installs them as root)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable("selenium is not installed (it is in the `dev` extra)")
    return CHROMIUM, CHROMEDRIVER


@contextlib.contextmanager
def _chrome(chromium: Path, chromedriver: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # Chromium's sandbox refuses to run as root, which CI is
        "--disable-dev-shm-usage",  # a small /dev/shm in containers crashes tabs
        "--window-size=1600,1000",
        "--force-device-scale-factor=1",
        "--lang=en-US",
        "--no-first-run",
        "--disable-extensions",
    ):
        opts.add_argument(arg)
    # An explicit driver path makes selenium skip selenium-manager (which would try to
    # download a driver); SE_OFFLINE, set by the test, keeps it offline should that change.
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=str(chromedriver)))
    drv.set_page_load_timeout(PAGE_TIMEOUT)
    try:
        yield drv
    finally:
        drv.quit()


def _train(workspace: Path, model: Path) -> Any:
    from simtune import run_tuning

    return run_tuning(
        llm_path=str(model),
        dataset_path=[str(SAMPLE)],
        workspace=str(workspace),
        experiment_name=EXPERIMENT,
        max_steps=STEPS,
        logging_steps=1,  # one train/loss point per step: a curve, not a dot
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        lora_dropout=0.0,
        seed=0,
    )


@contextlib.contextmanager
def _ui(workspace: Path, log_path: Path) -> Iterator[str]:
    """`simtune ui` (the real console script) on the workspace, stopped cleanly afterwards."""
    port = free_port()
    exe = Path(sys.executable).with_name("simtune")
    # One uvicorn worker instead of MLflow's default four, and no background job runner
    # (it runs GenAI scorers, unused here): each is one more process importing MLflow, which
    # on a 2-core machine is most of the start-up time. One browser needs one worker.
    env = {
        **os.environ,
        "MLFLOW_WORKERS": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PYTHONWARNINGS": "ignore",
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(exe), "ui", "--workspace", str(workspace), "--host", "127.0.0.1"]
            + ["--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own group: simtune -> mlflow ui -> uvicorn
        )
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_http(url + "/health", timeout=120, proc=proc)
            except (RuntimeError, TimeoutError) as exc:
                pytest.fail(f"{exc}\n{log_path.read_text(errors='replace')[-3000:]}")
            yield url
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the whole group (`simtune ui` waits on `mlflow ui`, which runs uvicorn, and
    does not pass a signal on), wait for every member to exit, SIGKILL what is left."""
    deadline = time.monotonic() + grace
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=grace)


def _wait(drv: Any, what: str, cond: Any, timeout: float = PAGE_TIMEOUT) -> Any:
    """An explicit wait that says what it waited for and shows the page text on timeout."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # React re-renders replace DOM nodes under us; a stale node just means "look again".
    wait = WebDriverWait(
        drv, timeout, poll_frequency=0.25, ignored_exceptions=(StaleElementReferenceException,)
    )
    try:
        return wait.until(cond)
    except TimeoutException:
        text = _body_text(drv)
        pytest.fail(f"timed out after {timeout}s waiting for {what} at {drv.current_url}:\n{text}")


def _body_text(drv: Any) -> str:
    return drv.execute_script("return document.body ? document.body.innerText : ''") or ""


def _text_contains(*needles: str) -> Any:
    return lambda drv: all(n in _body_text(drv) for n in needles)


def _open(drv: Any, url: str, what: str, *needles: str) -> str:
    drv.get(url)
    _wait(drv, f"{what} showing {needles}", _text_contains(*needles))
    return _body_text(drv)


# Overlays MLflow opens on its own: the "MLflow Assistant" side panel (open by default, a
# third of the width) and the model registry's one-time "new Model Registry UI" promo modal,
# which covers the models table. A person closes them before looking; so does the test.
OVERLAY_CLOSE_BUTTONS = (
    'button[data-component-id="mlflow.assistant.chat_panel.close"], '
    '[role="dialog"] button.du-bois-light-modal-close'
)


def _unobstructed(drv: Any) -> bool:
    """Close whatever overlay is showing; true once no modal dialog is left on screen."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        ElementNotInteractableException,
    )
    from selenium.webdriver.common.by import By

    for button in drv.find_elements(By.CSS_SELECTOR, OVERLAY_CLOSE_BUTTONS):
        try:
            if button.is_displayed():
                button.click()
        except (ElementClickInterceptedException, ElementNotInteractableException):
            return False  # behind another overlay or mid-animation: try again next poll
    # The mask fades out after the dialog: wait for both, or the screenshot comes out grey.
    overlays = ".du-bois-light-modal-wrap, .du-bois-light-modal-mask"
    return not any(d.is_displayed() for d in drv.find_elements(By.CSS_SELECTOR, overlays))


def _screenshot(drv: Any, path: Path) -> None:
    _wait(drv, "MLflow's overlays to close", _unobstructed)
    assert drv.save_screenshot(str(path)), f"could not save {path}"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    # A blank 1600x1000 page compresses to a few KB; a rendered MLflow page is far larger.
    assert len(data) > 20_000, f"{path} is only {len(data)} bytes: nothing rendered?"


# The chart cards of MLflow's run charts; returns each visible card's text and, from its
# Plotly SVG, the line paths and the marker positions (one marker per logged step).
CHART_CARDS_JS = """
return Array.from(document.querySelectorAll('[data-testid="experiment-view-compare-runs-card"]'))
  .filter(card => card.offsetParent !== null)
  .map(card => ({
    text: card.innerText,
    lines: Array.from(card.querySelectorAll('path.js-line')).map(p => p.getAttribute('d') || ''),
    points: Array.from(card.querySelectorAll('path.point')).map(p => {
      const m = /translate\\(([-\\d.e]+)[ ,]+([-\\d.e]+)\\)/.exec(p.getAttribute('transform') || '');
      return m ? [parseFloat(m[1]), parseFloat(m[2])] : null;
    }).filter(xy => xy !== null),
  }));
"""


def _loss_chart(metric: str, steps: int) -> Any:
    def cond(drv: Any) -> dict | bool:
        for card in drv.execute_script(CHART_CARDS_JS):
            if f"({metric})" in card["text"] and len(card["points"]) >= steps and card["lines"]:
                return card
        return False

    return cond


def test_mlflow_ui_shows_experiment_run_loss_curve_and_registered_model(
    browser_binaries, tiny_model, workspace, tmp_path, monkeypatch
):
    import mlflow

    # Phase times are printed as they pass (pytest shows them on failure, or with -rP), to
    # tell a slow machine from a slow UI.
    t0 = time.monotonic()
    result = _train(workspace, tiny_model)
    print(f"trained in {time.monotonic() - t0:.1f}s")
    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    history = sorted(client.get_metric_history(result.run_id, "train/loss"), key=lambda m: m.step)
    assert len(history) == STEPS, "the run must log a curve for the UI to show"
    run_name = run.info.run_name
    model_name, version = result.registered_model_name, result.registered_model_version

    # The UI starts only once the run exists: both would otherwise create the sqlite
    # schema at once. The browser is only worth starting once there is something to see.
    monkeypatch.setenv("SE_OFFLINE", "true")
    with _ui(workspace, tmp_path / "ui.log") as url, _chrome(*browser_binaries) as drv:
        t_up = time.monotonic()
        print(f"UI and browser up in {t_up - t0:.1f}s from the start")
        # 1. The experiment's runs table, in the "Model training" layout: the experiment's
        #    name, its run and the model version registered from that run.
        exp = f"{url}/#/experiments/{result.experiment_id}"
        _open(
            drv,
            f"{exp}/runs?workflowType=machine_learning",
            "the experiment's runs",
            EXPERIMENT,
            run_name,
            model_name,
            "1 matching run",
        )
        _screenshot(drv, tmp_path / "experiment.png")

        # 2. The run's overview: its metrics table lists train/loss with the last value
        #    logged, and the registered model version it produced.
        last = history[-1].value
        text = _open(
            drv,
            f"{exp}/runs/{result.run_id}",
            "the run's overview",
            run_name,
            "train/loss",
            repr(last),  # JS and Python both print a double's shortest round-trip form
            model_name,
        )
        assert f"v{version}" in text
        # The metrics table scrolls; filter it as a person would, so that the screenshot
        # shows the train/loss row (and the filter is seen to work: its count drops to 1).
        _type_into(drv, 'input[placeholder="Search metrics"]', "train/loss")
        _wait(
            drv,
            "the metrics table filtered to train/loss",
            _text_contains("Metrics (1)", "train/loss", repr(last)),
        )
        _screenshot(drv, tmp_path / "run-overview.png")

        # 3. The run's metric charts, filtered to train/loss: a rendered Plotly line with
        #    one marker per logged step, ordered as the logged values are (lower loss is
        #    drawn lower, i.e. at a larger SVG y).
        card = _open_loss_chart(drv, f"{exp}/runs/{result.run_id}/model-metrics")
        _check_curve(card["points"], [m.value for m in history])
        _screenshot(drv, tmp_path / "run.png")

        # 4. The model registry: the model in the list with its latest version, then its
        #    page with the version and the simtune tags that tie it to the adapter.
        _open(drv, f"{url}/#/models", "the registered models", model_name, f"Version {version}")
        _screenshot(drv, tmp_path / "models.png")
        _open(
            drv,
            f"{url}/#/models/{model_name}",
            "the registered model's page",
            model_name,
            f"Version {version}",
            "simtune.model_id",
            result.model_id,
        )
        _screenshot(drv, tmp_path / "model.png")
        print(f"pages checked in {time.monotonic() - t_up:.1f}s")


def _type_into(drv: Any, css: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = _wait(drv, f"the input {css}", lambda d: d.find_element(By.CSS_SELECTOR, css))
    box.send_keys(text)


def _open_loss_chart(drv: Any, url: str) -> dict:
    drv.get(url)
    # Only the first chart section starts expanded; the chart search box filters every
    # section down to the matching charts and expands them.
    _type_into(drv, 'input[placeholder="Search metric charts"]', "train/loss")
    return _wait(
        drv, f"a rendered train/loss chart with {STEPS} points", _loss_chart("train/loss", STEPS)
    )


def _check_curve(points: list[list[float]], values: list[float]) -> None:
    assert len(points) == len(values), (points, values)
    xs = [x for x, _ in points]
    assert xs == sorted(xs), f"markers not in step order: {points}"
    span = max(values) - min(values)
    for i in range(len(values)):
        for j in range(len(values)):
            # Pairs whose values are within 2% of the range may be drawn a pixel apart
            # either way; every clearly different pair must be ordered the right way up.
            if values[i] - values[j] > 0.02 * span:
                assert points[i][1] < points[j][1], (
                    f"step {i + 1} (loss {values[i]:.4f}) is drawn below step {j + 1} "
                    f"(loss {values[j]:.4f}): {points}"
                )
    assert all(math.isfinite(c) for xy in points for c in xy)
