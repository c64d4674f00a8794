"""A training job's identity and state on disk: its result (`TuningResult`), its model id,
and its job dir `<workspace>/jobs/<model_id>/` (job.json with the owner process,
checkpoints) that `--resume` finds again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from simtune.config import TuningConfig
from simtune.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TuningResult:
    """What a finished training job produced."""

    model_id: str
    adapter_path: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    registered_model_name: str
    registered_model_version: str
    model_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    synced: bool = True
    """False when the MLflow server was unreachable at the end of the job: the model is
    published locally and `simtune sync` sends the registration (version and model_uri
    are "" until then) and anything else MLflow is owed."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_model_id(mode: str, base_name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", base_name).strip("-.")[:40] or "model"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{mode}-{slug}-{stamp}-{secrets.token_hex(3)}"


def job_match(cfg: TuningConfig) -> dict[str, Any]:
    """What `--resume` compares: the options that make two jobs 'the same output'."""
    return {
        "tuning_mode": cfg.tuning_mode,
        "llm_path": cfg.llm_path,
        "dataset_path": sorted(str(Path(p).resolve()) for p in cfg.dataset_path),
        "output_dir": str(Path(cfg.output_dir).resolve()) if cfg.output_dir else None,
    }


def find_resume(cfg: TuningConfig, workspace: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """(job.json of the job to continue, checkpoint to load) for --resume/--resume_from;
    (None, None) for a fresh job. A --resume_from checkpoint outside a simtune job dir
    starts a new job (new model id and run) from that checkpoint."""
    if cfg.resume_from:
        path = Path(cfg.resume_from).expanduser().resolve()
        if (path / JOB_FILE).is_file():  # a job dir: its latest checkpoint
            ckpt = latest_checkpoint(path)
            if ckpt is None:
                raise ConfigError(f"--resume_from: {path} has no complete checkpoint")
            return read_job(path), ckpt
        if not (path / "trainer_state.json").is_file() and not (path / "ppo_state.json").is_file():
            raise ConfigError(
                f"--resume_from: {path} is not a checkpoint (expected a checkpoint-<step> "
                "directory or a job directory under <workspace>/jobs)"
            )
        job_dir = path.parent.parent
        job = read_job(job_dir) if path.parent.name == "checkpoints" else None
        return job, path
    if not cfg.resume:
        return None, None
    want = job_match(cfg)
    candidates = []
    for job_file in (workspace / JOBS_DIR).glob(f"*/{JOB_FILE}"):
        job = read_job(job_file.parent)
        ckpt = latest_checkpoint(job_file.parent)
        if job and ckpt is not None and job.get("match") == want:
            candidates.append((job_file.stat().st_mtime, job_file.parent.name, job, ckpt))
    if not candidates:
        raise ConfigError(
            f"--resume: no interrupted {cfg.tuning_mode} job of this model, dataset and "
            f"output dir with a checkpoint under {workspace / JOBS_DIR}"
        )
    _, _, job, ckpt = max(candidates, key=lambda c: (c[0], c[1]))
    return job, ckpt


def write_job(
    job_dir: Path,
    cfg: TuningConfig,
    model_id: str,
    run_id: str,
    tracking_uri: str,
    *,
    status: str,
) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "model_id": model_id,
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "status": status,
        "owner": owner(),
        "updated_at": datetime.now(timezone.utc).isoformat(),
        "match": job_match(cfg),
        "config": cfg.to_dict(),
    }
    from simtune.util import write_json_atomic

    write_json_atomic(job_dir / JOB_FILE, data)  # a kill never leaves half a job.json


JOBS_DIR = "jobs"

JOB_FILE = "job.json"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid
    from the original process; None where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def owner() -> dict[str, Any]:
    """Who runs a job: written into job.json."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "pid_started": _start_time(pid)}


def owner_alive(job: dict[str, Any]) -> bool:
    """False only when the job's process is certainly gone: same host, and its pid is
    not running (or now belongs to a process started at another time). A job of
    another host, or one written before owners were recorded, counts as alive."""
    rec = job.get("owner")
    if not isinstance(rec, dict) or rec.get("host") != socket.gethostname():
        return True
    pid = rec.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = rec.get("pid_started")
    return started is None or _start_time(pid) in (None, started)


def latest_checkpoint(job_dir: Path) -> Path | None:
    """The highest complete checkpoint-<step> of a job: a directory with the state file
    its trainer writes last (a SIGKILL mid-save leaves one without it)."""
    found = []
    for d in (job_dir / "checkpoints").glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        complete = (d / "trainer_state.json").is_file() or (d / "ppo_state.json").is_file()
        if step.isdigit() and complete:
            found.append((int(step), d))
    return max(found)[1] if found else None


def read_job(job_dir: Path) -> dict[str, Any] | None:
    return read_json(job_dir / JOB_FILE)


def keep_or_drop_job(job_dir: Path, status: str) -> None:
    """After a failed or killed job: keep its dir if there is a checkpoint to resume,
    else remove it (nothing to resume from, nothing to leave behind)."""
    job = read_job(job_dir)
    if job is None:
        shutil.rmtree(job_dir, ignore_errors=True)
        return
    if latest_checkpoint(job_dir) is None:
        shutil.rmtree(job_dir, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        job.update(status=status, updated_at=datetime.now(timezone.utc).isoformat())
        from simtune.util import write_json_atomic

        write_json_atomic(job_dir / JOB_FILE, job)
        log.warning(
            "job %s stopped; resume it with --resume (or --resume_from %s)",
            job["model_id"],
            latest_checkpoint(job_dir),
        )


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
