"""MLflow run lifecycle, metric logging and model registration (DESIGN.md §6).

One run per job. The run is ended honestly: FINISHED, FAILED (any exception) or
KILLED (Ctrl-C).

Outages. The tracking server is checked before a job starts (`check_reachable`): a
server that is down then is a usage error (exit 2) and nothing is written. A server
that goes away *during* a job never stops the training:

- Metrics are only queued by `Tracker.log_metrics`; a background thread sends them in
  batches (`MlflowClient.log_batch`). When a send fails the metrics stay queued (in
  memory: training curves are small, so the queue is not bounded), one warning says
  so, and the thread retries with exponential backoff (1 s up to 30 s); one more line
  says when the server answers again. MLflow's own HTTP retries are lowered for the
  job (unless the user set `MLFLOW_HTTP_REQUEST_*`), so a dead server costs seconds
  per call, not MLflow's default of minutes.
- At the end of the job the queue is flushed with a bounded wait. If the server is
  still unreachable, the model registration, the artifact upload, unsent metrics and
  the run's final status are deferred: the model is still published locally
  (`models/<model_id>/` and a `models/registry.json` entry whose "mlflow" field says
  `"synced": false`), and `<workspace>/outbox/<model_id>.json` records what MLflow is
  still owed. The job succeeds; a warning names the command that delivers the rest:
  `simtune sync` (`sync_outbox` below), idempotent and resumable.
- Only unreachability is deferred: an error from a server that answers (a bad
  registered-model name, a permission error) still fails the job as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from simtune.errors import SimtuneError, TrackingError
from simtune.util import first_line, write_json_atomic

log = logging.getLogger(__name__)


# Trainer log keys that are per-run summaries, not curves.
_SUMMARY_KEYS = {
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "total_flos",
    "train_loss",
}


PARAM_VALUE_LIMIT = 500

OUTBOX_DIR = "outbox"

# MLflow's limits per log_batch request.
METRICS_PER_BATCH = 1000

PARAMS_PER_BATCH = 100

# Longest wait between two attempts of the metric sender while the server is down.
RETRY_MAX_S = 30.0

# How long the end of a job waits for queued metrics to reach the server.
FLUSH_TIMEOUT_S = 15.0

# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) keep one call to a dead
# server busy for minutes; these make it fail in about 3 s (connection refused) and
# bound a hung server to a few timeouts. Only applied where the user set nothing.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


_http_lock = threading.Lock()

_http_users = 0

_http_added: list[str] = []


_urllib3_log = logging.getLogger("urllib3.connectionpool")

_urllib3_level = _urllib3_log.level


@contextlib.contextmanager
def bounded_http_retries() -> Iterator[None]:
    """Lower MLflow's HTTP retry budget while the block runs (MLflow reads the variables
    on every request). Reference-counted, so overlapping jobs in one process restore
    the environment only when the last one leaves."""
    global _http_users
    with _http_lock:
        if _http_users == 0:
            _http_added[:] = [k for k in _HTTP_DEFAULTS if k not in os.environ]
            for key in _http_added:
                os.environ[key] = _HTTP_DEFAULTS[key]
            # urllib3 logs a warning per retried request; during an outage simtune says
            # it once itself.
            _urllib3_log.setLevel(max(_urllib3_log.level, logging.ERROR))
        _http_users += 1
    try:
        yield
    finally:
        with _http_lock:
            _http_users -= 1
            if _http_users == 0:
                for key in _http_added:
                    os.environ.pop(key, None)
                _http_added.clear()
                _urllib3_log.setLevel(_urllib3_level)


def embedded_uri(workspace: Path) -> str:
    """The workspace's own MLflow store: `<workspace>/mlflow.db`."""
    return f"sqlite:///{Path(workspace) / 'mlflow.db'}"


