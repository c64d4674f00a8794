"""What the recording proxy adds to an LLM call: latency and throughput on loopback.

Three processes: an upstream stub (``--worker upstream``), the real CLI
``simtune collect proxy`` in front of it (recording into a temp workspace), and this
script as the client (aiohttp). Each measurement runs the *same* requests against the
*same* upstream twice: directly, and through the proxy; the proxy's cost is the
difference. Separate processes because that is how the proxy runs (its own event
loop and GIL), and so that the client's and the upstream's work are not counted as
the proxy's; on a 2-core machine the three still share the CPUs, which the table
reports (load average).

- *sequential latency*: one client, one keep-alive connection, one request at a time;
  ``--requests`` per block, blocks alternate direct/proxy (ABBA) over ``--runs``;
  added latency = proxy minus direct, of the median and of the p99, per run; the table
  shows the median over runs (and the range).
- *throughput*: ``--concurrency`` (32) client tasks over a pool of as many connections,
  each sending requests back to back for ``--seconds``; requests/s, and the median
  latency under that load.
- streaming: the same sequential measurement with ``"stream": true`` (time to the
  last byte of the SSE stream, which the proxy parses and re-labels chunk by chunk).

The upstream is ``--upstream-kind lean`` (default): a minimal asyncio HTTP/1.1 server
answering canned OpenAI JSON / SSE, so that little CPU goes to the upstream and the
proxy's cost is not hidden behind the stub's; ``stub`` uses `simtune.testing.stub_llm.StubLLM`
(aiohttp; called directly it serves about half the lean stub's requests/s). At the end
the proxy is stopped with SIGTERM and the script checks that it recorded exactly one
decision per proxied request.

Usage
    .venv/bin/python bench/proxy_overhead.py                   # ~1 min
    .venv/bin/python bench/proxy_overhead.py --runs 7 --requests 2000 --seconds 10

Targets (issue 4): <= 2 ms median added latency, >= 500 requests/s at 32 clients.
Output: a markdown table on stdout and bench/results/proxy_overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

MESSAGES = [
    {"role": "system", "content": "You are a trader in a market simulation. " * 8},
    {"role": "user", "content": "Day 12. Price 101.5, you hold 30 shares. Buy, sell or hold? " * 4},
]
ANSWER = '{"action": "sell", "quantity": 10, "reason": "the price is above my estimate"}'


# --- the upstream stub ------------------------------------------------------------------


def _canned() -> dict[str, bytes]:
    """Canned responses of the lean upstream: JSON and SSE for chat, and /v1/models."""
    chat = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 200, "completion_tokens": 20, "total_tokens": 220},
    }
    words = [w + " " for w in ANSWER.split(" ")]
    words[-1] = words[-1].rstrip()
    events = []
    for i, w in enumerate([*words, None]):
        d: dict[str, Any] = {} if w is None else {"content": w}
        if i == 0:
            d["role"] = "assistant"
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "bench-model",
            "choices": [{"index": 0, "delta": d, "finish_reason": None if w else "stop"}],
        }
        events.append(f"data: {json.dumps(chunk)}\n\n".encode())
    events.append(b"data: [DONE]\n\n")
    sse = b"".join(f"{len(e):x}\r\n".encode() + e + b"\r\n" for e in events) + b"0\r\n\r\n"
    body = json.dumps(chat).encode()
    models = json.dumps({"object": "list", "data": [{"id": "bench-model"}]}).encode()

    def head(ctype: str, extra: str) -> bytes:
        return f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n{extra}\r\n".encode()

    return {
        "json": head("application/json", f"Content-Length: {len(body)}\r\n") + body,
        "sse": head("text/event-stream", "Transfer-Encoding: chunked\r\n") + sse,
        "models": head("application/json", f"Content-Length: {len(models)}\r\n") + models,
    }


class LeanUpstream(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length bodies only: enough for aiohttp clients."""

    canned = _canned()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body, self.buf = self.buf[end + 4 : total], self.buf[total:]
            if head.startswith(b"get"):
                self.transport.write(self.canned["models"])
            elif b'"stream": true' in body or b'"stream":true' in body:
                self.transport.write(self.canned["sse"])
            else:
                self.transport.write(self.canned["json"])


