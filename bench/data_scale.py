"""`simtune data stats|validate|export|split` on a million decisions: records/s and peak RSS.

Generates N decisions (DESIGN.md records shaped like the job-market simulator's, 1 in 50
with a rating event after them) into a temp dir, then runs each command as a fresh
`simtune` process (`--json` where it has it), measuring wall time by the parent and
peak RSS (`ru_maxrss` of that child alone: the parent forks nothing else meanwhile, and
each child is waited for on its own with `os.wait4`).

    .venv/bin/python bench/data_scale.py                   # 1M + 100k, stats 3 runs
    .venv/bin/python bench/data_scale.py --records 200000 --runs 1   # quick

Writes bench/results/data_scale.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIMTUNE = [sys.executable, "-m", "simtune.cli.main"]


def generate(path: Path, n: int, *, event_every: int = 50, agents: int = 1000) -> int:
    """Write `n` decision records (and n // event_every rating events); returns events."""
    types = ("JobSeeker", "Employer", "Recruiter")
    skills = ("welding", "nursing", "coding", "driving")
    events = 0
    with path.open("w", encoding="utf-8", buffering=1 << 20) as fh:
        for i in range(n):
            agent = i % agents
            step = i // agents
            prompt = (
                f"You are a {types[agent % 3]} in a job-market simulation.\\nSkill: "
                f"{skills[i % 4]}. Savings (0-10): {i % 11}. Open positions matching you: "
                f"{i % 7}.\\nHow many jobs do you apply to? Answer as JSON: "
                '{\\"number\\": <1-5>}'
            )
            fh.write(
                f'{{"decision_id": "d{i:08d}", "env_name": "job_market", "run_id": '
                f'"run-{step // 100}", "agent_id": "{agent}", "agent_type": '
                f'"{types[agent % 3]}", "step": {step}, "timestamp": '
                f'"2026-01-01T00:00:00+00:00", "prompt": "{prompt}", "output": '
                f'"{{\\"number\\": {1 + i % 5}}}", "reward": {(i % 10) / 10}, "model": '
                f'"noisy-policy"}}\n'
            )
            if event_every and i % event_every == event_every - 1:
                fh.write(
                    f'{{"event": "rating", "decision_id": "d{i:08d}", "value": {1 + (i // event_every) % 5}, '
                    f'"source": "llm"}}\n'
                )
                events += 1
    return events


def run_measured(args: list[str]) -> dict:
    """Like `run`, with the child's own peak RSS from wait4 (stdout to a temp file, so
    no pipe needs reading while we wait)."""
    env = dict(os.environ, TERM="dumb")
    env.pop("SIMTUNE_HOME", None)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*SIMTUNE, *args], stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"simtune {' '.join(args)} failed: {err.read().decode()[-2000:]}")
        return {
            "wall_s": wall,
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "stdout": out.read().decode(),
        }


def measure(n: int, runs: int, tmp: Path) -> dict:
    data = tmp / f"decisions_{n}.jsonl"
    t0 = time.perf_counter()
    events = generate(data, n)
    gen_s = time.perf_counter() - t0
    size_mib = data.stat().st_size / 2**20
    res: dict = {"records": n, "events": events, "file_mib": size_mib, "generate_s": gen_s}
    cmds = {
        "stats": ["data", "stats", str(data), "--json"],
        "validate": ["data", "validate", str(data)],
        "export": ["data", "export", str(data), "-o", str(tmp / "out.jsonl"), "--force"],
        "split": [
            "data",
            "split",
            str(data),
            "--out",
            str(tmp / "split"),
            "--by",
            "agent",
            "--force",
        ],
    }
    for name, cmd in cmds.items():
        k = runs if name == "stats" else 1
        samples = [run_measured(cmd) for _ in range(k)]
        wall = statistics.median(s["wall_s"] for s in samples)
        res[name] = {
            "runs": k,
            "wall_s": wall,
            "wall_s_all": [s["wall_s"] for s in samples],
            "records_per_s": n / wall,
            "peak_rss_mib": max(s["peak_rss_mib"] for s in samples),
        }
        if name == "stats":
            stats = json.loads(samples[0]["stdout"])
            assert stats["total"]["records"] == n, stats["total"]
            assert stats["events"] == events
        print(
            f"  {n:>9,} {name:<9} {wall:7.2f} s  {n / wall:>10,.0f} rec/s  "
            f"{res[name]['peak_rss_mib']:6.0f} MiB",
            flush=True,
        )
    for leftover in (data, tmp / "out.jsonl"):
        leftover.unlink(missing_ok=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000, help="the RSS comparison size")
    ap.add_argument("--runs", type=int, default=3, help="stats runs per size (median)")
    args = ap.parse_args()
    base = run_measured(["--help"])  # interpreter + CLI import floor
    results: dict = {"baseline_help_rss_mib": base["peak_rss_mib"], "sizes": []}
    with tempfile.TemporaryDirectory(prefix="simtune-data-scale-") as tmp:
        for n in (args.small, args.records):
            results["sizes"].append(measure(n, args.runs, Path(tmp)))
    results["loadavg_1m"] = os.getloadavg()[0]
    results["python"] = sys.version.split()[0]
    small, big = results["sizes"]
    lines = [
        f"| command | {small['records']:,} records: rec/s | peak RSS | "
        f"{big['records']:,} records: rec/s | peak RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("stats", "validate", "export", "split"):
        a, b = small[name], big[name]
        lines.append(
            f"| `data {name}` | {a['records_per_s']:,.0f} | {a['peak_rss_mib']:.0f} MiB | "
            f"{b['records_per_s']:,.0f} | {b['peak_rss_mib']:.0f} MiB |"
        )
    table = "\n".join(lines)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "data_scale.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
