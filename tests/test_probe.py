"""Fault and bad-input probe (issue 14), bounded: a table of bad requests, sent as raw
bytes over loopback to a real recording proxy and a real `serve` (tiny model), each of
which must get a 4xx in OpenAI's error shape naming the field, with the server still
serving afterwards and nothing recorded; and bad records at the CLI readers (exit 2,
``FILE:LINE: field ...``). The larger table: ``bench/probe.py``."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import run_cli

from simtune.collect.proxy import RecordingProxy
from simtune.testing import probe
from simtune.testing.stub_llm import StubLLM

MODEL = "m"


@pytest.fixture(scope="module")
def proxy(stub: StubLLM, tmp_path_factory: pytest.TempPathFactory):
    ws = tmp_path_factory.mktemp("probe-ws")
    with RecordingProxy(stub.url, "probe", port=0, workspace=ws, run_id="r") as px:
        yield px


def _ids(cases: list[probe.Case]) -> list[str]:
    return [c.name for c in cases]


PROXY_CASES = probe.common_cases(MODEL) + probe.proxy_cases(MODEL)
SERVE_CASES = probe.common_cases("base") + probe.serve_cases("base")


@pytest.mark.parametrize("case", PROXY_CASES, ids=_ids(PROXY_CASES))
def test_proxy_refuses(case: probe.Case, proxy: RecordingProxy, stub: StubLLM):
    answer = probe.send(proxy.port, case.request)
    assert probe.check(case, answer) is None, probe.check(case, answer)
    # The status line is the refusal's (a streamed request never got a 200 first).
    assert b"HTTP/1.1 200" not in answer.raw and b"data:" not in answer.raw
    assert stub.requests == [] and proxy.path is None  # not forwarded, nothing written


@pytest.mark.parametrize("case", SERVE_CASES, ids=_ids(SERVE_CASES))
def test_serve_refuses(case: probe.Case, tiny_server):
    answer = probe.send(tiny_server.port, case.request)
    assert probe.check(case, answer) is None, probe.check(case, answer)


def test_both_keep_serving_after_the_probe(proxy: RecordingProxy, stub: StubLLM, tiny_server):
    """Runs after the tables: each server still answers, and the proxy records the one
    good call (its file holds nothing else)."""
    px = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
    resp = px.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content
    recs = [json.loads(line) for line in proxy.path.read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["messages"][0]["content"] == "hi"
    sv = openai.OpenAI(base_url=tiny_server.url, api_key="x", max_retries=0)
    out = sv.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert out.choices[0].finish_reason in ("length", "stop")


def test_a_bad_item_in_a_score_batch_writes_nothing(proxy: RecordingProxy):
    """All or nothing: good items before a bad one are not written either."""
    before = proxy.path.read_bytes() if proxy.path else b""
    good = [{"decision_id": f"d{i}", "value": 1} for i in range(3)]
    for bad in ({"decision_id": "x\ud800", "value": 1}, {"decision_id": "x", "value": None}):
        body = json.dumps([*good, bad]).encode()
        answer = probe.send(proxy.port, probe.request("/v1/rewards", body))
        assert answer.status == 400 and json.loads(answer.body)["error"]["param"].startswith("[3]")
    answer = probe.send(
        proxy.port,
        probe.request(
            "/v1/ratings",
            json.dumps(
                [{"decision_id": "d0", "rating": 5}, {"decision_id": "d1", "rating": 5}]
            ).encode()[:-1]
            + b', {"decision_id": "d2", "rating": 1, "feedback": "\xff"}]',
        ),
    )
    assert answer.status == 400 and json.loads(answer.body)["error"]["param"] == "[2].feedback"
    assert (proxy.path.read_bytes() if proxy.path else b"") == before


def test_client_hanging_up_mid_body_is_one_info_line(
    proxy: RecordingProxy, tiny_server, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    for port in (proxy.port, tiny_server.port):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(probe.request("/v1/chat/completions", b'{"model": "m"', length=10_000))
        time.sleep(0.3)
        assert probe.send(port, probe.request("/health", method="GET")).status == 200
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]
    assert not any(r.exc_info for r in caplog.records)
    hung = [r for r in caplog.records if "client hung up" in r.getMessage()]
    assert [r.levelno for r in hung] == [logging.INFO, logging.INFO]  # one line each


def test_huge_prompt_is_refused_without_blocking_others(tiny_server):
    """A 14 MB prompt is refused by its length in characters, before tokenizing, and a
    small request sent meanwhile is answered."""
    huge = json.dumps(
        {"model": "base", "messages": [{"role": "user", "content": "word " * 2_800_000}]}
    ).encode()
    results: dict[str, probe.Answer] = {}

    def big() -> None:
        results["big"] = probe.send(tiny_server.port, probe.request("/v1/chat/completions", huge))

    t = threading.Thread(target=big)
    t.start()
    small = openai.OpenAI(base_url=tiny_server.url, api_key="x", max_retries=0, timeout=60)
    out = small.completions.create(model="base", prompt="hi", max_tokens=2)
    t.join(60)
    assert out.choices[0].finish_reason in ("length", "stop")
    err = json.loads(results["big"].body)["error"]
    assert results["big"].status == 400 and err["code"] == "context_length_exceeded"
    assert "characters" in err["message"] and err["param"] == "messages"


# --- the CLI readers -----------------------------------------------------------------------

READER_CASES = {
    "lone surrogate, with a decision id": (
        '{"decision_id": "d1", "prompt": "a\\ud800b", "output": "y"}\n',
        "field 'prompt'",
    ),
    "lone surrogate in a message": (
        '{"decision_id": "d1", "messages": [{"role": "user", "content": "\\udfff"}], '
        '"output": "y"}\n',
        "field 'messages[0].content'",
    ),
    "NaN in metadata": (
        '{"prompt": "a", "output": "b", "metadata": {"params": {"temperature": NaN}}}\n',
        "field 'metadata.params.temperature'",
    ),
    "unknown role": (
        '{"messages": [{"role": "wizard", "content": "x"}], "output": "y"}\n',
        "field 'messages[0].role'",
    ),
}


@pytest.mark.parametrize("case", list(READER_CASES))
def test_data_validate_refuses(case: str, tmp_path: Path):
    text, needle = READER_CASES[case]
    data = tmp_path / "decisions_x.jsonl"
    data.write_text('{"prompt": "fine", "output": "ok"}\n' + text, encoding="utf-8")
    proc = run_cli("data", "validate", str(data))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"{data}:2: {needle}" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "ok:" not in proc.stdout


def test_data_export_refuses_non_finite_numbers(tmp_path: Path):
    data = tmp_path / "decisions_x.jsonl"
    data.write_text(
        '{"prompt": "a", "output": "b", "metadata": {"params": {"temperature": NaN}}}\n',
        encoding="utf-8",
    )  # an old proxy recorded such params verbatim, and export carried them on
    out = tmp_path / "out.jsonl"
    proc = run_cli("data", "export", str(data), "--output", str(out))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"{data}:1: field 'metadata.params.temperature'" in proc.stderr
    assert not out.exists()
