"""How long `simtune --help` and `simtune train --help` take, start to exit.

The CLI builds its parser from `simtune.config` without importing torch, transformers
or MLflow, so help should answer in well under a second; this checks it. Each call is
a fresh process (what a user waits for), timed from spawn to exit; the median of
``--runs`` calls is reported, with min and max to show the spread.

Usage
    .venv/bin/python bench/help_time.py            # the venv's `simtune` script
    .venv/bin/python bench/help_time.py --module   # `python -m simtune` instead
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES: list[tuple[str, list[str]]] = [
    ("simtune --help", ["--help"]),
    ("simtune train --help", ["train", "--help"]),
]


def entry_point(use_module: bool) -> list[str]:
    """The command to run: the console script next to this interpreter, else `-m simtune`."""
    script = Path(sys.executable).with_name("simtune")
    if not use_module and script.is_file():
        return [str(script)]
    found = shutil.which("simtune")
    if not use_module and found:
        return [found]
    return [sys.executable, "-m", "simtune"]


def time_once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    if "usage:" not in proc.stdout:
        raise SystemExit(f"{' '.join(cmd)} printed no usage text")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="timed calls per command (default 10)")
    p.add_argument("--module", action="store_true", help="run `python -m simtune`")
    a = p.parse_args()

    base = entry_point(a.module)
    # One untimed call per case so a cold page cache doesn't land in the first sample.
    for _, args in CASES:
        time_once(base + args)

    print(f"command: {' '.join(base)}  ({a.runs} runs each, {os.cpu_count()} CPUs)")
    print()
    print("| command | median (s) | min (s) | max (s) |")
    print("|---|---:|---:|---:|")
    results = {}
    for label, args in CASES:
        times = [time_once(base + args) for _ in range(a.runs)]
        results[label] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
        }
        print(
            f"| `{label}` | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |"
        )
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "help_time.json").write_text(json.dumps({"runs": a.runs, "results": results}, indent=2))


if __name__ == "__main__":
    main()
