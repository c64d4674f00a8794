"""The recording proxy (issue 4): real openai clients -> proxy -> StubLLM, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import free_port, wait_http

from simtune.collect.proxy import RecordingProxy, parse_prefix, upstream_base
from simtune.decisions.reader import read_dataset
from simtune.decisions.writer import spread_return
from simtune.errors import ConfigError
from simtune.testing.stub_llm import StubLLM

MSG = [{"role": "system", "content": "You trade."}, {"role": "user", "content": "buy or sell?"}]


@pytest.fixture
def llm():
    with StubLLM() as stub:
        yield stub


@pytest.fixture
def proxy(llm: StubLLM, workspace: Path):
    with RecordingProxy(llm.url, "market", port=0, workspace=workspace, run_id="run-0") as px:
        yield px


def lines(px: RecordingProxy) -> list[dict[str, Any]]:
    if px.path is None:
        return []
    return [json.loads(line) for line in px.path.read_text().splitlines()]


def records(px: RecordingProxy) -> list[dict[str, Any]]:
    return [r for r in lines(px) if "event" not in r]


def http_call(
    url: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    method: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def assert_openai_error(status: int, body: bytes, expected: int) -> dict[str, Any]:
    assert status == expected, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


# --- recording through the official client ----------------------------------------------


def test_sync_chat_is_recorded_with_header_attribution(proxy: RecordingProxy, llm: StubLLM):
    client = openai.OpenAI(
        base_url=proxy.url,
        api_key="sk-client",
        default_headers={
            "X-Simtune-Agent-Id": "alice",
            "X-Simtune-Agent-Type": "Trader",
            "X-Simtune-Step": "7",
            "X-Simtune-Run-Id": "run-9",
        },
    )
    resp = client.chat.completions.create(model="stub-model", messages=MSG, temperature=0.2)
    assert resp.choices[0].message.content == "stub answer: buy or sell?"
    did = resp.model_extra["simtune_decision_id"]
    raw = client.chat.completions.with_raw_response.create(model="stub-model", messages=MSG)
    assert raw.headers["x-simtune-decision-id"] == raw.parse().model_extra["simtune_decision_id"]

    recs = records(proxy)
    assert [r["decision_id"] for r in recs] == [did, raw.headers["x-simtune-decision-id"]]
    rec = recs[0]
    assert rec["messages"] == MSG and rec["output"] == "stub answer: buy or sell?"
    assert (rec["env_name"], rec["run_id"], rec["agent_id"], rec["agent_type"], rec["step"]) == (
        "market",
        "run-9",
        "alice",
        "Trader",
        7,
    )
    assert rec["model"] == "stub-model" and 0 < rec["latency_s"] < 10
    meta = rec["metadata"]
    assert meta["source"] == "proxy" and meta["endpoint"] == "chat/completions"
    assert meta["params"] == {"temperature": 0.2} and meta["finish_reason"] == "stop"
    # Forwarded as sent, minus the simtune headers; the client's key goes through.
    sent = llm.requests[0]
    assert sent["body"]["messages"] == MSG and sent["body"]["temperature"] == 0.2
    assert not any(k.lower().startswith("x-simtune") for k in sent["headers"])
    assert sent["headers"]["Authorization"] == "Bearer sk-client"
    ds = read_dataset([str(proxy.directory)])
    assert [d.decision_id for d in ds.decisions] == [did, recs[1]["decision_id"]]


def test_path_prefix_attribution_and_header_precedence(proxy: RecordingProxy):
    base = proxy.base_url("team/a 1", run_id="r-7", agent_type="Buyer")
    assert base.endswith("/runs/r-7/types/Buyer/agents/team%2Fa%201/v1")
    client = openai.OpenAI(base_url=base, api_key="x")
    client.chat.completions.create(model="m", messages=MSG)
    only_agent = openai.OpenAI(base_url=proxy.base_url("bob"), api_key="x")
    only_agent.chat.completions.create(
        model="m", messages=MSG, extra_headers={"X-Simtune-Agent-Id": "carol"}
    )
    first, second = records(proxy)
    assert (first["run_id"], first["agent_type"], first["agent_id"]) == ("r-7", "Buyer", "team/a 1")
    # Header beats path; the run defaults to the proxy's own run id.
    assert (second["agent_id"], second["run_id"], second["agent_type"]) == ("carol", "run-0", None)


def test_async_concurrent_calls_are_all_recorded(proxy: RecordingProxy):
    async def main() -> list[Any]:
        clients = [
            openai.AsyncOpenAI(base_url=proxy.base_url(f"agent-{a}"), api_key="x") for a in range(4)
        ]
        calls = [
            clients[i % 4].chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": f"question {i}"}],
                extra_headers={"X-Simtune-Step": str(i)},
            )
            for i in range(24)
        ]
        out = await asyncio.gather(*calls)
        for c in clients:
            await c.close()
        return out

    responses = asyncio.run(main())
    recs = {r["decision_id"]: r for r in records(proxy)}
    assert len(recs) == 24
    for i, resp in enumerate(responses):
        rec = recs[resp.model_extra["simtune_decision_id"]]
        assert rec["step"] == i and rec["agent_id"] == f"agent-{i % 4}"
        assert rec["output"] == f"stub answer: question {i}" == resp.choices[0].message.content


def test_sync_stream_records_the_assembled_answer(proxy: RecordingProxy):
    client = openai.OpenAI(base_url=proxy.base_url("alice"), api_key="x")
    with client.chat.completions.create(model="m", messages=MSG, stream=True) as stream:
        chunks = list(stream)
        ids = {c.model_extra["simtune_decision_id"] for c in chunks}
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        # Recorded before the client saw the end of the stream.
        recs = records(proxy)
    assert len(ids) == 1 and text == "stub answer: buy or sell?"
    assert len(recs) == 1 and recs[0]["decision_id"] in ids
    assert recs[0]["output"] == text and recs[0]["metadata"]["stream"] is True
    assert recs[0]["agent_id"] == "alice" and recs[0]["messages"] == MSG


def test_async_stream_and_completions(proxy: RecordingProxy):
    async def main() -> tuple[str, str, str]:
        client = openai.AsyncOpenAI(base_url=proxy.url, api_key="x")
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "tell a story"}], stream=True
        )
        parts, did = [], None
        async for chunk in stream:
            did = chunk.model_extra["simtune_decision_id"]
            parts.append(chunk.choices[0].delta.content or "")
        cstream = await client.completions.create(model="m", prompt="Once upon", stream=True)
        ctext = "".join([c.choices[0].text async for c in cstream])
        await client.close()
        return "".join(parts), did or "", ctext

    text, did, ctext = asyncio.run(main())
    client = openai.OpenAI(base_url=proxy.url, api_key="x")
    comp = client.completions.create(model="m", prompt="The market opens", max_tokens=5)
    assert comp.choices[0].text == "stub answer: The market opens"
    chat, cstream, plain = records(proxy)
    assert chat["decision_id"] == did and chat["output"] == text == "stub answer: tell a story"
    assert cstream["prompt"] == "Once upon" and cstream["output"] == ctext
    assert cstream["metadata"]["endpoint"] == "completions" and cstream["metadata"]["stream"]
    assert plain["prompt"] == "The market opens" and plain["output"] == comp.choices[0].text
    assert plain["decision_id"] == comp.model_extra["simtune_decision_id"]
    assert plain["metadata"]["params"] == {"max_tokens": 5}


def test_models_passthrough_and_empty_answer_not_recorded(workspace: Path):
    with (
        StubLLM(reply=lambda body: "") as llm,
        RecordingProxy(llm.url, "e", port=0, workspace=workspace) as px,
    ):
        client = openai.OpenAI(base_url=px.url, api_key="x")
        assert [m.id for m in client.models.list()] == ["stub-model"]
        resp = client.chat.completions.with_raw_response.create(model="m", messages=MSG)
        # The reader refuses empty outputs, so an empty answer is forwarded, not recorded.
        assert "x-simtune-decision-id" not in resp.headers
        assert not (resp.parse().model_extra or {}).get("simtune_decision_id")
        assert px.path is None


# --- scores posted later ------------------------------------------------------------


def test_rewards_by_id_and_by_episode_and_ratings(proxy: RecordingProxy):
    a = openai.OpenAI(base_url=proxy.base_url("a", run_id="r1"), api_key="x")
    b = openai.OpenAI(base_url=proxy.base_url("b", run_id="r1"), api_key="x")
    ids_a = [a.chat.completions.create(model="m", messages=MSG).model_extra for _ in range(3)]
    ids_a = [x["simtune_decision_id"] for x in ids_a]
    id_b = b.chat.completions.create(model="m", messages=MSG).model_extra["simtune_decision_id"]

    status, _, body = http_call(proxy.url + "/rewards", {"decision_id": id_b, "value": 0.5})
    assert status == 200 and json.loads(body) == {"decision_ids": [id_b], "shares": [0.5]}
    # Episode reward for agent a in run r1, discounted; the run and agent come from the body.
    status, _, body = http_call(
        proxy.url + "/rewards",
        {"agent_id": "a", "run_id": "r1", "value": 3.0, "rule": "discounted", "gamma": 0.5},
    )
    ans = json.loads(body)
    assert status == 200 and ans["decision_ids"] == ids_a
    assert ans["shares"] == spread_return(3.0, 3, "discounted", 0.5) == [0.75, 1.5, 3.0]
    # That episode is closed; agent b's is still open (the path prefix gives agent/run).
    status, _, body = http_call(
        proxy.url + "/rewards", {"agent_id": "a", "run_id": "r1", "value": 9}
    )
    assert json.loads(body)["decision_ids"] == []
    status, _, body = http_call(proxy.base_url("b", run_id="r1") + "/rewards", {"value": 2.0})
    assert json.loads(body)["decision_ids"] == [id_b] and json.loads(body)["shares"] == [2.0]

    ratings = [
        {"decision_id": ids_a[0], "rating": 2, "feedback": "Sell.", "reason": "too timid"},
        {"decision_id": ids_a[0], "rating": 5, "source": "llm"},  # never beats a human
        {"decision_id": ids_a[1], "rating": 4, "source": "llm"},
    ]
    status, _, body = http_call(proxy.url + "/ratings", ratings)
    assert status == 200 and [r["rating"] for r in json.loads(body)] == [2, 5, 4]

    ds = read_dataset([str(proxy.directory)])
    got = {d.decision_id: d for d in ds.decisions}
    assert [got[i].reward for i in ids_a] == [0.75, 1.5, 3.0]
    assert got[id_b].reward == 2.5  # immediate 0.5 + episode 2.0
    assert (got[ids_a[0]].rating, got[ids_a[0]].feedback, got[ids_a[0]].reason) == (
        2.0,
        "Sell.",
        "too timid",
    )
    assert got[ids_a[1]].rating == 4.0 and got[ids_a[2]].rating is None
    assert ds.orphan_events == 0
    rule_lines = [e for e in lines(proxy) if e.get("rule")]
    assert {e["episode_return"] for e in rule_lines} == {3.0, 2.0}


def test_episode_reward_defaults_to_the_proxy_run_and_header_agent(proxy: RecordingProxy):
    client = openai.OpenAI(
        base_url=proxy.url, api_key="x", default_headers={"X-Simtune-Agent-Id": "solo"}
    )
    ids = [client.chat.completions.create(model="m", messages=MSG).id for _ in range(2)]
    assert len(ids) == 2
    status, _, body = http_call(
        proxy.url + "/rewards", {"value": 1.0}, headers={"X-Simtune-Agent-Id": "solo"}
    )
    ans = json.loads(body)
    assert status == 200 and ans["run_id"] == "run-0" and ans["agent_id"] == "solo"
    assert ans["shares"] == [0.5, 0.5] and ans["rule"] == "uniform"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"decision_id": "d1"}, "value"),
        ({"decision_id": "d1", "value": "1"}, "value"),
        ({"decision_id": "d1", "value": True}, "value"),
        ({"decision_id": "", "value": 1}, "decision_id"),
        ({"agent_id": "a", "value": 1, "rule": "median"}, "rule"),
        ({"agent_id": "a", "value": 1, "gamma": 2}, "gamma"),
        ([{"decision_id": "d1", "value": 1}, {"decision_id": "d2", "value": None}], "[1].value"),
    ],
)
def test_bad_rewards_write_nothing(proxy: RecordingProxy, body: Any, param: str):
    status, _, raw = http_call(proxy.url + "/rewards", body)
    assert assert_openai_error(status, raw, 400)["param"] == param
    assert proxy.path is None


def test_non_finite_reward_and_bad_rating_write_nothing(proxy: RecordingProxy):
    status, _, raw = http_call(
        proxy.url + "/rewards", raw=b'{"decision_id": "d", "value": NaN}'
    )  # Python's json accepts NaN; simtune refuses it
    assert_openai_error(status, raw, 400)
    status, _, raw = http_call(
        proxy.url + "/ratings", {"decision_id": "d", "rating": 1, "source": "robot"}
    )
    assert assert_openai_error(status, raw, 400)["param"] == "source"
    assert proxy.path is None


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 400, 429])
def test_upstream_errors_pass_through_unrecorded(proxy: RecordingProxy, llm: StubLLM, status: int):
    err = {"error": {"message": f"upstream says {status}", "type": "x", "code": "c"}}
    llm.fail_next(status, body=err, retry_after=1 if status == 429 else None)
    code, headers, body = http_call(
        proxy.url + "/chat/completions", {"model": "m", "messages": MSG}
    )
    assert code == status and json.loads(body) == err
    assert headers["Content-Type"].startswith("application/json")
    assert "X-Simtune-Decision-Id" not in headers
    if status == 429:
        assert headers["Retry-After"] == "1"
    # The openai client sees the upstream's error as its own.
    llm.fail_next(status, body=err)
    client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=MSG)
    assert info.value.status_code == status and info.value.body == err["error"]
    assert proxy.path is None and len(llm.requests) == 2


def test_upstream_down_gives_502(workspace: Path):
    with RecordingProxy(f"http://127.0.0.1:{free_port()}", "e", port=0, workspace=workspace) as px:
        code, _, body = http_call(px.url + "/chat/completions", {"model": "m", "messages": MSG})
        err = assert_openai_error(code, body, 502)
        assert err["code"] == "upstream_unreachable"
        code, _, body = http_call(px.url + "/models")
        assert_openai_error(code, body, 502)
        assert px.path is None


def test_upstream_timeout_gives_504(workspace: Path):
    with (
        StubLLM(delay=1.5) as slow,
        RecordingProxy(slow.url, "e", port=0, workspace=workspace, timeout=0.3) as px,
    ):
        code, _, body = http_call(px.url + "/chat/completions", {"model": "m", "messages": MSG})
        assert assert_openai_error(code, body, 504)["code"] == "upstream_timeout"
        assert px.path is None


class ScriptedUpstream:
    """A raw-socket upstream that answers each connection with a scripted list of
    ``(delay_s, bytes)`` parts and then hangs up: streams that break, stall or end
    without ``[DONE]``, answers with tool calls -- what StubLLM cannot do."""

    def __init__(self, *scripts: list[tuple[float, bytes]]) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.scripts = list(scripts)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.srv.getsockname()[1]}/v1"

    def _serve(self) -> None:
        for script in self.scripts:
            conn, _ = self.srv.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, body = data.split(b"\r\n\r\n", 1)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += conn.recv(65536)
                try:
                    for delay, part in script:
                        time.sleep(delay)
                        conn.sendall(part)
                except OSError:  # the proxy hung up on us
                    pass
        self.srv.close()

    @staticmethod
    def sse(*chunks: Any, done: bool = True, complete: bool = True) -> list[tuple[float, bytes]]:
        """A chunked SSE answer; `complete=False` stops before the terminating chunk."""
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        parts = [(0.0, head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")]
        events = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks]
        events += [b"data: [DONE]\n\n"] if done else []
        for ev in events:
            parts.append((0.0, f"{len(ev):x}\r\n".encode() + ev + b"\r\n"))
        if complete:
            parts.append((0.0, b"0\r\n\r\n"))
        return parts

    @staticmethod
    def json(obj: Any) -> list[tuple[float, bytes]]:
        body = json.dumps(obj).encode()
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        return [(0.0, f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)]


def delta(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"content": content} if content is not None else {}
    d.update(extra)
    return {"id": "c1", "model": "up-model", "choices": [
        {"index": 0, "delta": d, "finish_reason": finish}
    ]}  # fmt: skip


def test_broken_stream_is_not_recorded(workspace: Path):
    up = ScriptedUpstream(ScriptedUpstream.sse(delta("Hel"), done=False, complete=False))
    with RecordingProxy(up.url, "e", port=0, workspace=workspace) as px:
        client = openai.OpenAI(base_url=px.url, api_key="x", max_retries=0)
        got = []
        with pytest.raises(openai.APIError, match="upstream stream broke off"):
            for chunk in client.chat.completions.create(model="m", messages=MSG, stream=True):
                got.append(chunk.choices[0].delta.content)
        assert got == ["Hel"]
        assert px.path is None
    up.thread.join(5)


def test_stream_error_event_and_client_hangup_are_not_recorded(workspace: Path):
    error_event = {"error": {"message": "out of memory", "type": "server_error"}}
    stall = ScriptedUpstream.sse(delta("slow"), delta(" answer", finish="stop"))
    # The rest (answer, [DONE], end) comes at once after the client has gone, so the
    # proxy learns of the hang-up before it would write again.
    stall[2:] = [(1.0, b"".join(part for _, part in stall[2:]))]
    up = ScriptedUpstream(ScriptedUpstream.sse(delta("Hi"), error_event), stall)
    with RecordingProxy(up.url, "e", port=0, workspace=workspace) as px:
        client = openai.OpenAI(base_url=px.url, api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="out of memory"):
            list(client.chat.completions.create(model="m", messages=MSG, stream=True))
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
        body = json.dumps({"model": "m", "messages": MSG, "stream": True})
        conn.request("POST", "/v1/chat/completions", body=body)
        resp = conn.getresponse()
        assert b"slow" in resp.read1(4096)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        up.thread.join(10)
        time.sleep(0.3)
        assert px.path is None


def test_tool_calls_and_stream_without_done_are_recorded(workspace: Path):
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "buy", "arguments": '{"qty": 3}'}}]  # fmt: skip
    answer = {
        "id": "x1",
        "object": "chat.completion",
        "model": "up-model",
        "choices": [{"index": 0, "finish_reason": "tool_calls",
                     "message": {"role": "assistant", "content": None, "tool_calls": calls}}],
    }  # fmt: skip
    fragments = [
        delta(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                           "function": {"name": "buy", "arguments": ""}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '{"qty"'}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": ": 3}"}}]),
        delta(finish="tool_calls"),
    ]  # fmt: skip
    up = ScriptedUpstream(
        ScriptedUpstream.json(answer),
        ScriptedUpstream.sse(*fragments),
        ScriptedUpstream.sse(delta("no "), delta("done", finish="stop"), done=False),
    )
    with RecordingProxy(up.url, "e", port=0, workspace=workspace) as px:
        client = openai.OpenAI(base_url=px.url, api_key="x", max_retries=0)
        history = MSG + [{"role": "assistant", "content": None, "tool_calls": calls},
                         {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]  # fmt: skip
        resp = client.chat.completions.create(model="m", messages=history)
        assert resp.choices[0].message.tool_calls[0].function.name == "buy"
        list(client.chat.completions.create(model="m", messages=MSG, stream=True))
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model="m", messages=MSG, stream=True)
        )
        assert text == "no done"
        plain, streamed, no_done = records(px)
    # A tool-call answer: its calls in OpenAI's shape, its (empty) text as output.
    assert plain["output"] == "" and plain["tool_calls"] == calls
    assert "tool_calls" not in plain["metadata"]
    assert plain["messages"][2] == {"role": "assistant", "content": "", "tool_calls": calls}
    assert plain["messages"][3] == {"role": "tool", "tool_call_id": "call_1", "content": "ok"}
    assert plain["model"] == "up-model"
    assert streamed["output"] == "" and streamed["tool_calls"] == calls
    assert streamed["metadata"]["finish_reason"] == "tool_calls"
    assert no_done["output"] == "no done"
    ds = read_dataset([str(px.directory)])  # every record stays loadable
    assert len(ds.decisions) == 3


@pytest.mark.parametrize(
    "path,raw,headers,status,param",
    [
        ("/chat/completions", b'{"model": "m", "messages": [', {}, 400, None),
        ("/chat/completions", b"[1, 2]", {}, 400, None),
        ("/chat/completions", b'{"model": "m"}', {}, 400, "messages"),
        ("/chat/completions", b'{"model": "m", "messages": []}', {}, 400, "messages"),
        ("/chat/completions", b'{"model": "m", "messages": [{"content": "x"}]}', {}, 400,
         "messages[0]"),
        ("/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": 3}]}',
         {}, 400, "messages[0].content"),
        ("/completions", b'{"model": "m"}', {}, 400, "prompt"),
        ("/completions", b'{"model": "m", "prompt": "  "}', {}, 400, "prompt"),
        ("/chat/completions", json.dumps({"model": "m", "messages": MSG}).encode(),
         {"X-Simtune-Step": "three"}, 400, "X-Simtune-Step"),
        ("/chat/completions", b'{"model": "m", "messages": "' + b"x" * 20000 + b'"}', {}, 413,
         None),
    ],
)  # fmt: skip
def test_bad_input_is_refused_not_forwarded_not_recorded(
    llm: StubLLM,
    workspace: Path,
    path: str,
    raw: bytes,
    headers: dict[str, str],
    status: int,
    param: str | None,
):
    with RecordingProxy(llm.url, "e", port=0, workspace=workspace, max_body_mb=0.01) as px:
        code, _, body = http_call(px.url + path, raw=raw, headers=headers)
        assert assert_openai_error(code, body, status)["param"] == param
        assert llm.requests == [] and px.path is None


def test_chunked_oversized_body_and_routing_errors(llm: StubLLM, workspace: Path):
    with RecordingProxy(llm.url, "e", port=0, workspace=workspace, max_body_mb=0.01) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
        pieces = iter([b'{"model": "m", "messages": "', b"y" * 30000, b'"}'])
        conn.request("POST", "/v1/chat/completions", body=pieces, encode_chunked=True)
        resp = conn.getresponse()
        assert_openai_error(resp.status, resp.read(), 413)
        conn.close()
        code, _, body = http_call(f"http://127.0.0.1:{px.port}/nope/v1/models")
        assert_openai_error(code, body, 404)
        code, _, body = http_call(f"http://127.0.0.1:{px.port}/agents//v1/models")
        assert_openai_error(code, body, 400)
        code, _, body = http_call(px.url + "/chat/completions", method="GET")
        assert_openai_error(code, body, 405)
        code, _, body = http_call(f"http://127.0.0.1:{px.port}/health")
        assert code == 200 and json.loads(body) == {"status": "ok"}
        assert llm.requests == [] and px.path is None


def test_api_key_guards_the_proxy_and_stays_off_the_upstream(llm: StubLLM, workspace: Path):
    with RecordingProxy(llm.url, "e", port=0, workspace=workspace, api_key="proxy-secret") as px:
        for key in (None, "wrong"):
            hdrs = {"Authorization": f"Bearer {key}"} if key else {}
            code, _, body = http_call(
                px.url + "/chat/completions", {"model": "m", "messages": MSG}, headers=hdrs
            )
            assert assert_openai_error(code, body, 401)["code"] == "invalid_api_key"
        code, _, body = http_call(px.url + "/rewards", {"decision_id": "d", "value": 1})
        assert_openai_error(code, body, 401)
        assert llm.requests == [] and px.path is None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=px.url, api_key="nope", max_retries=0).models.list()
        client = openai.OpenAI(base_url=px.url, api_key="proxy-secret")
        assert client.chat.completions.create(model="m", messages=MSG).model_extra
        assert "Authorization" not in llm.requests[0]["headers"]
        assert len(records(px)) == 1
    with RecordingProxy(
        llm.url, "e", port=0, workspace=workspace, api_key="p", upstream_api_key="up-key"
    ) as px:
        openai.OpenAI(base_url=px.url, api_key="p").chat.completions.create(model="m", messages=MSG)
        assert llm.requests[-1]["headers"]["Authorization"] == "Bearer up-key"


def test_non_loopback_host_warns(llm: StubLLM, workspace: Path, caplog: pytest.LogCaptureFixture):
    with (
        caplog.at_level("INFO", logger="simtune.collect.proxy"),
        RecordingProxy(llm.url, "e", host="0.0.0.0", port=0, workspace=workspace) as px,
    ):
        code, _, _ = http_call(f"http://127.0.0.1:{px.port}/health")
        assert code == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("not loopback" in w and "--api-key" in w for w in warnings)
    assert any(px.url in r.getMessage() for r in caplog.records)


def test_options_are_checked():
    assert upstream_base("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert upstream_base("http://h:1/v1/chat/completions") == "http://h:1/v1"
    assert upstream_base("https://h/openai/v1/") == "https://h/openai/v1"
    with pytest.raises(ConfigError, match="--upstream"):
        RecordingProxy("localhost:8000", "e")
    with pytest.raises(ConfigError, match="--env"):
        RecordingProxy("http://h", "../e")
    with pytest.raises(ConfigError, match="--credit"):
        RecordingProxy("http://h", "e", credit="best")
    assert parse_prefix("/runs/r/agents/a%2Fb/v1/chat/completions") == (
        {"run_id": "r", "agent_id": "a/b"},
        "chat/completions",
    )
    assert parse_prefix("/agents/v1/v1/models") == ({"agent_id": "v1"}, "models")
    assert parse_prefix("/agents/a/agents/b/v1/models") is None
    # One declaration (ProxyArgs' module), read by the flags, the proxy and the writer.
    from simtune.cli.main import build_parser
    from simtune.collect import proxy
    from simtune.config import proxy as proxy_args
    from simtune.decisions import writer

    assert writer.FSYNC_POLICIES is proxy_args.FSYNC_POLICIES
    assert writer.CREDIT_RULES is proxy_args.CREDIT_RULES
    assert proxy.DEFAULT_PORT == proxy_args.DEFAULT_PORT
    argv = ["collect", "proxy", "--upstream", "http://127.0.0.1:1/v1", "--env", "market"]
    args = build_parser().parse_args(argv)
    assert args.port == proxy_args.DEFAULT_PORT


# --- the real command line -----------------------------------------------------------


def test_cli_proxy_records_and_stops_cleanly_on_sigterm(llm: StubLLM, workspace: Path):
    port = free_port()
    exe = Path(sys.executable).with_name("simtune")
    proc = subprocess.Popen(
        [
            str(exe),
            "collect",
            "proxy",
            "--upstream",
            llm.url,
            "--env",
            "market",
            "--port",
            str(port),
            "--workspace",
            str(workspace),
            "--run-id",
            "cli-run",
            "--credit",
            "last",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SIMTUNE_PROXY_API_KEY": ""},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30, proc=proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/agents/ann/v1", api_key="x")
        ids = [
            client.chat.completions.create(model="m", messages=MSG).model_extra[
                "simtune_decision_id"
            ]
            for _ in range(2)
        ]
        code, _, body = http_call(f"http://127.0.0.1:{port}/agents/ann/v1/rewards", {"value": 1})
        assert code == 200 and json.loads(body)["shares"] == [0.0, 1.0]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/v1" in err and "proxy stopped: 2 decision(s)" in err
    ds = read_dataset([str(workspace / "envs" / "market" / "datasets")])
    got = {d.decision_id: d for d in ds.decisions}
    assert set(got) == set(ids)
    assert [got[i].reward for i in ids] == [0.0, 1.0]
    assert {d.run_id for d in ds.decisions} == {"cli-run"}
    assert {d.agent_id for d in ds.decisions} == {"ann"}


def test_cli_reports_a_busy_port_in_one_line(llm: StubLLM, workspace: Path):
    from conftest import run_cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        res = run_cli(
            "collect", "proxy", "--upstream", llm.url, "--env", "e",
            "--port", str(busy.getsockname()[1]), "--workspace", str(workspace), timeout=60,
        )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "cannot listen" in res.stderr
