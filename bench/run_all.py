"""The whole benchmark suite in one command.

    .venv/bin/python bench/run_all.py            # every benchmark at its own defaults (~20 min)
    .venv/bin/python bench/run_all.py --quick    # fewer runs each: a smoke run (~8 min)
    .venv/bin/python bench/run_all.py --only recorder,proxy

Each benchmark runs as its own process (its own interpreter, so one's imports and memory
do not colour another's) and writes its own ``bench/results/<name>.json``; this script
then reads those files and writes ``bench/results/summary.json`` (machine-readable) and
``bench/results/summary.md`` (the table for bench/README.md): the headline number of
each benchmark, its target where an issue set one, and whether it was met. A benchmark
that fails is reported as such and the others still run (exit code 1 at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

Row = tuple[str, float, str, bool | None]
"""(metric, value, target text, met?)."""


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _sft() -> list[Row]:
    d = _load("sft_vs_trl")
    m, peak = d["medians"], d["meta"]["peak_gflops"]["bf16"]
    s = m["simtune"]
    ratio = s["tokens_per_s"] / m["trl"]["tokens_per_s"]
    ratio16 = s["tokens_per_s"] / m["trl_bf16"]["tokens_per_s"]
    share = s["gflops"] / peak
    return [
        ("SFT tokens/s (SmolLM2-135M), simtune / plain TRL", ratio, ">= 3x", ratio >= 3.0),
        ("SFT tokens/s, simtune / TRL bf16+use_cpu", ratio16, ">= 1.5x", ratio16 >= 1.5),
        ("SFT GFLOP/s, share of the bf16 matmul peak", share, ">= 50%", share >= 0.5),
        (
            "SFT peak RSS, simtune / plain TRL",
            s["peak_rss_mib"] / m["trl"]["peak_rss_mib"],
            "",
            None,
        ),
    ]


def _ppo() -> list[Row]:
    m = _load("ppo_vs_sft")["medians"]
    rss = m["ppo"]["peak_rss_mib"] / m["sft"]["peak_rss_mib"]
    step = m["ppo"]["step_ms"] / m["sft"]["step_ms"]
    return [
        ("PPO samples/s", m["ppo"]["samples_per_s"], "", None),
        ("PPO peak RSS / SFT", rss, "<= 1.3x", rss <= 1.3),
        ("PPO ms per step / SFT", step, "<= 3x", step <= 3.0),
    ]


def _ppo_online() -> list[Row]:
    m = _load("ppo_online_current")["medians"]
    rows: list[Row] = []
    for name, r in m.items():
        rise = r["after"] - r["before"]
        rows.append((f"online PPO held-out reward rise, {name}", rise, "> 0", rise > 0))
    rows.append(
        (
            "online PPO ms per step",
            statistics.median(r["ms_per_step"] for r in m.values()),
            "",
            None,
        )
    )
    return rows


def _recorder() -> list[Row]:
    s = _load("recorder_overhead")["summary"]["record, fsync=none"]
    return [
        ("recorder µs per record, median", s["median_us"], "<= 20 µs", s["median_us"] <= 20),
        ("recorder µs per record, p99", s["p99_us"], "", None),
    ]


def _proxy() -> list[Row]:
    d = _load("proxy_overhead")
    added = statistics.median(
        (p["median"] - q["median"]) * 1000
        for p, q in zip(d["sequential"]["proxy"], d["sequential"]["direct"], strict=True)
    )
    rps = statistics.median(r["rps"] for r in d["load"]["proxy"])
    return [
        ("proxy added latency, median (ms)", added, "<= 2 ms", added <= 2.0),
        ("proxy requests/s at 32 clients", rps, ">= 500", rps >= 500),
    ]


def _data() -> list[Row]:
    small, big = _load("data_scale")["sizes"]
    rate = big["stats"]["records_per_s"]
    growth = big["stats"]["peak_rss_mib"] - small["stats"]["peak_rss_mib"]
    return [
        (f"data stats records/s ({big['records']:,})", rate, ">= 100,000", rate >= 100_000),
        (
            f"data stats peak RSS growth {small['records']:,} -> {big['records']:,} (MiB)",
            growth,
            "flat",
            None,
        ),
    ]


def _serve() -> list[Row]:
    r = _load("serve_throughput")["results"]
    one, eight = r["1 client"]["tokens_per_s_median"], r["8 clients"]["tokens_per_s_median"]
    return [
        ("serve tokens/s, 1 client", one, "", None),
        ("serve tokens/s, 8 clients / 1 client", eight / one, "> 1x", eight > one),
    ]


def _help() -> list[Row]:
    r = _load("help_time")["results"]["simtune --help"]["median_s"]
    return [("`simtune --help` (s)", r, "< 0.5 s", r < 0.5)]


def _probe() -> list[Row]:
    d = _load("probe")
    return [
        (
            "bad-input/fault probe: cases handled / tried",
            d["handled"] / d["tried"],
            "all",
            d["handled"] == d["tried"],
        ),
    ]


def _demo() -> list[Row]:
    run = _load("demo_time")["runs"][0]
    return [("demo wall time (s)", run["wall_s"], "<= 15 min", run["wall_s"] <= 900)]


@dataclass
class Bench:
    name: str
    script: str
    args: list[str]
    quick: list[str]
    extract: Callable[[], list[Row]]
    result: str = ""
    rows: list[Row] = field(default_factory=list)


SUITE = [
    Bench("help", "help_time.py", [], ["--runs", "3"], _help),
    Bench("recorder", "recorder_overhead.py", [], ["--runs", "2", "--records", "5000"], _recorder),
    Bench("proxy", "proxy_overhead.py", [], ["--runs", "2", "--load-runs", "1"], _proxy),
    Bench("data", "data_scale.py", [], ["--runs", "1", "--records", "300000"], _data),
    Bench("sft", "sft_vs_trl.py", [], ["--runs", "1"], _sft),
    Bench("ppo", "ppo_vs_sft.py", [], ["--runs", "1"], _ppo),
    Bench("ppo-online", "ppo_online.py", [], ["--runs", "1"], _ppo_online),
    Bench("serve", "serve_throughput.py", [], ["--runs", "1"], _serve),
    Bench("probe", "probe.py", [], ["--rounds", "5", "--faults", "9"], _probe),
    Bench("demo", "demo_time.py", [], [], _demo),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer runs per benchmark (a smoke run)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(b.name for b in SUITE)}")
    a = p.parse_args()
    wanted = set(a.only.split(",")) if a.only else {b.name for b in SUITE}
    unknown = wanted - {b.name for b in SUITE}
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    RESULTS.mkdir(exist_ok=True)
    failed = 0
    for b in (b for b in SUITE if b.name in wanted):
        if not (BENCH / b.script).is_file():
            b.result = "missing"
            continue
        cmd = [sys.executable, str(BENCH / b.script), *(b.quick if a.quick else b.args)]
        print(f"== {b.name}: {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=BENCH.parent)
        took = time.monotonic() - start
        try:
            if proc.returncode != 0:
                raise RuntimeError(f"exit code {proc.returncode}")
            b.rows = b.extract()
            b.result = f"ok ({took:.0f} s)"
        except Exception as exc:  # report and go on: one broken benchmark hides no other
            failed += 1
            b.result = f"FAILED: {exc}"
    ran = [b for b in SUITE if b.name in wanted]
    summary = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "quick": a.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "benchmarks": {
            b.name: {
                "script": b.script,
                "result": b.result,
                "metrics": [
                    {"metric": m, "value": v, "target": t, "met": ok} for m, v, t, ok in b.rows
                ],
            }
            for b in ran
        },
    }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"Suite run {summary['when']} ({'quick' if a.quick else 'full'}), "
        f"{os.cpu_count()} CPUs: `.venv/bin/python bench/run_all.py{' --quick' if a.quick else ''}`",
        "",
        "| benchmark | metric | value | target | met |",
        "|---|---|---:|---|---|",
    ]
    for b in ran:
        if not b.rows:
            lines.append(f"| {b.name} | {b.result} | | | |")
        for m, v, t, ok in b.rows:
            mark = "" if ok is None else ("yes" if ok else "**no**")
            lines.append(f"| {b.name} | {m} | {v:,.3g} | {t} | {mark} |")
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
