"""The outbox: what a job could not log to an unreachable tracking server is kept as one
JSON file per job under <workspace>/outbox/ and replayed by `simtune sync` (run,
metrics, model version, registry entries), each step done at most once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from simtune.errors import SimtuneError, TrackingError
from simtune.tracking.tracker import (
    METRICS_PER_BATCH,
    OUTBOX_DIR,
    PARAMS_PER_BATCH,
    bounded_http_retries,
    check_reachable,
    log_registered_model,
    unreachable_reason,
)
from simtune.util import first_line, write_json_atomic

log = logging.getLogger(__name__)


def pending_syncs(workspace: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The outbox records of a workspace, oldest first."""
    out = []
    for path in sorted((Path(workspace) / OUTBOX_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SimtuneError(f"{path}: unreadable outbox record ({exc})") from None
        out.append((path, record))
    return sorted(out, key=lambda item: str(item[1].get("created_at", "")))


def sync_outbox(
    workspace: Path, tracking_uri: str | None = None, *, lock_timeout: float = 0.0
) -> list[dict[str, Any]]:
    """Send every outbox record of `workspace` to MLflow (`simtune sync`).

    Per record: reopen its run (or, when that run is not on the server, create one in
    its experiment and log the saved params), log the buffered metrics, register the
    model, upload the adapter artifacts, update the registry entry (synced), end the run
    with the job's status, delete the record. Each finished step is written back to the
    record first, so an interrupted sync resumes without registering twice. Raises
    TrackingError, before touching a record, when its server does not answer. Returns
    one result dict per record ({"model_id", "status": "synced"|"locked"|"failed", ...}).
    """
    from filelock import FileLock, Timeout

    results = []
    for path, record in pending_syncs(workspace):
        uri = tracking_uri or record["tracking_uri"]
        check_reachable(uri)
        lock = FileLock(str(path) + ".lock", timeout=lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            results.append({"model_id": record["model_id"], "status": "locked"})
            continue
        try:
            if not path.is_file():  # another sync finished it meanwhile
                continue
            record = json.loads(path.read_text(encoding="utf-8"))
            try:
                results.append(_sync_one(Path(workspace), path, record, uri))
            except Exception as exc:
                if isinstance(exc, TrackingError) or unreachable_reason(uri):
                    raise TrackingError(
                        f"MLflow server at {uri} went away while syncing "
                        f"{record['model_id']}; progress is saved in {path}, run "
                        "`simtune sync` again"
                    ) from None
                log.error("sync of %s failed: %s", record["model_id"], first_line(exc))
                results.append(
                    {
                        "model_id": record["model_id"],
                        "status": "failed",
                        "error": first_line(exc),
                    }
                )
        finally:
            lock.release()
            Path(lock.lock_file).unlink(missing_ok=True)
    return results


def _sync_one(workspace: Path, path: Path, rec: dict[str, Any], uri: str) -> dict[str, Any]:
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient(uri)

    def save() -> None:
        write_json_atomic(path, rec)

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # log_model is fluent API only
    try:
        with bounded_http_retries():
            run_id = rec.get("synced_run_id") or rec["run_id"]
            if not _run_exists(client, run_id):
                exp = client.get_experiment_by_name(rec["experiment_name"])
                exp_id = (
                    exp.experiment_id if exp else client.create_experiment(rec["experiment_name"])
                )
                if exp is not None and exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp_id)
                run_id = client.create_run(
                    exp_id, run_name=rec.get("run_name") or None, tags=rec.get("tags") or {}
                ).info.run_id
                params = [Param(k, str(v)) for k, v in (rec.get("params") or {}).items()]
                for i in range(0, len(params), PARAMS_PER_BATCH):
                    client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])
                log.warning(
                    "run %s is not on %s: created run %s for %s (its earlier history stays "
                    "where it was)",
                    rec["run_id"],
                    uri,
                    run_id,
                    rec["model_id"],
                )
                rec["synced_run_id"] = run_id
                rec["run_ended"] = False
                save()

            while rec["metrics"]:
                batch = rec["metrics"][:METRICS_PER_BATCH]
                client.log_batch(run_id, metrics=[Metric(*m) for m in batch], synchronous=True)
                rec["metrics"] = rec["metrics"][len(batch) :]
                save()

            reg = rec.get("registration")
            if reg and not reg.get("version"):
                reg["version"], reg["model_uri"] = _register_once(mlflow, client, run_id, reg)
                save()

            model_dir = reg["adapter_dir"] if reg else None
            if rec["artifacts"]:
                model_dir = rec["artifacts"][0]["local_dir"]
            if model_dir and rec.get("published"):
                _update_model_meta(Path(model_dir) / "simtune.json", rec, run_id, uri)
            while rec["artifacts"]:
                item = rec["artifacts"][0]
                client.log_artifacts(run_id, item["local_dir"], item["artifact_path"] or None)
                rec["artifacts"] = rec["artifacts"][1:]
                save()

            if rec.get("published") and not rec.get("registry_done"):
                _update_registry(workspace, rec, run_id, uri)
                rec["registry_done"] = True
                save()

            client.set_terminated(run_id, rec["status"])
    finally:
        mlflow.set_tracking_uri(previous)
    path.unlink()
    log.info("synced %s to %s (run %s)", rec["model_id"], uri, run_id)
    return {
        "model_id": rec["model_id"],
        "status": "synced",
        "run_id": run_id,
        "run_status": rec["status"],
        "registered_model_name": reg["name"] if reg else "",
        "registered_model_version": reg["version"] if reg else "",
        "model_uri": reg["model_uri"] if reg else "",
    }


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as exc:
        if exc.get_http_status_code() == 404 or "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return False
        raise


