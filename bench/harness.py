"""Shared plumbing of the benchmarks: data, worker processes, MLflow store, versions.

Each benchmark script runs its measured work in fresh worker processes (itself with
`--worker SIDE`), so peak RSS is per run; the parent alternates sides and takes medians.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "simtune" / "data" / "sample_decisions.jsonl"


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB. Only RUSAGE_SELF: RUSAGE_CHILDREN is useless here,
    # because a child forked for `git version` / `uname -p` (MLflow and GitPython do this
    # at import) inherits the parent's high-water mark and reports it as its own.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(src: Path, dst: Path, copies: int) -> int:
    """Replicate the sample file `copies` times with unique decision ids.

    simtune drops records whose decision_id repeats, so each copy gets its own id; a
    baseline that ignores ids then trains on exactly the same rows."""
    records = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line]
    n = 0
    with dst.open("w", encoding="utf-8") as fh:
        for k in range(copies):
            for rec in records:
                fh.write(json.dumps({**rec, "decision_id": f"{rec['decision_id']}-{k}"}) + "\n")
                n += 1
    return n


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        # What `import simtune` sets by default; the same for every side, so that a
        # plain script is not measured spin-waiting on a shared machine.
        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        MKL_NUM_THREADS=str(threads),
        # Keep the datasets cache out of ~/.cache and the same for every side.
        HF_DATASETS_CACHE=str(Path(tempfile.gettempdir()) / "simtune-bench-hf-datasets"),
    )
    # An inherited tracking server would make simtune's side measure the network.
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SIMTUNE_HOME", None)
    return env


def run_worker(script: str, side: str, threads: int, args: list[str]) -> dict:
    """Run `script --worker SIDE ARGS...`; its last stdout line is a JSON result."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", side, *args]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=worker_env(threads), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{side} worker failed with exit code {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    res = json.loads(lines[-1])
    res["end_to_end_s"] = wall
    # 1-minute load average around the run: a shared machine's noise shows up here.
    res["loadavg_1m_before"] = load_before
    res["loadavg_1m_after"] = os.getloadavg()[0]
    res["side"] = side
    return res


def make_store(path: Path, threads: int) -> None:
    """Create an empty MLflow sqlite store (all schema migrations applied) at `path`.

    Creating a store runs MLflow's alembic migrations, which takes seconds; a user pays
    it once per workspace, not per training job. Copying this pre-made store into each
    run's workspace measures the steady state of a workspace."""
    code = (
        "import mlflow, sys; mlflow.MlflowClient('sqlite:///' + sys.argv[1]).search_experiments()"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path)],
        env=worker_env(threads),
        check=True,
        capture_output=True,
    )


def warm_caches(threads: int) -> None:
    """Import everything once so the first measured run doesn't pay for a cold page cache."""
    code = (
        "import torch, transformers, trl, peft, accelerate, datasets, mlflow, simtune.training.run"
    )
    subprocess.run([sys.executable, "-c", code], env=worker_env(threads), check=True)


def order(sides: list[str], runs: int) -> list[str]:
    """ABBA: forward order, then reversed, ... so machine drift spreads over all sides."""
    out: list[str] = []
    for i in range(runs):
        out += sides if i % 2 == 0 else sides[::-1]
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import version

    pkgs = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "mlflow", "simtune")
    return {p: version(p) for p in pkgs}
