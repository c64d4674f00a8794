"""Serving throughput of `simtune serve` (transformers backend) on the tiny model on CPU:
1 client vs 8 concurrent clients, with batching on and off, one model vs mixed adapters.

The server is the real CLI (``simtune serve``) in its own process, serving the tiny
random model and two random LoRA adapters made with PEFT (no training: throughput does
not depend on what the weights are). The client is this script: plain ``http.client``
keep-alive connections in threads, so little CPU goes to the client. Every request is
a chat completion with ``temperature: 0`` and a fixed ``max_tokens`` (``--max-tokens``);
tokens/s counts the completion tokens the server reports in ``usage`` (a request may
stop early at end-of-sequence, so the count, not max_tokens, is used), over the wall
time of the whole block of requests.

Configurations, each the same ``--requests`` requests (so totals compare):

- ``1 client``: one request at a time (to base).
- ``8 clients``: 8 threads, each sending ``requests / 8`` back to back (all to base).
- ``8 clients, one adapter``: the same, all asking for one adapter (LoRA computed on
  every row; PEFT's active adapter, no per-row routing).
- ``8 clients, mixed``: the same, but the threads cycle over both adapters and base, so
  batches mix adapters (PEFT ``adapter_names``).
- ``8 clients, batch 1``: the same 8 clients against a server started with
  ``--max-batch-size 1`` (no batching): the control that shows the gain is batching.

Blocks alternate over the configurations ``--runs`` times (after one warm-up request
per model); the table shows the median over runs and the range. The machine is shared
(2 cores here), so the 1-minute load average is reported too.

Usage
    .venv/bin/python bench/serve_throughput.py               # ~2-3 min on 2 CPU cores
    .venv/bin/python bench/serve_throughput.py --runs 7 --requests 64 --max-tokens 64

Output: a markdown table on stdout and bench/results/serve_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SIMTUNE = Path(sys.executable).with_name("simtune")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models(root: Path) -> tuple[Path, list[Path]]:
    """The tiny base and two random LoRA adapters on it (B matrices not zero, so each
    adapter really changes the computation)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from simtune.training.tiny import make_tiny_model

    base = make_tiny_model(root / "tiny")
    adapters = []
    for i in range(2):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base)
        peft = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        out = root / f"adapter-{i}"
        peft.save_pretrained(out, safe_serialization=True)
        adapters.append(out)
    return base, adapters


def start_server(
    base: Path, adapters: list[Path], batch: int, max_tokens: int, threads: int, log: Path
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [str(SIMTUNE), "serve", "--port", str(port), "--max-batch-size", str(batch)]
    cmd += ["--max-new-tokens", str(max_tokens), "--backend", "transformers"]
    for a in adapters:
        cmd += ["--model", str(a)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    fh = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start")


def request(conn: http.client.HTTPConnection, model: str, i: int, max_tokens: int) -> int:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are an agent in a job market simulation."},
            {"role": "user", "content": f"Day {i}: three offers are open. What do you do next?"},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "x"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    if resp.status != 200:
        raise SystemExit(f"request failed: {resp.status} {data}")
    return int(data["usage"]["completion_tokens"])


def block(port: int, models: list[str], clients: int, total: int, max_tokens: int) -> dict:
    """`total` requests from `clients` threads; tokens/s over the block's wall time."""
    per = total // clients
    tokens = [0] * clients
    barrier = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        barrier.wait()
        for j in range(per):
            tokens[k] += request(conn, models[k % len(models)], k * per + j, max_tokens)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "requests": per * clients,
        "tokens": sum(tokens),
        "wall_s": wall,
        "tokens_per_s": sum(tokens) / wall,
        "requests_per_s": per * clients / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=32, help="requests per block (multiple of 8)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each server (default 1: on a loaded 2-core machine, two OpenMP "
        "threads spin-wait for each other, see bench/README.md)",
    )
    args = ap.parse_args()
    if args.requests % 8:
        raise SystemExit("--requests must be a multiple of 8")
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="simtune-serve-bench-"))
    base, adapters = make_models(tmp)
    names = [a.name for a in adapters] + ["base"]
    servers = {
        n: start_server(base, adapters, n, args.max_tokens, args.threads, tmp / f"server-{n}.log")
        for n in (8, 1)
    }
    configs: dict[str, tuple[int, list[str], int]] = {
        "1 client": (8, ["base"], 1),
        "8 clients": (8, ["base"], 8),
        "8 clients, one adapter": (8, names[:1], 8),
        "8 clients, mixed adapters": (8, names, 8),
        "8 clients, batch 1 (no batching)": (1, ["base"], 8),
    }
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    load: list[float] = []
    try:
        for _batch, (_proc, port) in servers.items():  # warm-up: first call per model
            for n in names:
                request(http.client.HTTPConnection("127.0.0.1", port), n, 0, args.max_tokens)
        for run in range(args.runs):
            order = list(configs) if run % 2 == 0 else list(reversed(configs))
            for label in order:
                batch, models, clients = configs[label]
                port = servers[batch][1]
                load.append(os.getloadavg()[0])
                res = block(port, models, clients, args.requests, args.max_tokens)
                results[label].append(res)
                print(f"run {run + 1}/{args.runs} {label}: {res['tokens_per_s']:.0f} tok/s")
    finally:
        for proc, _port in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    single = statistics.median(r["tokens_per_s"] for r in results["1 client"])
    rows = []
    summary: dict[str, Any] = {}
    for label, runs in results.items():
        tps = [r["tokens_per_s"] for r in runs]
        med = statistics.median(tps)
        summary[label] = {
            "tokens_per_s_median": med,
            "tokens_per_s_min": min(tps),
            "tokens_per_s_max": max(tps),
            "requests_per_s_median": statistics.median(r["requests_per_s"] for r in runs),
            "tokens_per_request_mean": statistics.mean(r["tokens"] / r["requests"] for r in runs),
            "x_vs_1_client": med / single,
            "runs": runs,
        }
        rows.append(
            f"| {label} | {med:.0f} ({min(tps):.0f}-{max(tps):.0f}) | "
            f"{summary[label]['requests_per_s_median']:.1f} | {med / single:.2f}x |"
        )
    table = "\n".join(
        [
            "| configuration | tokens/s, median (range) | requests/s | vs 1 client |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    env = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_1m_median": statistics.median(load),
        "runs": args.runs,
        "requests_per_block": args.requests,
        "max_tokens": args.max_tokens,
        "server_threads": args.threads,
    }
    try:
        import torch
        import transformers

        env.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    note = (
        f"\n{args.requests} chat requests per block, max_tokens {args.max_tokens}, greedy; "
        f"median of {args.runs} runs; tiny model (~0.2M params) on CPU, "
        f"{os.cpu_count()} cores, {args.threads} torch thread(s) per server, "
        f"load average {env['loadavg_1m_median']:.1f}."
    )
    print("\n" + table + note)
    (RESULTS / "serve_throughput.md").write_text(table + "\n" + note.strip() + "\n")
    (RESULTS / "serve_throughput.json").write_text(
        json.dumps({"env": env, "results": summary}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