def resolve_tracking_uri(explicit: str | None, workspace: Path) -> str:
    """The tracking URI to use. A file store (``./mlruns``, a plain path or ``file:``:
    YuLan-OneSim's default) is accepted: MLflow 3 refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE`` is true (the store is in maintenance mode), so this sets
    that, with a warning saying so, unless the user set it false (then a clear error)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    uri = uri or embedded_uri(workspace)
    if is_file_store(uri):
        allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
        if allowed is not None and allowed.strip().lower() in ("0", "false", "no", "off"):
            raise TrackingError(
                f"--tracking_uri {uri}: a file store, but MLFLOW_ALLOW_FILE_STORE={allowed}; "
                "unset it, or use sqlite:///mlflow.db (`mlflow migrate-filestore` converts "
                "an existing ./mlruns)"
            )
        if allowed is None:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
            log.warning(
                "--tracking_uri %s: MLflow's file store is in maintenance mode (no new "
                "features); using it (MLFLOW_ALLOW_FILE_STORE=true). sqlite:///mlflow.db is "
                "the supported store; `mlflow migrate-filestore` converts ./mlruns",
                uri,
            )
    return uri


def is_file_store(uri: str) -> bool:
    """A local-directory (file store) tracking URI: a path (``./mlruns``) or ``file:``."""
    if uri.startswith("file:"):
        return True
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return not scheme and ":" not in uri.split("/", 1)[0]


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for any other store)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def prepare_store(uri: str) -> None:
    """Make sure a sqlite store exists, fully migrated, before MLflow opens it.

    MLflow creates and migrates a missing sqlite database in whichever process opens it
    first, with no lock: N jobs started together on a fresh workspace all migrate at
    once ("duplicate column name", "_alembic_tmp_* already exists") and leave a
    half-migrated file that every later job trips over. Here creation happens under a
    lock beside the database (`mlflow.db.lock`), in a temporary file that is renamed
    into place only once every table exists: the store is either absent or complete,
    even if the creating process is killed. An existing store is opened once under the
    same lock, so a broken one gives one line naming the file and the fix instead of an
    alembic traceback in every job. Costs one extra open of the database per job.
    """
    path = sqlite_path(uri)
    if path is None or path.name == ":memory:":
        return
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=600):
        if path.is_file() and path.stat().st_size > 0:
            problem = _sqlite_store_problem(uri)
            if problem:
                raise TrackingError(
                    f"{path}: MLflow store is not usable ({problem}). If a job was killed "
                    f"while an older simtune created it, move it aside; if it comes from an "
                    f"older MLflow, back it up and run `mlflow db upgrade {uri}`"
                )
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        os.close(fd)
        try:
            _open_sqlite_store(f"sqlite:///{tmp}")
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)


def _sqlite_store_problem(uri: str) -> str | None:
    """Why an existing sqlite store cannot be used as it is, or None. Read-only: MLflow's
    own open would try to migrate a store with missing tables, changing the file."""
    import sqlalchemy
    from mlflow.store.db import utils as db_utils

    engine = sqlalchemy.create_engine(uri)
    try:
        if not db_utils._all_tables_exist(engine):
            return "some of MLflow's tables are missing: a creation or migration was cut short"
        current, head = db_utils._get_schema_version(engine), db_utils._get_latest_schema_revision()
        if current != head:
            return f"schema version {current}, this MLflow needs {head}"
    except Exception as exc:
        return first_line(exc)
    finally:
        engine.dispose()
    return None


def _open_sqlite_store(uri: str) -> None:
    """Open (creating and migrating if empty) the tracking and registry tables of `uri`."""
    from mlflow.store.model_registry.sqlalchemy_store import (
        SqlAlchemyStore as RegistryStore,
    )
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = sqlite_path(uri)
    assert path is not None
    store = SqlAlchemyStore(uri, (path.parent / "mlruns").as_uri())
    registry = RegistryStore(uri)
    for engine in {store.engine, registry.engine}:
        engine.dispose()  # a temporary file is renamed next: no connection may stay open


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any training) when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http only)
            resp.read(64)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingError(
                f"--tracking_uri: MLflow server at {uri} answered {exc.code}"
            ) from None
        # 401/403/404: a server is there (auth, or a proxy without /health); let MLflow talk.
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"--tracking_uri: cannot reach MLflow server at {uri} ({reason})"
        ) from None


def unreachable_reason(uri: str) -> str | None:
    """Why the server at `uri` is down, or None when it answers (or is no server)."""
    try:
        check_reachable(uri, timeout=3.0)
    except TrackingError as exc:
        text = str(exc)
        prefix = f"--tracking_uri: cannot reach MLflow server at {uri} ("
        return text[len(prefix) : -1] if text.startswith(prefix) else text.split(": ", 1)[-1]
    return None


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in config.items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        out[key] = text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."
    return out


class _MetricSender:
    """Sends queued metrics from a background thread; keeps them while MLflow is down.

    Only this thread (or the caller of `close`, after the thread stopped) removes
    metrics from the queue, and only after the server accepted them."""

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri
        self.down_reason: str | None = None
        self._queue: list[tuple[str, float, int, int]] = []  # key, value, timestamp ms, step
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._delay = 0.0
        self._thread = threading.Thread(
            target=self._loop, name="simtune-mlflow-metrics", daemon=True
        )
        self._thread.start()

    def add(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        with self._lock:
            self._queue.extend((k, float(v), stamp, int(step)) for k, v in metrics.items())
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.down_reason is None:
                self._wake.wait()
            else:
                # Down: new metrics must not trigger a retry each; wait out the backoff.
                self._stop.wait(self._delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._send_all()

    def _send_all(self) -> bool:
        """Send everything queued; False when the server did not take it (kept)."""
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        while True:
            with self._lock:
                batch = self._queue[:METRICS_PER_BATCH]
            if not batch:
                return True
            try:
                self.client.log_batch(
                    self.run_id, metrics=[Metric(*m) for m in batch], synchronous=True
                )
            except Exception as exc:
                code = exc.get_http_status_code() if isinstance(exc, MlflowException) else 500
                if 400 <= code < 500 and code != 429:
                    # The server answered and refused these values: resending cannot help.
                    log.error("MLflow refused %d metric(s): %s", len(batch), first_line(exc))
                    with self._lock:
                        del self._queue[: len(batch)]
                    continue
                self._failed(exc)
                return False
            with self._lock:
                del self._queue[: len(batch)]  # `add` only appends: the head is this batch
            if self.down_reason is not None:
                log.info("MLflow server at %s reachable again; sending buffered metrics", self.uri)
                self.down_reason = None
            self._delay = 0.0

    def _failed(self, exc: BaseException) -> None:
        self._delay = min(max(1.0, self._delay * 2), RETRY_MAX_S)
        if self.down_reason is None:
            self.down_reason = unreachable_reason(self.uri) or first_line(exc)[:200]
            with self._lock:
                queued = len(self._queue)
            log.warning(
                "MLflow server at %s unreachable (%s); %d metric(s) buffered, retrying every "
                "%d-%d s; training continues",
                self.uri,
                self.down_reason,
                queued,
                1,
                int(RETRY_MAX_S),
            )

    def close(self, timeout: float) -> list[tuple[str, float, int, int]]:
        """Stop the thread, try once more to send what is queued; return what is left."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._send_all()
        # A thread still stuck in a request (hung server) may deliver its batch later;
        # a sync then sends those points again, which MLflow stores as duplicates.
        with self._lock:
            return list(self._queue)


