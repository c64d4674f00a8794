"""Crash-consistent publication of a finished model, and the repair of a workspace a
killed job left behind.

Publishing a model takes several externally visible steps that no single rename can
cover: an MLflow model version (servable by `models:/NAME/VERSION` the moment it
exists), the adapter moved from `models/.staging-<id>` to `models/<id>`, an entry in
`models/registry.json`, and the run ended FINISHED. A SIGKILL between two of them used
to leave a servable version of a run that never finished, a run RUNNING forever and a
staging dir. So:

- A job records its owner (pid, host, process start time) in `jobs/<id>/job.json`
  while it runs, and writes `jobs/<id>/publish.json` (the intent: run, registered model
  name, final dir) atomically *before* the first visible step.
- The next `simtune train` (fresh or `--resume`), `simtune sync` and `simtune models`
  in the workspace call `recover_workspace`, which, for every job whose owner is gone:
  * rolls forward when the registry entry was written (the last step that matters):
    the run is set FINISHED and the job dir removed;
  * otherwise rolls back: every model version of that run under the intended name is
    deleted, a moved model dir without a registry entry removed, the run set KILLED
    with the reason in the tag `simtune.killed_reason`; the job dir stays when it holds
    a checkpoint (`--resume` continues it), else it goes;
  * a job killed while training (no intent) gets its run KILLED the same way.
  Staging dirs of jobs that no live process owns are removed.

The rule "roll back unless the registry entry exists" needs no record of which steps
ran: deleting versions found by run id covers a kill right after MLflow registered but
before anything could be written down. Deliberate simplification: a model killed during
publication is not finished from its staging dir (it is trained but unpublished); its
training resumes from the last checkpoint, or starts again.

`SIMTUNE_FAULT_AT=<point>` (tests only) SIGKILLs the process at a named point, so the
tests kill exactly where they mean to, with a real signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from simtune.training.job import (
    JOB_FILE,
    JOBS_DIR,
    keep_or_drop_job,
    owner_alive,
    read_job,
    read_json,
)

log = logging.getLogger(__name__)


INTENT_FILE = "publish.json"

KILLED_REASON_TAG = "simtune.killed_reason"


def fault_point(name: str) -> None:
    """Die here, by SIGKILL, when the test hook `SIMTUNE_FAULT_AT` names this point."""
    if os.environ.get("SIMTUNE_FAULT_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_intent(job_dir: Path, intent: dict[str, Any]) -> None:
    from simtune.util import write_json_atomic

    write_json_atomic(job_dir / INTENT_FILE, intent)


def recover_workspace(workspace: Path) -> list[dict[str, Any]]:
    """Finish or undo what killed jobs left in `workspace` (see the module docstring).
    Returns one dict per repaired job ({"model_id", "action": "rolled_forward" |
    "rolled_back" | "killed"}). Never raises for a store it cannot reach: it says so and
    leaves that job for a later command."""
    from filelock import FileLock, Timeout

    workspace = Path(workspace)
    jobs = workspace / JOBS_DIR
    staging = sorted((workspace / "models").glob(".staging-*"))
    if not jobs.is_dir() and not staging:
        return []
    done: list[dict[str, Any]] = []
    try:
        # Beside jobs/, not in it: jobs/ goes away once it holds no job.
        with FileLock(str(workspace / ".recover.lock"), timeout=30):
            live: set[str] = set()
            for job_file in sorted(jobs.glob(f"*/{JOB_FILE}")):
                job = read_job(job_file.parent)
                if job is None or job.get("status") != "running" or owner_alive(job):
                    live.add(job_file.parent.name)
                    continue
                try:
                    done.append(_recover_job(workspace, job_file.parent, job))
                except Exception as exc:  # a store down now: leave the job for later
                    log.warning("could not repair job %s yet: %s", job_file.parent.name, exc)
                    live.add(job_file.parent.name)
            for path in sorted((workspace / "models").glob(".staging-*")):
                if path.name.removeprefix(".staging-") not in live:
                    shutil.rmtree(path, ignore_errors=True)
    except Timeout:
        log.warning("another simtune command is repairing %s; not waiting for it", workspace)
    with contextlib.suppress(OSError):
        jobs.rmdir()  # `jobs/` only while it holds a job
    return done


def _recover_job(workspace: Path, job_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    from simtune.tracking.registry import Registry

    model_id = str(job["model_id"])
    intent = read_json(job_dir / INTENT_FILE)
    pid = (job.get("owner") or {}).get("pid")
    in_registry = any(e.get("model_id") == model_id for e in Registry(workspace).list())
    client = _client(job)  # one store check and client per job, not per step
    if intent is not None and in_registry and Path(intent["final_dir"]).is_dir():
        _end_run(client, job, "FINISHED", None)
        shutil.rmtree(job_dir, ignore_errors=True)
        log.warning(
            "%s: its process (pid %s) died after publishing it; the run is marked FINISHED",
            model_id,
            pid,
        )
        return {"model_id": model_id, "action": "rolled_forward"}
    reason = f"process {pid} died (SIGKILL or crash) " + (
        "while publishing the model" if intent is not None else "while training"
    )
    if intent is not None:
        _delete_versions(client, job, intent["registered_model_name"])
        final = Path(intent["final_dir"])
        if final.is_dir() and not in_registry:
            shutil.rmtree(final, ignore_errors=True)
        (job_dir / INTENT_FILE).unlink(missing_ok=True)
    _end_run(client, job, "KILLED", reason)
    keep_or_drop_job(job_dir, "killed")
    log.warning("%s: %s; its run is marked KILLED%s", model_id, reason, _resumable(job_dir))
    return {"model_id": model_id, "action": "rolled_back" if intent else "killed"}


def _resumable(job_dir: Path) -> str:
    return " (resume it with --resume)" if job_dir.is_dir() else ""


def _client(job: dict[str, Any]) -> Any:
    import mlflow

    from simtune.tracking.tracker import check_reachable, prepare_store

    uri = job["tracking_uri"]
    check_reachable(uri)
    prepare_store(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _end_run(client: Any, job: dict[str, Any], status: str, reason: str | None) -> None:
    if not job.get("run_id"):
        return
    run = client.get_run(job["run_id"])
    if run.info.status == "RUNNING":
        if reason:
            client.set_tag(job["run_id"], KILLED_REASON_TAG, reason)
        client.set_terminated(job["run_id"], status)


def _delete_versions(client: Any, job: dict[str, Any], name: str) -> None:
    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    for version in client.search_model_versions(f"name='{escaped}' and run_id='{job['run_id']}'"):
        client.delete_model_version(name, version.version)
        log.warning("deleted %s version %s of an unfinished job", name, version.version)
