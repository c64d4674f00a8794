"""A bad-input probe for simtune's OpenAI-compatible servers (the recording proxy and
`serve`), used by ``tests/test_probe.py`` (a bounded table) and ``bench/probe.py`` (a
larger one).

Each `Case` is one raw HTTP/1.1 request (bytes on a loopback socket, so that bytes no
client library would send -- ``\\xff`` in a header, a broken request line -- can be
sent) and the answer expected: a 4xx in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``, with the status and (where one
applies) the ``param`` naming the field. `check` says what, if anything, was wrong with
an answer.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Case:
    name: str
    request: bytes
    status: int
    param: str | None = None
    """The expected ``param``; None: not checked."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes


def request(
    path: str,
    body: bytes = b"",
    *,
    method: str = "POST",
    headers: dict[str, bytes | str] | None = None,
    length: int | None = None,
) -> bytes:
    """A raw HTTP/1.1 request (``Connection: close``); header values may be bytes."""
    head: dict[str, bytes | str] = {
        "Host": "127.0.0.1",
        "Content-Type": "application/json",
        "Connection": "close",
    }
    if body or method == "POST":
        head["Content-Length"] = str(len(body) if length is None else length)
    head.update(headers or {})
    out = f"{method} {path} HTTP/1.1\r\n".encode()
    for k, v in head.items():
        out += k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) + b"\r\n"
    return out + b"\r\n" + body


def send(port: int, data: bytes, timeout: float = 30.0) -> Answer:
    """Send `data`, read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # refused before it was all sent
            pass
        raw = b""
        while not _complete(raw):
            try:
                b = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not b:
                break
            raw += b
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return Answer(0, {}, b"", raw)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return Answer(status, headers, body, raw)


def _complete(raw: bytes) -> bool:
    """Whether `raw` holds a whole answer with a Content-Length (a server may linger
    before closing, reading what is left of a refused body)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return len(body) >= int(value.strip())
            except ValueError:
                return False
    return False


def _dechunk(data: bytes) -> bytes:
    out, i = b"", 0
    while True:
        j = data.find(b"\r\n", i)
        if j < 0:
            return out
        try:
            size = int(data[i:j].split(b";")[0] or b"0", 16)
        except ValueError:  # not chunked after all (a broken answer): what there is
            return out + data[i:]
        if size == 0:
            return out
        out += data[j + 2 : j + 2 + size]
        i = j + 2 + size + 2