class Tracker:
    """Owns one MLflow run: start, log, register, end (deferring to the outbox in an
    outage, see the module docstring)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        workspace: Path,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.on_step = on_step
        import mlflow

        self.mlflow = mlflow
        self.uri = tracking_uri
        self.workspace = workspace
        self.experiment_name = experiment_name
        prepare_store(tracking_uri)
        self.client = mlflow.MlflowClient(tracking_uri)
        with bounded_http_retries():
            self.experiment_id = self._experiment(experiment_name)
        self.run_id: str | None = None
        self.resumed = False
        self.outbox: Path | None = None  # set when the job ended with MLflow owed something
        self._sender: _MetricSender | None = None
        self._offline: str | None = None  # why end-of-job calls are being deferred
        self._params: dict[str, str] = {}
        self._run_name = ""
        self._tags: dict[str, str] = {}
        self._deferred_registration: dict[str, Any] | None = None
        self._deferred_artifacts: list[dict[str, str]] = []

    @property
    def synced(self) -> bool:
        """False once this job had to leave something for `simtune sync`."""
        return (
            self.outbox is None
            and self._deferred_registration is None
            and not self._deferred_artifacts
        )

    def _experiment(self, name: str) -> str:
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            location = None
            db = sqlite_path(self.uri)
            if db is not None and db.resolve() == (self.workspace / "mlflow.db").resolve():
                # Embedded store: keep artifacts beside the database in the workspace,
                # not in ./mlruns of whatever directory the job was started from.
                location = (self.workspace / "mlruns").as_uri()
            return self.client.create_experiment(name, artifact_location=location)
        except Exception as exc:
            if isinstance(exc, TrackingError):
                raise
            raise TrackingError(
                f"--tracking_uri: MLflow at {self.uri} failed: {first_line(exc)}"
            ) from None

    @contextlib.contextmanager
    def run(
        self, run_name: str, tags: dict[str, str], *, resume_run_id: str | None = None
    ) -> Iterator[str]:
        """Open the job's run (or reopen `resume_run_id`, an interrupted job's run, which
        goes RUNNING again) and end it FINISHED, FAILED or KILLED. `self.resumed` tells
        whether the old run was reopened; when it is gone (deleted, another store) a new
        run is started instead and the job's history is split over two runs."""
        mlflow = self.mlflow
        # MLflow's fluent API (start_run, log_model) reads a process-global URI, and
        # set_tracking_uri also exports MLFLOW_TRACKING_URI. Restore both afterwards so
        # a later job in the same process (or its subprocesses) is not silently
        # pointed at this job's store.
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        status = "FAILED"
        self._run_name, self._tags = run_name, dict(tags)
        try:
            with bounded_http_retries():
                self.resumed = False
                if resume_run_id and self._reopenable(resume_run_id):
                    run = mlflow.start_run(run_id=resume_run_id)
                    self.resumed = True
                else:
                    if resume_run_id:
                        log.warning(
                            "MLflow run %s of the interrupted job is not in experiment %s of "
                            "%s; logging the resumed job to a new run",
                            resume_run_id,
                            self.experiment_id,
                            self.uri,
                        )
                    run = mlflow.start_run(
                        experiment_id=self.experiment_id, run_name=run_name, tags=tags
                    )
                self.run_id = run.info.run_id
                self._sender = _MetricSender(self.client, self.run_id, self.uri)
                try:
                    yield self.run_id
                    status = "FINISHED"
                except KeyboardInterrupt:
                    status = "KILLED"
                    raise
                finally:
                    self._end(status)
        finally:
            mlflow.set_tracking_uri(previous)  # None unsets the variable again

    def _end(self, status: str) -> None:
        """Flush, end the run; whatever the server could not take goes to the outbox."""
        mlflow = self.mlflow
        assert self._sender is not None
        left = self._sender.close(FLUSH_TIMEOUT_S)
        if status != "FINISHED":
            # Nothing of an unfinished job may look usable: no deferred registration.
            self._deferred_registration, self._deferred_artifacts = None, []
        down = self._offline or self._sender.down_reason
        with contextlib.suppress(Exception):
            mlflow.flush_async_logging()
        ended = False
        try:
            # end_run pops the local active run before it calls the server, so even a
            # failed call leaves no run open in this process.
            mlflow.end_run(status=status)
            ended = True
        except Exception as exc:
            why = unreachable_reason(self.uri)
            if why is None:
                raise
            down = down or why
            log.debug("end_run failed: %s", first_line(exc))
        if ended and not left and self.synced:
            return
        self._write_outbox(status, ended, left, down or "unknown")

    def _write_outbox(
        self, status: str, ended: bool, metrics: list[tuple[str, float, int, int]], why: str
    ) -> None:
        model_id = self._tags.get("simtune.model_id") or str(self.run_id)
        path = outbox_path(self.workspace, model_id)
        record = {
            "format": 1,
            "model_id": model_id,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "reason": why,
            "tracking_uri": self.uri,
            "experiment_name": self.experiment_name,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "run_name": self._run_name,
            "tags": self._tags,
            "params": self._params,
            "status": status,
            "run_ended": ended,
            "metrics": [list(m) for m in metrics],
            "artifacts": self._deferred_artifacts,
            "registration": self._deferred_registration,
        }
        from simtune.tracking.registry import Registry

        def unsynced(entry: dict[str, Any]) -> None:
            entry.setdefault("mlflow", {}).update(synced=False, outbox=str(path))

        try:
            Registry(self.workspace).update(model_id, unsynced)
            record["published"] = True
        except SimtuneError:  # no entry: the job failed, nothing was published
            record["published"] = False
        write_json_atomic(path, record)
        self.outbox = path
        log.warning(
            "MLflow server at %s unreachable (%s): run %s%s is kept locally in %s; send it "
            "with `simtune sync --workspace %s` once the server is back",
            self.uri,
            why,
            self.run_id,
            "" if self._deferred_registration is None else " and its model registration",
            path,
            self.workspace,
        )

    def _reopenable(self, run_id: str) -> bool:
        try:
            info = self.client.get_run(run_id).info
        except Exception:
            return False
        return info.experiment_id == self.experiment_id and info.lifecycle_stage == "active"

    def log_params(self, params: dict[str, Any]) -> None:
        flat = flat_params(params)
        self._params.update(flat)  # a sync that must recreate the run logs them again
        self.mlflow.log_params(flat)

    def log_dataset(self, stats: dict[str, Any]) -> None:
        numeric = {
            f"dataset/{k}": float(v)
            for k, v in stats.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
        }
        numeric.update({f"dataset/dropped_{k}": float(v) for k, v in stats["dropped"].items()})
        self.mlflow.log_metrics(numeric, step=0)
        names = [Path(f["path"]).name for f in stats["files"]]
        hashes = [f["sha256"][:16] for f in stats["files"]]
        extra = flat_params({"dataset.files": names, "dataset.sha256": hashes})
        self._params.update(extra)
        self.mlflow.log_params(extra)
        self.mlflow.log_dict(stats, "dataset_stats.json")
        # The run's Datasets panel (and `run.inputs`): which files, by content hash.
        self.mlflow.log_input(
            training_dataset(stats["files"]),
            context="training",
            tags={
                "simtune.num_records": str(stats.get("num_records", "")),
                "simtune.num_used": str(stats.get("num_used", "")),
            },
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics for the sender thread: never waits for MLflow."""
        if self._sender is None:
            raise RuntimeError("log_metrics outside Tracker.run")
        self._sender.add(metrics, step)
        if self.on_step is not None:
            with contextlib.suppress(Exception):  # a progress display must never fail a job
                self.on_step(int(step))

    def log_final_metrics(self, metrics: dict[str, float]) -> None:
        """The job's summary metrics (`final/<name>`), queued like the curves."""
        if self._sender is None:
            raise RuntimeError("log_final_metrics outside Tracker.run")
        self._sender.add({f"final/{k}": v for k, v in metrics.items()}, 0)

    def _defer(self, what: str, exc: BaseException) -> bool:
        """True (and offline from now on) when `exc` came from an unreachable server."""
        if self._offline is None:
            why = unreachable_reason(self.uri)
            if why is None:
                return False
            self._offline = why
            log.warning(
                "MLflow server at %s unreachable (%s) at the end of the job: %s deferred; "
                "the model is kept locally",
                self.uri,
                why,
                what,
            )
            log.debug("deferred after: %s", first_line(exc))
        return True

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        if self._offline is None:
            try:
                self.mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)
                return
            except Exception as exc:
                if not self._defer("artifact upload", exc):
                    raise
        self._deferred_artifacts.append(
            {"local_dir": str(local_dir), "artifact_path": artifact_path or ""}
        )

    def moved(self, old: Path, new: Path) -> None:
        """The adapter left its staging dir: deferred uploads follow it."""
        old_s, new_s = str(old), str(new)
        for item in self._deferred_artifacts:
            if item["local_dir"] == old_s:
                item["local_dir"] = new_s
        if self._deferred_registration and self._deferred_registration["adapter_dir"] == old_s:
            self._deferred_registration["adapter_dir"] = new_s

    def register(
        self,
        adapter_dir: Path,
        *,
        name: str,
        base_model: str,
        base_is_local: bool,
        tags: dict[str, str],
        task: str = "generate",
        extra_config: dict[str, Any] | None = None,
    ) -> tuple[str, str]:
        """Log the adapter as a pyfunc model and register it; returns (version, model_uri),
        or ("", "") when the server is unreachable and the registration is deferred."""
        request = {
            "adapter_dir": str(adapter_dir),
            "name": name,
            "base_model": base_model,
            "base_is_local": base_is_local,
            "tags": dict(tags),
            "task": task,
            "extra_config": dict(extra_config or {}),
        }
        if self._offline is None:
            try:
                return log_registered_model(self.mlflow, self.client, **request)
            except Exception as exc:
                if not self._defer("model registration", exc):
                    raise
        self._deferred_registration = {**request, "version": "", "model_uri": ""}
        return "", ""

    def metrics_callback(self) -> Any:
        """A transformers TrainerCallback that sends each log to this run with its step."""
        from transformers import TrainerCallback

        tracker = self

        class MlflowStepLogger(TrainerCallback):
            def on_log(
                self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any
            ) -> None:
                if not state.is_world_process_zero or not logs:
                    return
                curves, summary = {}, {}
                for key, value in logs.items():
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        continue
                    if key in _SUMMARY_KEYS:
                        summary[f"summary/{key}"] = float(value)
                    else:
                        curves[f"train/{key}"] = float(value)
                if curves:
                    tracker.log_metrics(curves, step=state.global_step)
                if summary:
                    tracker.log_metrics(summary, step=state.global_step)

        return MlflowStepLogger()


