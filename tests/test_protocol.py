"""One parser for OpenAI's wire format (`simtune.openai.protocol`, issue 16): the same bad
message gets the same message and ``param`` from the recording proxy, `serve` and the
Recorder (real HTTP, the official client, a real tiny model); the proxy's bytes and a
client library's objects assemble to the same answer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import openai
import pytest

from simtune.collect.proxy import RecordingProxy
from simtune.collect.recorder import Recorder
from simtune.decisions.reader import read_dataset
from simtune.openai.protocol import (
    ProtocolError,
    StreamAssembly,
    answer_of,
    check_messages,
)
from simtune.testing.stub_llm import StubLLM

BAD = {
    "bad role": ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    "content part without text": (
        [{"role": "user", "content": "ok"}, {"role": "user", "content": [{"text": 5}]}],
        "messages[1].content",
    ),
    "non-string content": ([{"role": "user", "content": 3}], "messages[0].content"),
}


@pytest.fixture(scope="module")
def proxy(stub: StubLLM, tmp_path_factory: pytest.TempPathFactory):
    ws = tmp_path_factory.mktemp("protocol-ws")
    with RecordingProxy(stub.url, "proto", port=0, workspace=ws, run_id="r") as px:
        yield px


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def _refusal(url: str, model: str, messages: list[Any]) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as info:
        _client(url).chat.completions.create(model=model, messages=messages, max_tokens=2)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    return body


@pytest.mark.parametrize("case", list(BAD))
def test_the_same_bad_message_reads_the_same_everywhere(
    case: str, proxy: RecordingProxy, stub: StubLLM, tiny_server: Any, tmp_path: Path, caplog: Any
):
    messages, param = BAD[case]
    with pytest.raises(ProtocolError) as info:
        check_messages(messages)
    expected = info.value.message
    assert info.value.param == param and expected.startswith(param)
    with pytest.raises(ProtocolError) as info:  # what a chat template gets: the same words
        check_messages(messages, flatten=True)
    assert (info.value.message, info.value.param) == (expected, param)

    at_proxy = _refusal(proxy.url, "m", messages)
    assert (at_proxy["message"], at_proxy["param"]) == (expected, param)
    assert stub.requests == [] and proxy.path is None  # not forwarded, not recorded
    at_server = _refusal(tiny_server.url, "base", messages)
    assert (at_server["message"], at_server["param"]) == (expected, param)

    # `record` refuses null content too (written by hand, it is a mistake), so its words
    # for non-string content leave out "or null"; they come from the same parser.
    with pytest.raises(ProtocolError) as info:
        check_messages(messages, null_content=False)
    by_hand = info.value.message
    assert by_hand == expected.removesuffix(" or null")
    rec = Recorder("proto", workspace=tmp_path)
    with pytest.raises(ProtocolError) as info:  # a ValueError, as ever for bad arguments
        rec.record(messages=messages, output="y")
    assert (str(info.value), info.value.param) == (f"record: {by_hand}", param)
    # A wrapped client's call goes through (the stub takes anything) but is not recorded.
    client = rec.wrap(_client(stub.url))
    with caplog.at_level(logging.WARNING, logger="simtune.collect.recorder"):
        client.chat.completions.create(model="m", messages=messages)
    assert f"call not recorded: {expected}" in caplog.text
    rec.close()
    assert rec.path is None
    stub.requests.clear()


def test_parts_without_text_are_recorded_by_the_proxy_and_refused_by_serve(
    proxy: RecordingProxy, stub: StubLLM, tiny_server: Any
):
    """On purpose: the proxy forwards an image part to a model that may take it (and
    records the text parts); `serve` renders a text chat template and cannot."""
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {}}]
    messages = [{"role": "user", "content": parts}]
    answer = _client(proxy.url).chat.completions.create(model="m", messages=messages)
    assert answer.model_extra["simtune_decision_id"]
    (record,) = read_dataset([str(proxy.directory)]).decisions
    assert record.messages == [{"role": "user", "content": "what is this?"}]
    refused = _refusal(tiny_server.url, "base", messages)
    assert refused["param"] == "messages[0].content"
    assert check_messages(messages) == messages  # kept as sent, for the record
    tool = {"role": "tool", "tool_call_id": "c1"}
    flat = check_messages([{"role": "user", "content": parts[:1]}, tool], flatten=True)
    assert flat == [{"role": "user", "content": "what is this?"}, {**tool, "content": ""}]
    stub.requests.clear()


# --- answers and streams: the proxy's dicts and bytes, the client's objects -------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "buy", "arguments": '{"n": 2}'}}
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "up-model",
    "choices": [
        {
            "index": 0,
            "finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": None, "tool_calls": [CALL]},
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
            "choices": [choice], **extra}  # fmt: skip


CHUNKS = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "buy", "arguments": ""},
                }
            ]
        }
    ),  # fmt: skip
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"n": '}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "2}"}}]}),
    _chunk({}, finish="tool_calls"),
    {**_chunk({}), "choices": [], "usage": ANSWER["usage"]},
]


def test_an_answer_reads_the_same_as_json_and_as_the_clients_object():
    from openai.types.chat import ChatCompletion

    as_dict = answer_of(json.loads(json.dumps(ANSWER)), chat=True)
    as_object = answer_of(ChatCompletion.model_validate(ANSWER), chat=True)
    assert as_dict == as_object
    assert as_dict.text == "" and as_dict.tool_calls == [CALL]  # the calls are not text
    assert (as_dict.model, as_dict.id, as_dict.finish_reason) == ("up-model", "chatcmpl-1",
                                                                  "tool_calls")  # fmt: skip
    assert as_dict.usage == ANSWER["usage"]
    legacy = {"choices": [{"message": {"content": "", "function_call": CALL["function"]}}]}
    assert answer_of(legacy, chat=True).tool_calls == [{"type": "function",
                                                        "function": CALL["function"]}]  # fmt: skip
    text = {"choices": [{"index": 1, "text": "no"}, {"index": 0, "text": "yes"}]}
    assert (answer_of(text, chat=False).text, answer_of(text, chat=False).n_choices) == ("yes", 2)
    assert answer_of({"choices": "junk"}, chat=True).text == ""


def test_a_stream_assembles_the_same_from_sse_bytes_and_from_the_clients_chunks():
    from openai.types.chat import ChatCompletionChunk

    wire = StreamAssembly(chat=True)
    for chunk in CHUNKS:
        assert wire.feed_data(json.dumps(chunk).encode())
    assert not wire.feed_data(b"[DONE]") and wire.ended and wire.bad is None
    objects = StreamAssembly(chat=True)
    for chunk in CHUNKS:
        objects.feed(ChatCompletionChunk.model_validate(chunk))
    assert wire.answer() == objects.answer()
    got = wire.answer()
    assert got.text == "" and got.tool_calls == [CALL] and got.finish_reason == "tool_calls"
    assert got.usage == ANSWER["usage"] and (got.model, got.id) == ("up-model", "c1")
    broken = StreamAssembly(chat=True)
    broken.feed_data(b'{"error": {"message": "overloaded"}}')
    broken.feed_data(b"not json")
    assert broken.bad == "the upstream sent an error event"
