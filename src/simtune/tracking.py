"""MLflow run lifecycle, metric logging and model registration (DESIGN.md §6).

One run per job. The run is ended honestly: FINISHED, FAILED (any exception) or
KILLED (Ctrl-C). Metrics are logged asynchronously with their optimizer step, so
logging never stalls a training step; the queue is flushed before the run ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from simtune.errors import TrackingError

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


def resolve_tracking_uri(explicit: str | None, workspace: Path) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{workspace / 'mlflow.db'}"


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


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in config.items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        out[key] = text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."
    return out


class Tracker:
    """Owns one MLflow run: start, log, register, end."""

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
        self.client = mlflow.MlflowClient(tracking_uri)
        self.experiment_id = self._experiment(experiment_name)
        self.run_id: str | None = None
        self.resumed = False

    def _experiment(self, name: str) -> str:
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            location = None
            if self.uri.startswith("sqlite:") and self.uri.endswith(
                str(self.workspace / "mlflow.db")
            ):
                # Embedded store: keep artifacts beside the database in the workspace,
                # not in ./mlruns of whatever directory the job was started from.
                location = (self.workspace / "mlruns").as_uri()
            return self.client.create_experiment(name, artifact_location=location)
        except Exception as exc:
            if isinstance(exc, TrackingError):
                raise
            raise TrackingError(
                f"--tracking_uri: MLflow at {self.uri} failed: {_first_line(exc)}"
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
        try:
            self.resumed = False
            if resume_run_id and self._reopenable(resume_run_id):
                run = mlflow.start_run(run_id=resume_run_id)
                self.resumed = True
            else:
                if resume_run_id:
                    log.warning(
                        "MLflow run %s of the interrupted job is not in experiment %s of %s; "
                        "logging the resumed job to a new run",
                        resume_run_id,
                        self.experiment_id,
                        self.uri,
                    )
                run = mlflow.start_run(
                    experiment_id=self.experiment_id, run_name=run_name, tags=tags
                )
            self.run_id = run.info.run_id
            try:
                yield self.run_id
                status = "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            finally:
                with contextlib.suppress(Exception):
                    mlflow.flush_async_logging()
                mlflow.end_run(status=status)
        finally:
            mlflow.set_tracking_uri(previous)  # None unsets the variable again

    def _reopenable(self, run_id: str) -> bool:
        try:
            info = self.client.get_run(run_id).info
        except Exception:
            return False
        return info.experiment_id == self.experiment_id and info.lifecycle_stage == "active"

    def log_params(self, params: dict[str, Any]) -> None:
        self.mlflow.log_params(flat_params(params))

    def log_dataset(self, stats: dict[str, Any]) -> None:
        numeric = {
            f"dataset/{k}": float(v)
            for k, v in stats.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
        }
        numeric.update({f"dataset/dropped_{k}": float(v) for k, v in stats["dropped"].items()})
        self.mlflow.log_metrics(numeric, step=0)
        self.mlflow.log_params(
            {
                "dataset.files": flat_params({"f": [Path(f["path"]).name for f in stats["files"]]})[
                    "f"
                ],
                "dataset.sha256": flat_params({"h": [f["sha256"][:16] for f in stats["files"]]})[
                    "h"
                ],
            }
        )
        self.mlflow.log_dict(stats, "dataset_stats.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step, synchronous=False)
        if self.on_step is not None:
            with contextlib.suppress(Exception):  # a progress display must never fail a job
                self.on_step(int(step))

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)

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
        """Log the adapter as a pyfunc model and register it; returns (version, model_uri)."""
        info = self.mlflow.pyfunc.log_model(
            name="model",
            # Models-from-code: MLflow copies this file instead of pickling an object.
            python_model=str(Path(__file__).with_name("pyfunc.py")),
            artifacts={"adapter": str(adapter_dir)},
            model_config={
                "base_model": base_model,
                "base_model_is_local": base_is_local,
                "task": task,
                **(extra_config or {}),
            },
            # Explicit requirements: inferring them would load the model in a subprocess.
            pip_requirements=_requirements(),
            registered_model_name=name,
            await_registration_for=60,
        )
        version = str(info.registered_model_version)
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)
        return version, f"models:/{name}/{version}"

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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)