def check(case: Case, answer: Answer) -> str | None:
    """None when `answer` is what `case` expects, else what is wrong."""
    if answer.status != case.status:
        return f"status {answer.status}, expected {case.status}: {answer.raw[:300]!r}"
    try:
        err = json.loads(answer.body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"not an OpenAI error body: {answer.body[:300]!r}"
    if not isinstance(err, dict) or set(err) != ERROR_KEYS or not err.get("message"):
        return f"error object has the wrong shape: {err!r}"
    if case.param is not None and err["param"] != case.param:
        return f"param {err['param']!r}, expected {case.param!r} ({err['message']})"
    return None


def _chat(model: str, content: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def common_cases(model: str, *, scale: int = 1) -> list[Case]:
    """Bad input both servers must refuse the same way (`model`: a name they serve)."""
    chat = "/v1/chat/completions"
    m = json.dumps(model)
    cases = [
        Case("truncated JSON", request(chat, b'{"model": ' + m.encode() + b', "messages": ['), 400),
        Case("empty body", request(chat, b""), 400),
        Case("body not an object", request(chat, b"[1, 2]"), 400),
        Case("body a string", request(chat, b'"hello"'), 400),
        Case(
            "lone surrogate in content",
            request(
                chat,
                f'{{"model": {m}, "messages": [{{"role": "user", '
                f'"content": "a\\ud800b"}}]}}'.encode(),
            ),
            400,
            "messages[0].content",
        ),
        Case(
            "low surrogate alone",
            request(
                chat,
                f'{{"model": {m}, "messages": [{{"role": "user", '
                f'"content": "\\udc00"}}]}}'.encode(),
            ),
            400,
            "messages[0].content",
        ),
        Case(
            "raw \\xff byte in content",
            request(chat, json.dumps(_chat(model, "a_b")).encode().replace(b"a_b", b"a\xffb")),
            400,
            "messages[0].content",
        ),
        Case(
            "UTF-8-encoded surrogate in content",
            request(
                chat, json.dumps(_chat(model, "a_b")).encode().replace(b"a_b", b"\xed\xa0\x80")
            ),
            400,
            "messages[0].content",
        ),
        Case(
            "lone surrogate in a key",
            request(
                chat,
                f'{{"model": {m}, "messages": [{{"role": "user", "content": "x", '
                f'"\\ud800": 1}}]}}'.encode(),
            ),
            400,
        ),
        Case(
            "NaN temperature",
            request(chat, json.dumps(_chat(model, temperature=float("nan"))).encode()),
            400,
            "temperature",
        ),  # noqa: E501
        Case(
            "Infinity top_p",
            request(chat, json.dumps(_chat(model, top_p=float("inf"))).encode()),
            400,
            "top_p",
        ),  # noqa: E501
        Case(
            "-Infinity temperature",
            request(chat, json.dumps(_chat(model, temperature=float("-inf"))).encode()),
            400,
            "temperature",
        ),  # noqa: E501
        Case(
            "1e999 temperature",
            request(
                chat,
                f'{{"model": {m}, "messages": [{{"role": "user", "content": "x"}}], "temperature": 1e999}}'.encode(),
            ),
            400,
            "temperature",
        ),  # noqa: E501
        Case(
            "integer of 5000 digits",
            request(
                chat,
                f'{{"model": {m}, "messages": [{{"role": "user", "content": "x"}}], "seed": {"9" * 5000}}}'.encode(),
            ),
            400,
        ),  # noqa: E501
        Case(
            "messages a string",
            request(chat, json.dumps({"model": model, "messages": "hi"}).encode()),
            400,
            "messages",
        ),  # noqa: E501
        Case(
            "messages empty",
            request(chat, json.dumps({"model": model, "messages": []}).encode()),
            400,
            "messages",
        ),  # noqa: E501
        Case(
            "messages missing",
            request(chat, json.dumps({"model": model}).encode()),
            400,
            "messages",
        ),  # noqa: E501
        Case(
            "message not an object",
            request(chat, json.dumps({"model": model, "messages": ["hi"]}).encode()),
            400,
            "messages[0]",
        ),  # noqa: E501
        Case(
            "content a number",
            request(chat, json.dumps(_chat(model, 3)).encode()),
            400,
            "messages[0].content",
        ),  # noqa: E501
        Case(
            "content parts without text",
            request(chat, json.dumps(_chat(model, [{"text": 5}])).encode()),
            400,
            "messages[0].content",
        ),  # noqa: E501
        Case(
            "unknown role",
            request(
                chat,
                json.dumps(
                    {"model": model, "messages": [{"role": "wizard", "content": "x"}]}
                ).encode(),
            ),
            400,
            "messages[0].role",
        ),  # noqa: E501
        Case(
            "prompt missing",
            request("/v1/completions", json.dumps({"model": model}).encode()),
            400,
            "prompt",
        ),  # noqa: E501
        Case(
            "prompt a number",
            request("/v1/completions", json.dumps({"model": model, "prompt": 5}).encode()),
            400,
            "prompt",
        ),  # noqa: E501
        Case("declared body over the limit", request(chat, b"", length=17 * 1024 * 1024), 413),
        Case("GET on chat/completions", request(chat, method="GET"), 405),
        Case("unknown path", request("/nowhere", method="GET"), 404),
        Case("bad request line", b"GARBAGE\r\n\r\n", 400),
        Case("bad HTTP version", b"POST /v1/chat/completions HTTP/9.9\r\nHost: x\r\n\r\n", 400),
        Case(
            "header without a colon",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nBroken header\r\n\r\n",
            400,
        ),  # noqa: E501
        Case(
            "Content-Length not a number",
            request(chat, b"{}", headers={"Content-Length": "abc"}),
            400,
        ),  # noqa: E501
        Case("huge header", request(chat, b"{}", headers={"X-Big": "x" * 20_000}), 400),
    ]
    for levels in (150, 975, 990, 5000 * scale):
        body = json.dumps(_chat(model, user="U")).encode().replace(b'"U"', _deep(levels).encode())
        cases.append(Case(f"nesting {levels} deep", request(chat, body), 400))
    return cases


def serve_cases(model: str) -> list[Case]:
    """Bad input only `simtune serve` refuses (it generates; the proxy forwards)."""
    chat = "/v1/chat/completions"

    def c(name: str, param: str | None, **extra: Any) -> Case:
        return Case(name, request(chat, json.dumps(_chat(model, **extra)).encode()), 400, param)

    return [
        c("n=2", "n", n=2),
        c("logprobs", "logprobs", logprobs=True),
        c("max_tokens negative", "max_tokens", max_tokens=-1),
        c("max_tokens a string", "max_tokens", max_tokens="5"),
        c("temperature above 2", "temperature", temperature=3),
        c("stop a number", "stop", stop=5),
        c("stop list too long", "stop", stop=["a"] * 10),
        c("stream a string", "stream", stream="yes"),
        c("stream_options a list", "stream_options", stream_options=[1]),
        Case(
            "model not served",
            request(chat, json.dumps(_chat("no-such-model")).encode()),
            404,
            "model",
        ),
        Case(
            "echo",
            request(
                "/v1/completions",
                json.dumps({"model": model, "prompt": "x", "echo": True}).encode(),
            ),
            400,
            "echo",
        ),
    ]


def proxy_cases(model: str) -> list[Case]:
    """Bad input only the recording proxy sees (attribution headers, scores)."""
    chat = "/v1/chat/completions"
    good = json.dumps(_chat(model)).encode()
    stream = json.dumps(_chat(model, stream=True)).encode()
    rewards, ratings = "/v1/rewards", "/v1/ratings"

    def score(path: str, body: bytes, param: str | None) -> Case:
        return Case(f"{path.rsplit('/', 1)[1]}: {param}", request(path, body), 400, param)

    return [
        Case(
            "\\xff in X-Simtune-Agent-Id",
            request(chat, good, headers={"X-Simtune-Agent-Id": b"a\xffb"}),
            400,
            "X-Simtune-Agent-Id",
        ),  # noqa: E501
        Case(
            "\\xff in X-Simtune-Agent-Id, streamed",
            request(chat, stream, headers={"X-Simtune-Agent-Id": b"\xff"}),
            400,
            "X-Simtune-Agent-Id",
        ),  # noqa: E501
        Case(
            "\\xff in X-Simtune-Run-Id",
            request(chat, good, headers={"X-Simtune-Run-Id": b"\xfe\xff"}),
            400,
            "X-Simtune-Run-Id",
        ),  # noqa: E501
        Case(
            "\\xff in another header",
            request(chat, good, headers={"X-Trace": b"\xff"}),
            400,
            "X-Trace",
        ),  # noqa: E501
        Case(
            "X-Simtune-Step not an integer",
            request(chat, good, headers={"X-Simtune-Step": "three"}),
            400,
            "X-Simtune-Step",
        ),  # noqa: E501
        Case("empty path segment", request("/agents//v1/chat/completions", good), 400),
        Case(
            "%FF in a path segment", request("/agents/%FF/v1/chat/completions", good), 400, "agents"
        ),  # noqa: E501
        Case(
            "%ED%A0%80 in a path segment",
            request("/runs/%ED%A0%80/v1/chat/completions", good),
            400,
            "runs",
        ),  # noqa: E501
        Case(
            "raw \xff in the path",
            request("/X", good).replace(b"/X", b"/agents/\xff/v1/chat/completions", 1),
            400,
        ),  # noqa: E501
        score(rewards, b'{"decision_id": "d1", "value": NaN}', "value"),
        score(rewards, b'{"decision_id": "d1", "value": "1"}', "value"),
        score(rewards, b'{"decision_id": "d\\ud800", "value": 1}', "decision_id"),
        score(rewards, b'{"decision_id": "d\xff", "value": 1}', "decision_id"),
        score(
            rewards,
            b'[{"decision_id": "d1", "value": 1}, {"decision_id": "d\\udfff", "value": 2}]',
            "[1].decision_id",
        ),  # noqa: E501
        score(
            rewards,
            b'[{"decision_id": "d1", "value": 1}, {"decision_id": "d2", "value": Infinity}]',
            "[1].value",
        ),  # noqa: E501
        score(rewards, b'[{"decision_id": "d1", "value": 1}, {"decision_id": "d2"}]', "[1].value"),  # noqa: E501
        score(rewards, b'[{"decision_id": "d1", "value": 1}, 7]', None),
        score(rewards, b'{"agent_id": "a", "value": 1, "rule": "median"}', "rule"),
        score(rewards, b'{"agent_id": "a", "value": 1, "gamma": 2}', "gamma"),
        score(rewards, b"[]", None),
        score(ratings, b'{"decision_id": "d1", "rating": 4, "feedback": "b\xffd"}', "feedback"),
        score(ratings, b'{"decision_id": "d1", "rating": 4, "feedback": "\\ud800"}', "feedback"),
        score(ratings, b'{"decision_id": "d1", "rating": 4, "feedback": 5}', "feedback"),
        score(ratings, b'{"decision_id": "d1", "rating": 4, "source": "robot"}', "source"),
        score(
            ratings,
            b'[{"decision_id": "d1", "rating": 4}, {"decision_id": "d2", "rating": NaN}]',
            "[1].rating",
        ),  # noqa: E501
        Case("GET on rewards", request(rewards, method="GET"), 405),
    ]
