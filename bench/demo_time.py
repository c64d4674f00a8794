"""Wall time of `simtune demo` per stage, and its reward table.

Runs the real command (`simtune demo --workspace <tmp>`, the README's main job) in a
fresh process per run, so the numbers include start-up and imports as a user sees them,
then reads the stage times and the reward table from the workspace's demo_result.json.
CPU time is the child's user+sys (less sensitive than wall time to other work on a
shared machine); the 1-minute load average before and after is reported beside it.

    .venv/bin/python bench/demo_time.py              # the full demo on SmolLM2, once (~15 min on 2 cores)
    .venv/bin/python bench/demo_time.py --quick --runs 3

Writes bench/results/demo_time{,_quick}.json and .md (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import worker_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
STAGES = ("model", "base", "expert", "sft", "collect", "ppo", "eval")


def one_run(quick: bool, threads: int) -> dict:
    exe = Path(sys.executable).with_name("simtune")
    with tempfile.TemporaryDirectory(prefix="simtune-demo-bench-") as tmp:
        ws = Path(tmp) / "ws"
        cmd = [str(exe), "demo", "--workspace", str(ws), *(["--quick"] if quick else [])]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=worker_env(threads), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"simtune demo failed with exit code {proc.returncode}")
        result = json.loads((ws / "demo_result.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "in_process_s": result["seconds"],
        "stages": {s["name"]: s["seconds"] for s in result["stages"]},
        "details": {s["name"]: s["detail"] for s in result["stages"]},
        "scores": result["scores"],
        "size": result["size"],
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": sys.version.split()[0], "cpus": str(os.cpu_count())}
    for pkg in ("torch", "transformers", "trl", "peft", "mlflow"):
        out[pkg] = version(pkg)
    return out


def markdown(runs: list[dict], quick: bool, threads: int) -> str:
    med = statistics.median
    lines = [
        f"## `simtune demo{' --quick' if quick else ''}` ({len(runs)} run(s), "
        f"{threads} torch thread(s), medians)",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    for name in STAGES:
        lines.append(f"| {name} | {med(r['stages'][name] for r in runs):.1f} |")
    lines += [
        f"| **end to end** (process wall, start-up included) | "
        f"**{med(r['wall_s'] for r in runs):.1f}** |",
        f"| CPU time (user+sys) | {med(r['cpu_s'] for r in runs):.1f} |",
        "",
        "load average (1 min) before/after each run: "
        + ", ".join(f"{r['loadavg_1m_before']}/{r['loadavg_1m_after']}" for r in runs),
        "",
        "Reward on the held-out episodes (last run; mean reward per decision, invalid = -1):",
        "",
        "| model | mean reward / decision | invalid | decisions |",
        "|---|---:|---:|---:|",
    ]
    for s in runs[-1]["scores"]:
        name = f"{s['name']} (reference)" if s["reference"] else s["name"]
        inv = "-" if s["invalid_rate"] is None else f"{100 * s['invalid_rate']:.0f}%"
        lines.append(f"| {name} | {s['mean_reward']:+.3f} | {inv} | {s['decisions']} |")
    if len(runs) > 1:
        lines += ["", "PPO − base per run: " + ", ".join(_gap(r) for r in runs)]
    return "\n".join(lines) + "\n"


def _gap(run: dict) -> str:
    by = {s["name"]: s["mean_reward"] for s in run["scores"]}
    return f"{by['ppo'] - by['base']:+.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="time `simtune demo --quick` instead")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="OMP threads (default: all)"
    )
    args = p.parse_args()
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.quick, args.threads))
        print(f"run {i + 1}/{args.runs}: {runs[-1]['wall_s']:.1f} s", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "demo_time_quick" if args.quick else "demo_time"
    md = markdown(runs, args.quick, args.threads)
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"runs": runs, "versions": versions(), "threads": args.threads}, indent=2)
    )
    (RESULTS / f"{stem}.md").write_text(md)
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