def _register_once(mlflow: Any, client: Any, run_id: str, reg: dict[str, Any]) -> tuple[str, str]:
    """Register the deferred model, unless an interrupted sync already did (a version of
    that name from this run exists)."""
    found = client.search_model_versions(f"name='{reg['name']}' and run_id='{run_id}'")
    if found:
        version = str(max(int(v.version) for v in found))
        for key, value in reg["tags"].items():
            client.set_model_version_tag(reg["name"], version, key, value)
        return version, f"models:/{reg['name']}/{version}"
    request = {k: reg[k] for k in ("adapter_dir", "name", "base_model", "base_is_local", "tags")}
    request.update(task=reg["task"], extra_config=reg["extra_config"])
    mlflow.start_run(run_id=run_id)  # log_model logs into the active run
    try:
        return log_registered_model(mlflow, client, **request)
    finally:
        # Pops the local run; the final status is set once everything else is there.
        with contextlib.suppress(Exception):
            mlflow.end_run(status="RUNNING")


def _mlflow_fields(rec: dict[str, Any], run_id: str, uri: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"tracking_uri": uri, "run_id": run_id, "synced": True}
    reg = rec.get("registration")
    if reg:  # else the job registered its model itself before the server went away
        fields.update(registered_model_version=reg["version"], model_uri=reg["model_uri"])
    return fields


def _update_model_meta(meta_path: Path, rec: dict[str, Any], run_id: str, uri: str) -> None:
    """simtune.json in the model dir (uploaded as an artifact next) gets the version."""
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta.setdefault("mlflow", {}).update(_mlflow_fields(rec, run_id, uri))
    meta["mlflow"].pop("outbox", None)
    write_json_atomic(meta_path, meta)


def _update_registry(workspace: Path, rec: dict[str, Any], run_id: str, uri: str) -> None:
    from simtune.tracking.registry import Registry

    def synced(entry: dict[str, Any]) -> None:
        entry.setdefault("mlflow", {}).update(_mlflow_fields(rec, run_id, uri))
        entry["mlflow"].pop("outbox", None)

    try:
        Registry(workspace).update(rec["model_id"], synced)
    except SimtuneError:
        log.warning(
            "%s is no longer in %s (deleted?); synced to MLflow only",
            rec["model_id"],
            Registry(workspace).path,
        )