def training_dataset(files: list[dict[str, Any]]) -> Any:
    """An MLflow dataset (metadata only: the decisions stay in their JSONL files) for the
    decision files a job trained on: source = the files' URIs, digest = a sha256 over
    their sha256s (so the same files in the same order give the same digest), name = the
    file, or the folder holding them all."""
    import hashlib

    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    class DecisionFiles(DatasetSource):
        """simtune decision files (JSONL/JSON) on the training machine's disk."""

        def __init__(self, uris: list[str]) -> None:
            self.uris = list(uris)

        @staticmethod
        def _get_source_type() -> str:
            return "simtune_decisions"

        def load(self, **kwargs: Any) -> list[str]:
            return self.uris

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> DecisionFiles:
            raise NotImplementedError

        def to_dict(self) -> dict[str, Any]:
            return {"uris": self.uris}

        @classmethod
        def from_dict(cls, source_dict: dict[str, Any]) -> DecisionFiles:
            return cls(source_dict.get("uris") or [])

    paths = [Path(f["path"]).resolve() for f in files]
    digest = hashlib.sha256("\n".join(f["sha256"] for f in files).encode()).hexdigest()[:32]
    if len(paths) == 1:
        name = paths[0].name
    else:
        common = Path(os.path.commonpath([str(p) for p in paths])) if paths else Path()
        name = "/".join(common.parts[-2:]) or "decisions"
    return MetaDataset(DecisionFiles([p.as_uri() for p in paths]), name=name[:200], digest=digest)


