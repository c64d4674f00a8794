"""What one `Recorder.record` call costs the simulation calling it.

Each case times every single call with ``time.perf_counter_ns`` (after untimed warm-up
records) in several runs, each run into a fresh file; per run it takes the median and
the 99th percentile, and reports the median of those over the runs (with the range of
the run medians). A typical record: a ~400-character prompt, a short JSON answer, agent
id, agent type and step. Cases:

- ``record, fsync=none``: the default: one write(2) per record, survives SIGKILL;
- ``record(messages=..., metadata), fsync=none``: what a wrapped OpenAI client writes
  (system + user message, model, latency, token usage);
- ``record, fsync=always``: survives a power cut; one disk flush per record;
- ``os.write of the same line``: the bare system call on an O_APPEND file, the floor
  under any recorder that writes each record through before returning.

Usage
    .venv/bin/python bench/recorder_overhead.py                 # 5 runs x 20,000 records
    .venv/bin/python bench/recorder_overhead.py --runs 3 --records 5000 --dir /dev/shm

Writes a markdown table to stdout and everything (every run's numbers, load average,
versions) to ``bench/results/recorder_overhead.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from simtune.collect.recorder import Recorder

ROOT = Path(__file__).resolve().parents[1]

PROMPT = (
    "You are trader {agent} in a market simulation, step {step}. The last five prices of "
    "ACME were 101.2, 100.8, 101.9, 102.4 and 101.7; your cash is 10,000 and you hold 30 "
    "shares. Other traders bought 120 shares and sold 95 in the last step. News: the "
    "central bank kept rates unchanged. Decide whether to buy, sell or hold, and how many "
    "shares. Answer with a JSON object with the keys action, quantity and reason."
)
OUTPUT = '{"action": "buy", "quantity": 5, "reason": "momentum"}'
SYSTEM = "You are a careful trader. Answer in JSON only."
USAGE = {"prompt_tokens": 98, "completion_tokens": 17, "total_tokens": 115}


AGENTS = [f"trader-{k}" for k in range(16)]


def prompts(n: int) -> list[str]:
    # Built before timing: the call under test is `record`, not the caller's formatting.
    return [PROMPT.format(agent=AGENTS[i % 16], step=i) for i in range(n)]


def prompt_case(n: int) -> Callable[[Recorder, int], None]:
    texts = prompts(n)

    def call(rec: Recorder, i: int) -> None:
        rec.record(
            prompt=texts[i], output=OUTPUT, agent_id=AGENTS[i % 16], agent_type="Trader", step=i
        )

    return call


def messages_case(n: int) -> Callable[[Recorder, int], None]:
    chats = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}] for t in prompts(n)
    ]

    def call(rec: Recorder, i: int) -> None:
        rec.record(
            messages=chats[i],
            output=OUTPUT,
            agent_id=AGENTS[i % 16],
            agent_type="Trader",
            step=i,
            model="gpt-4o-mini",
            latency_s=0.8123,
            usage=USAGE,
        )

    return call


def time_calls(call: Callable[[int], None], n: int, warmup: int) -> list[int]:
    for i in range(warmup):
        call(i)
    gc.collect()
    clock = time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t0 = clock()
        call(warmup + i)
        out[i] = clock() - t0
    return out


def run_recorder(
    directory: Path, fsync: str, make_case: Callable, n: int, warmup: int
) -> list[int]:
    call = make_case(n + warmup)
    with Recorder("bench", run_id="bench", directory=directory, fsync=fsync) as rec:
        times = time_calls(lambda i: call(rec, i), n, warmup)
        assert rec.log.lines == n + warmup
    return times


def run_raw_write(directory: Path, n: int, warmup: int) -> list[int]:
    """The same bytes a typical record writes, through a bare os.write."""
    directory.mkdir(parents=True, exist_ok=True)
    with Recorder("bench", run_id="bench", directory=directory / "sample") as rec:
        prompt_case(1)(rec, 0)
        line = rec.path.read_bytes()  # type: ignore[union-attr]
    fd = os.open(directory / "raw.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return time_calls(lambda i: os.write(fd, line), n, warmup)
    finally:
        os.close(fd)


def summarize(times_ns: list[int]) -> dict[str, float]:
    s = sorted(times_ns)
    n = len(s)
    return {
        "n": n,
        "median_us": s[n // 2] / 1000,
        "p99_us": s[min(n - 1, int(n * 0.99))] / 1000,
        "mean_us": sum(s) / n / 1000,
        "min_us": s[0] / 1000,
        "max_us": s[-1] / 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    p.add_argument("--records", type=int, default=20_000, help="timed records per run")
    p.add_argument("--warmup", type=int, default=2_000, help="untimed records first")
    p.add_argument(
        "--fsync-records", type=int, default=500, help="timed records per fsync=always run"
    )
    p.add_argument("--dir", default=None, help="write here (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "recorder_overhead.json"))
    a = p.parse_args()

    base = Path(tempfile.mkdtemp(prefix="simtune-recbench-", dir=a.dir))
    cases: list[tuple[str, Callable[[Path], list[int]]]] = [
        (
            "record, fsync=none",
            lambda d: run_recorder(d, "none", prompt_case, a.records, a.warmup),
        ),
        (
            "record(messages=..., metadata), fsync=none",
            lambda d: run_recorder(d, "none", messages_case, a.records, a.warmup),
        ),
        (
            "record, fsync=always",
            lambda d: run_recorder(d, "always", prompt_case, a.fsync_records, min(a.warmup, 50)),
        ),
        ("os.write of the same line (floor)", lambda d: run_raw_write(d, a.records, a.warmup)),
    ]
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in cases}
    load_before = os.getloadavg()[0]
    try:
        # Runs interleave the cases, so drift on a shared machine spreads over all of them.
        for r in range(a.runs):
            for k, (label, fn) in enumerate(cases):
                stats = summarize(fn(base / f"run{r}-case{k}"))
                stats["loadavg_1m"] = os.getloadavg()[0]
                results[label].append(stats)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()[0]

    print(
        f"{a.runs} runs per case; {a.records:,} timed records per run after {a.warmup:,} "
        f"warm-up ({a.fsync_records:,} for fsync=always); {os.cpu_count()} CPUs; "
        f"1-min load {load_before:.2f} -> {load_after:.2f}; Python {platform.python_version()}"
    )
    print()
    print("| case | median (us) | p99 (us) | run medians (us) | mean (us) |")
    print("|---|---:|---:|---:|---:|")
    summary = {}
    for label, runs in results.items():
        medians = [x["median_us"] for x in runs]
        row = {
            "median_us": statistics.median(medians),
            "p99_us": statistics.median(x["p99_us"] for x in runs),
            "run_medians_min_us": min(medians),
            "run_medians_max_us": max(medians),
            "mean_us": statistics.median(x["mean_us"] for x in runs),
        }
        summary[label] = row
        print(
            f"| {label} | {row['median_us']:.1f} | {row['p99_us']:.1f} | "
            f"{row['run_medians_min_us']:.1f}-{row['run_medians_max_us']:.1f} | "
            f"{row['mean_us']:.1f} |"
        )

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(a),
                "summary": summary,
                "runs": results,
                "cpus": os.cpu_count(),
                "loadavg_1m_before": load_before,
                "loadavg_1m_after": load_after,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "prompt_chars": len(PROMPT.format(agent="trader-0", step=0)),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