def worker_upstream(kind: str) -> None:
    """Serve until stdin closes; the first stdout line is the port."""
    if kind == "stub":
        from simtune.testing.stub_llm import StubLLM

        stub = StubLLM(reply=lambda body: ANSWER, record_requests=False).start()
        print(json.dumps({"port": stub.port}), flush=True)
        sys.stdin.read()
        stub.stop()
        return

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(LeanUpstream, "127.0.0.1", 0)
        print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        server.close()

    asyncio.run(main())


# --- the client -------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def sequential(base: str, n: int, stream: bool) -> list[float]:
    import aiohttp

    body = json.dumps({"model": "bench-model", "messages": MESSAGES, "stream": stream}).encode()
    headers = {"Content-Type": "application/json", "X-Simtune-Agent-Id": "bench"}
    out = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        for _ in range(n):
            t0 = time.perf_counter()
            async with s.post(base + "/chat/completions", data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"{base}: HTTP {r.status}")
            out.append(time.perf_counter() - t0)
    return out


async def loaded(base: str, concurrency: int, seconds: float) -> tuple[int, float, list[float]]:
    import aiohttp

    body = json.dumps({"model": "bench-model", "messages": MESSAGES}).encode()
    headers = {"Content-Type": "application/json", "X-Simtune-Agent-Id": "bench"}
    lat: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with s.post(base + "/chat/completions", data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise SystemExit(f"{base}: HTTP {r.status}")
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return len(lat), elapsed, lat


# --- orchestration ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_upstream(kind: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", "upstream", "--kind", kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = json.loads(proc.stdout.readline())["port"]
    return proc, f"http://127.0.0.1:{port}/v1"


def start_proxy(upstream: str, workspace: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("simtune")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "simtune"]
    cmd += ["collect", "proxy", "--upstream", upstream, "--env", "bench", "--port", str(port)]
    cmd += ["--workspace", str(workspace), "--run-id", "bench"]
    log = open(workspace / "proxy.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((workspace / "proxy.log").read_text()[-3000:]) from None
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}/v1"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="sequential blocks per side (default 5)")
    p.add_argument("--requests", type=int, default=1000, help="requests per block (default 1000)")
    p.add_argument("--stream-requests", type=int, default=300, help="streamed requests per block")
    p.add_argument("--concurrency", type=int, default=32, help="clients for throughput (32)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per throughput run (5)")
    p.add_argument("--load-runs", type=int, default=3, help="throughput runs per side (3)")
    p.add_argument("--upstream-kind", choices=("lean", "stub"), default="lean")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "upstream":
        worker_upstream(a.kind)
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="simtune-proxy-bench-"))
    up_proc, upstream = start_upstream(a.upstream_kind)
    px_proc, proxy = start_proxy(upstream, tmp)
    sides = {"direct": upstream, "proxy": proxy}
    proxied = 0
    load_before = os.getloadavg()[0]
    try:
        # Warm-up: connections, code paths, the proxy's log file.
        for base in sides.values():
            asyncio.run(sequential(base, 200, False))
            asyncio.run(sequential(base, 50, True))
        proxied += 250

        seq: dict[str, list[dict[str, float]]] = {"direct": [], "proxy": []}
        stm: dict[str, list[dict[str, float]]] = {"direct": [], "proxy": []}
        for i in range(a.runs):
            order = ["direct", "proxy"] if i % 2 == 0 else ["proxy", "direct"]
            for side in order:
                lat = asyncio.run(sequential(sides[side], a.requests, False))
                seq[side].append({"median": statistics.median(lat), "p99": pct(lat, 0.99)})
                lat = asyncio.run(sequential(sides[side], a.stream_requests, True))
                stm[side].append({"median": statistics.median(lat), "p99": pct(lat, 0.99)})
                if side == "proxy":
                    proxied += a.requests + a.stream_requests

        load: dict[str, list[dict[str, float]]] = {"direct": [], "proxy": []}
        for i in range(a.load_runs):
            order = ["direct", "proxy"] if i % 2 == 0 else ["proxy", "direct"]
            for side in order:
                n, elapsed, lat = asyncio.run(loaded(sides[side], a.concurrency, a.seconds))
                load[side].append(
                    {"requests": n, "rps": n / elapsed, "median": statistics.median(lat),
                     "p99": pct(lat, 0.99)}
                )  # fmt: skip
                if side == "proxy":
                    proxied += n
    finally:
        px_proc.send_signal(signal.SIGTERM)
        px_rc = px_proc.wait(30)
        assert up_proc.stdin is not None
        up_proc.stdin.close()
        up_proc.wait(30)
    load_after = os.getloadavg()[0]

    files = list((tmp / "envs" / "bench" / "datasets").glob("decisions_*.jsonl"))
    recorded = sum(1 for f in files for _ in f.open())
    if px_rc != 0 or recorded != proxied:
        raise SystemExit(
            f"proxy exited {px_rc}, recorded {recorded} of {proxied} proxied requests; "
            f"log: {(tmp / 'proxy.log').read_text()[-2000:]}"
        )

    def added(data: dict[str, list[dict[str, float]]], key: str) -> list[float]:
        return [
            (p[key] - d[key]) * 1000 for p, d in zip(data["proxy"], data["direct"], strict=True)
        ]

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    rows = []
    for label, data in (("non-streamed", seq), ("streamed (SSE)", stm)):
        for key in ("median", "p99"):
            d = med([r[key] for r in data["direct"]]) * 1000
            x = med([r[key] for r in data["proxy"]]) * 1000
            add = added(data, key)
            rows.append(
                (f"{label} latency, {key} (ms)", f"{d:.3f}", f"{x:.3f}",
                 f"{med(add):+.3f} ({min(add):+.3f} .. {max(add):+.3f})")
            )  # fmt: skip
    rps_d = med([r["rps"] for r in load["direct"]])
    rps_p = med([r["rps"] for r in load["proxy"]])
    rows.append(
        (f"throughput at {a.concurrency} clients (requests/s)", f"{rps_d:.0f}", f"{rps_p:.0f}",
         f"{rps_p / rps_d:.2f}x ({min(r['rps'] for r in load['proxy']):.0f} .. "
         f"{max(r['rps'] for r in load['proxy']):.0f})")
    )  # fmt: skip
    for key in ("median", "p99"):
        d = med([r[key] for r in load["direct"]]) * 1000
        x = med([r[key] for r in load["proxy"]]) * 1000
        rows.append(
            (f"latency at {a.concurrency} clients, {key} (ms)", f"{d:.2f}", f"{x:.2f}",
             f"{x - d:+.2f}")
        )  # fmt: skip

    added_median = med(added(seq, "median"))
    header = (
        f"upstream: {a.upstream_kind}; {a.runs} sequential blocks of {a.requests} "
        f"(+{a.stream_requests} streamed) per side, {a.load_runs} x {a.seconds:g} s at "
        f"{a.concurrency} clients; {os.cpu_count()} CPUs; 1-min load {load_before:.2f} -> "
        f"{load_after:.2f}; {recorded} decisions recorded (all proxied requests)"
    )
    table = [
        "| metric | direct | via proxy | proxy - direct (range over runs) |",
        "|---|---:|---:|---:|",
        *[f"| {' | '.join(r)} |" for r in rows],
    ]
    verdict = (
        f"targets: median added latency {added_median:.3f} ms (<= 2 ms: "
        f"{'met' if added_median <= 2 else 'NOT met'}); {rps_p:.0f} requests/s via proxy at "
        f"{a.concurrency} clients (>= 500: {'met' if rps_p >= 500 else 'NOT met'})"
    )
    text = "\n".join([header, "", *table, "", verdict]) + "\n"
    print(text)
    (RESULTS / "proxy_overhead.md").write_text(text)
    (RESULTS / "proxy_overhead.json").write_text(
        json.dumps(
            {
                "args": vars(a),
                "sequential": seq,
                "streamed": stm,
                "load": load,
                "recorded": recorded,
                "loadavg_1m": [load_before, load_after],
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
