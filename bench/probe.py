"""Bad-input and fault probe of the recording proxy and `serve` (issue 14), larger than
the bounded table in ``tests/test_probe.py``.

On loopback, in this process: a `StubLLM` upstream, a `RecordingProxy` in front of it,
and `serve` (`simtune.serving.server.Server`) on the tiny model. Fired at them:

- *cases*: `simtune.testing.probe`'s tables, plus every (field x bad value) pair of a chat
  request (NaN, +-Infinity, 1e999, lone surrogates, a raw ``\\xff`` byte, UTF-8-encoded
  surrogates, nesting 97..5000 deep, wrong JSON types), every attribution header x bad
  bytes, and score batches of 2..20 items with one bad item at each position. A case is
  *handled* when its answer is the expected 4xx in OpenAI's error shape, naming the
  field where one applies, and nothing was forwarded or written.
- *load*: `--clients` threads, each sending good chat calls through the proxy between
  bad ones; held when every good call got a decision id and its record is on disk (and
  no bad one left a line).
- *faults*: clients hanging up mid-body, mid-headers and mid-stream; survived when
  both servers still answer after each and nothing was logged at ERROR.

Prints a markdown table (also bench/results/probe.{md,json}); exits 1 if anything was
not handled.

Usage
    .venv/bin/python bench/probe.py               # ~1-2 min on 2 cores
    .venv/bin/python bench/probe.py --clients 16 --rounds 50
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from simtune.collect.proxy import RecordingProxy
from simtune.testing import probe
from simtune.testing.stub_llm import StubLLM

CHAT = "/v1/chat/completions"

BAD_VALUES: dict[str, bytes] = {
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "-Infinity": b"-Infinity",
    "1e999": b"1e999",
    "lone high surrogate": b'"a\\ud800"',
    "lone low surrogate": b'"\\udfff"',
    "reversed pair": b'"\\udc00\\ud800"',
    "raw 0xff": b'"a\xffb"',
    "raw 0xc0 0x80": b'"\xc0\x80"',
    "UTF-8 surrogate": b'"\xed\xa0\x80"',
    "nest 97": b"[" * 97 + b"]" * 97,
    "nest 975": b"[" * 975 + b"]" * 975,
    "nest 5000": b"{" + b'"a":{' * 4999 + b"}" * 5000,
}
# Each field with the placeholder where a bad value goes, and the param expected.
FIELDS: dict[str, tuple[bytes, str | None]] = {
    "content": (b'{"model": "m", "messages": [{"role": "user", "content": @}]}', None),
    "role": (b'{"model": "m", "messages": [{"role": @, "content": "x"}]}', None),
    "temperature": (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
                    b'"temperature": @}', None),
    "top_p": (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": @}',
              None),
    "user": (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "user": @}',
             None),
    "metadata": (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
                 b'"metadata": {"k": @}}', None),
    "tools": (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
              b'"tools": [{"type": "function", "function": {"name": "f", "parameters": @}}]}',
              None),
}  # fmt: skip
WRONG_TYPES = {
    "messages": [b'"hi"', b"5", b"{}", b"null", b"true", b"[]", b"[5]", b'[{"role": 5}]'],
    "model_serve": [b"5", b"null", b"[]", b'""'],
}
HEADERS = ["X-Simtune-Agent-Id", "X-Simtune-Agent-Type", "X-Simtune-Run-Id", "X-Simtune-Step"]
HEADER_BYTES = [b"\xff", b"a\xffb", b"\xed\xa0\x80", b"\xc3", b"\xfe\xff" * 10]


def field_cases(model: str, *, serve: bool) -> list[probe.Case]:
    """Every field x bad value (all refused when the body is parsed: even 97 levels is
    over the request limit of 96 once the field's own nesting is counted)."""
    cases = []
    m = json.dumps(model).encode()
    for fname, (template, _) in FIELDS.items():
        for vname, value in BAD_VALUES.items():
            body = template.replace(b'"m"', m).replace(b"@", value)
            cases.append(probe.Case(f"{fname} = {vname}", probe.request(CHAT, body), 400))
    for value in WRONG_TYPES["messages"]:
        body = b'{"model": ' + m + b', "messages": ' + value + b"}"
        cases.append(probe.Case(f"messages = {value.decode()}", probe.request(CHAT, body), 400))
    if serve:
        for value in WRONG_TYPES["model_serve"]:
            body = b'{"model": ' + value + b', "messages": [{"role": "user", "content": "x"}]}'
            cases.append(probe.Case(f"model = {value.decode()}", probe.request(CHAT, body), 400))
    return cases


def header_cases(model: str) -> list[probe.Case]:
    good = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]})
    cases = []
    for stream in (False, True):
        body = good if not stream else good[:-1] + ', "stream": true}'
        for name in HEADERS:
            for raw in HEADER_BYTES:
                req = probe.request(CHAT, body.encode(), headers={name: raw})
                label = f"{name}: {raw!r}{' (stream)' if stream else ''}"
                cases.append(probe.Case(label, req, 400, name))
    return cases


