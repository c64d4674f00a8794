"""Several processes, one job: `simtune train --nproc N` (or `--devices 0,1`, several
nodes, `--accelerate_config FILE`) re-runs the same job under torchrun or `accelerate
launch`, the standard engines, rather than a home-made process pool.

The launching process checks the input first (a bad flag or record still costs seconds
and exits 2), writes the fully resolved config to a temporary YAML file and starts the
launcher with an argument list (never a shell string). Every worker runs `simtune
train --config <that file>`; `simtune.training.run.run_tuning` notices it is one of several
processes (WORLD_SIZE > 1) and trains data-parallel: rank 0 alone opens the MLflow run,
writes checkpoints and `models/<model_id>/`, and registers; it hands its result back
through the file named by SIMTUNE_RESULT_FILE.

Signals: the launcher runs in its own session, so a terminal's Ctrl-C reaches only this
process, which forwards one SIGTERM to torchrun; torchrun passes it to every worker,
the workers agree (an all-reduce at each step end) to save a checkpoint at the same
step, and the job ends KILLED as a single-process one does. torchrun waits 30 s for
its workers before it SIGKILLs them, which bounds the time a checkpoint may take.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from simtune.config import TuningConfig
from simtune.errors import SimtuneError
from simtune.util import on_stop_signals, write_json_atomic

log = logging.getLogger(__name__)

RESULT_ENV = "SIMTUNE_RESULT_FILE"
LAUNCHED_ENV = "SIMTUNE_LAUNCHED"
"""Set for every process a launch starts: it must never launch again (a launcher that
ends up starting one plain process, as accelerate does for a single-machine MULTI_CPU
config without MPI, would otherwise make each child launch its own children)."""


class LaunchError(SimtuneError):
    """The training processes failed (their own output says why)."""

    exit_code = 1


def world_size() -> int:
    """Processes in this job as torchrun/accelerate told this one (1 when not launched)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_worker() -> bool:
    """Whether this process was started by a launch (or by the user's own torchrun)."""
    return world_size() > 1 or os.environ.get(LAUNCHED_ENV) == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(cfg: TuningConfig, config_file: Path) -> list[str]:
    """The launcher's argument list for the workers of `cfg`."""
    worker = ["-m", "simtune", "train", "--config", str(config_file)]
    if cfg.accelerate_config:
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        cmd += ["--config_file", str(Path(cfg.accelerate_config).expanduser())]
        if cfg.nproc is not None or cfg.devices:
            cmd += ["--num_processes", str(cfg.processes() * cfg.nnodes)]
        if cfg.nnodes > 1:
            cmd += ["--num_machines", str(cfg.nnodes), "--machine_rank", str(cfg.node_rank)]
            cmd += ["--main_process_ip", cfg.master_addr]
        if cfg.master_port:
            cmd += ["--main_process_port", str(cfg.master_port)]
        return cmd + worker
    port = cfg.master_port or (free_port() if cfg.nnodes == 1 else 29500)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={cfg.processes()}",
        f"--nnodes={cfg.nnodes}",
        f"--node_rank={cfg.node_rank}",
        f"--master_addr={cfg.master_addr}",
        f"--master_port={port}",
        *worker,
    ]


def launch(cfg: TuningConfig) -> Any:
    """Run `cfg` as several processes and return rank 0's TuningResult.

    Raises KeyboardInterrupt when the job was stopped by a signal (after the workers
    saved their checkpoint), LaunchError when a worker failed."""
    import yaml

    from simtune.training.job import TuningResult

    tmp = Path(tempfile.mkdtemp(prefix="simtune-launch-"))
    try:
        config_file = tmp / "job.yaml"
        # Paths made absolute would change what `--resume` matches; the workers start
        # in this directory, so relative ones mean the same to them.
        config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        result_file = tmp / "result.json"
        env = {**os.environ, RESULT_ENV: str(result_file), LAUNCHED_ENV: "1"}
        if cfg.devices:
            env["CUDA_VISIBLE_DEVICES"] = cfg.devices
        cmd = launch_command(cfg, config_file)
        if cfg.accelerate_config and cfg.nproc is None and not cfg.devices:
            log.info("launching the processes %s configures", cfg.accelerate_config)
        else:
            log.info("launching %d process(es) x %d node(s)", cfg.processes(), cfg.nnodes)
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        with _forward_signals(proc) as stopped:
            rc = proc.wait()
        if stopped():
            raise KeyboardInterrupt("signal forwarded to the training processes")
        if rc != 0 or not result_file.is_file():
            raise LaunchError(
                f"the {cfg.processes() * cfg.nnodes} training processes failed "
                f"(launcher exit {rc}); their output above says why"
            )
        if cfg.nnodes > 1 and cfg.node_rank != 0:
            return None
        return TuningResult(**json.loads(result_file.read_text(encoding="utf-8")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_result(result: Any) -> None:
    """Rank 0 of a launched job: hand the result to the launching process."""
    path = os.environ.get(RESULT_ENV)
    if not path:
        return
    write_json_atomic(Path(path), result.to_dict(), compact=True, fsync=False)


@contextlib.contextmanager
def _forward_signals(proc: subprocess.Popen) -> Any:
    """The first SIGINT/SIGTERM is passed on as one SIGTERM (checkpoint, then stop); a
    second one kills the launcher's whole process group at once."""
    count = [0]

    def stopped() -> bool:
        return count[0] > 0

    def handler(signum: int, frame: Any) -> None:
        count[0] += 1
        if count[0] == 1:
            log.warning(
                "signal %d: asking the training processes to checkpoint and stop "
                "(send it again to kill them at once)",
                signum,
            )
        with contextlib.suppress(ProcessLookupError):
            if count[0] == 1:
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGKILL)

    with on_stop_signals(handler):
        yield stopped