def log_registered_model(
    mlflow: Any,
    client: Any,
    *,
    adapter_dir: str,
    name: str,
    base_model: str,
    base_is_local: bool,
    tags: dict[str, str],
    task: str,
    extra_config: dict[str, Any],
) -> tuple[str, str]:
    """Log an adapter as a pyfunc model in the active run and register it."""
    info = mlflow.pyfunc.log_model(
        name="model",
        # Models-from-code: MLflow copies this file instead of pickling an object.
        python_model=str(Path(__file__).with_name("pyfunc.py")),
        artifacts={"adapter": str(adapter_dir)},
        model_config={
            "base_model": base_model,
            "base_model_is_local": base_is_local,
            "task": task,
            **extra_config,
        },
        # Explicit requirements: inferring them would load the model in a subprocess.
        pip_requirements=_requirements(),
        registered_model_name=name,
        await_registration_for=60,
    )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return version, f"models:/{name}/{version}"


def outbox_path(workspace: Path, model_id: str) -> Path:
    from simtune.util import check_name

    return Path(workspace) / OUTBOX_DIR / f"{check_name(model_id)}.json"


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "transformers", "peft", "mlflow", "simtune"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def run_status(tracking_uri: str, run_id: str) -> str:
    import mlflow

    return mlflow.MlflowClient(tracking_uri).get_run(run_id).info.status


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)