def batch_cases() -> list[probe.Case]:
    cases = []
    bad_items = {
        "NaN value": b'{"decision_id": "x", "value": NaN}',
        "surrogate id": b'{"decision_id": "x\\ud800", "value": 1}',
        "raw 0xff id": b'{"decision_id": "x\xff", "value": 1}',
        "missing value": b'{"decision_id": "x"}',
        "not an object": b"7",
    }
    for size in (2, 5, 20):
        for pos in sorted({0, size // 2, size - 1}):
            for label, bad in bad_items.items():
                items = [b'{"decision_id": "d%d", "value": 1}' % i for i in range(size)]
                items[pos] = bad
                body = b"[" + b", ".join(items) + b"]"
                name = f"rewards batch of {size}, {label} at {pos}"
                cases.append(probe.Case(name, probe.request("/v1/rewards", body), 400))
    return cases


def run_cases(port: int, cases: list[probe.Case], stub: StubLLM | None, px: Any) -> list[str]:
    failures = []

    def written() -> tuple[int, int]:
        if stub is None:
            return 0, 0
        size = px.path.stat().st_size if px.path is not None else 0
        return len(stub.requests), size

    for case in cases:
        before = written()
        problem = probe.check(case, probe.send(port, case.request))
        if problem is None and written() != before:
            problem = "forwarded or recorded"
        if problem is not None:
            failures.append(f"{case.name}: {problem}")
    return failures


def load(px: RecordingProxy, clients: int, rounds: int) -> tuple[int, int, list[str]]:
    """Good calls among bad ones from `clients` threads: (good sent, recorded, problems)."""
    ids: list[str] = []
    problems: list[str] = []
    lock = threading.Lock()
    bad = probe.common_cases("m")[:10] + probe.proxy_cases("m")[:6]

    def client(k: int) -> None:
        for i in range(rounds):
            body = json.dumps(
                {"model": "m", "messages": [{"role": "user", "content": f"c{k} r{i}"}]}
            ).encode()
            a = probe.send(
                px.port, probe.request(CHAT, body, headers={"X-Simtune-Agent-Id": f"a{k}"})
            )
            case = bad[(k + i) % len(bad)]
            b = probe.send(px.port, case.request)
            with lock:
                if a.status != 200 or "x-simtune-decision-id" not in a.headers:
                    problems.append(f"good call {k}/{i}: {a.status}")
                else:
                    ids.append(a.headers["x-simtune-decision-id"])
                if probe.check(case, b) is not None:
                    problems.append(f"bad call {case.name}: {probe.check(case, b)}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = px.path.read_text(encoding="utf-8").splitlines() if px.path else []
    recorded = {json.loads(line)["decision_id"] for line in lines}
    if len(lines) != len(ids) or recorded != set(ids):
        problems.append(f"{len(ids)} decision ids answered, {len(lines)} lines on disk")
    return clients * rounds, len(recorded & set(ids)), problems


def faults(targets: list[tuple[int, str]], rounds: int) -> tuple[int, int]:
    """Clients hanging up mid-headers, mid-body, mid-stream: (tried, survived)."""
    tried = survived = 0
    for port, model in targets:
        stream = json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True}
        ).encode()
        for i in range(rounds):
            kind = i % 3
            with socket.create_connection(("127.0.0.1", port)) as s:
                if kind == 0:
                    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
                elif kind == 1:
                    s.sendall(probe.request(CHAT, b'{"model": "m", "mess', length=5000))
                else:
                    s.sendall(probe.request(CHAT, stream))
                    s.recv(10)
            tried += 1
            time.sleep(0.02)
            if probe.send(port, probe.request("/health", method="GET")).status == 200:
                survived += 1
    return tried, survived


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--faults", type=int, default=30)
    args = ap.parse_args()
    errors = _Errors()
    logging.getLogger().addHandler(errors)

    from simtune.serving.engine import Engine
    from simtune.serving.server import Server
    from simtune.training.tiny import make_tiny_model

    rows: list[tuple[str, int, int]] = []
    failures: list[str] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny")
        engine = Engine.load([str(model)], max_new_tokens=4, device="cpu", precision="fp32")
        with StubLLM() as stub, Server(engine) as srv:
            with RecordingProxy(stub.url, "probe", port=0, workspace=Path(tmp) / "ws") as px:
                proxy_cases = (
                    probe.common_cases("m", scale=1)
                    + probe.proxy_cases("m")
                    + field_cases("m", serve=False)
                    + header_cases("m")
                    + batch_cases()
                )
                bad = run_cases(px.port, proxy_cases, stub, px)
                rows.append(("proxy: bad requests", len(proxy_cases), len(proxy_cases) - len(bad)))
                failures += [f"proxy: {f}" for f in bad]
                serve_cases = (
                    probe.common_cases("base") + probe.serve_cases("base")
                    + field_cases("base", serve=True)
                )  # fmt: skip
                bad = run_cases(srv.port, serve_cases, None, None)
                rows.append(("serve: bad requests", len(serve_cases), len(serve_cases) - len(bad)))
                failures += [f"serve: {f}" for f in bad]
                sent, kept, problems = load(px, args.clients, args.rounds)
                rows.append((f"proxy: good calls among bad, {args.clients} clients", sent, kept))
                failures += problems
                tried, survived = faults([(px.port, "m"), (srv.port, "base")], args.faults)
                rows.append(("hang-ups mid-headers/body/stream (both)", tried, survived))
        engine.close()
    if errors.records:
        failures += [f"logged at ERROR: {r.getMessage()[:200]}" for r in errors.records]
    elapsed = time.perf_counter() - t0
    out = ["| probe | tried | handled |", "|---|---:|---:|"]
    out += [f"| {name} | {n} | {ok} |" for name, n, ok in rows]
    total, ok = sum(r[1] for r in rows), sum(r[2] for r in rows)
    out.append(f"| **all** | **{total}** | **{ok}** |")
    out.append(f"\n{elapsed:.0f} s; ERROR log lines: {len(errors.records)}")
    sys.stdout.write("\n".join(out) + "\n")
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "probe.md").write_text("\n".join(out) + "\n", encoding="utf-8")
    (results / "probe.json").write_text(
        json.dumps(
            {
                "rows": [{"probe": n, "tried": t, "handled": h} for n, t, h in rows],
                "tried": total,
                "handled": ok,
                "error_log_lines": len(errors.records),
                "failures": failures,
                "seconds": round(elapsed, 1),
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    for f in failures[:50]:
        sys.stdout.write(f"FAIL {f}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
