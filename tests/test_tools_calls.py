"""Tool-call decisions end to end: recorded and read in OpenAI's shape (``tools``,
``tool_calls``, ``tool`` messages), trained on as the chat template renders them, served
back as ``message.tool_calls`` -- and bad tool input refused, naming the field."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import run_cli

from simtune.collect.proxy import RecordingProxy
from simtune.collect.recorder import Recorder
from simtune.decisions import read_dataset

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "buy",
            "description": "Buy goods",
            "parameters": {
                "type": "object",
                "properties": {"qty": {"type": "integer"}},
                "required": ["qty"],
            },
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "buy", "arguments": '{"qty": 3}'}}
HISTORY = [
    {"role": "system", "content": "You trade."},
    {"role": "user", "content": "Buy some."},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "bought 3"},
    {"role": "user", "content": "Again."},
]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# --- record and read ----------------------------------------------------------------------


def test_recorder_keeps_tools_calls_and_tool_messages_and_the_reader_reads_them(workspace):
    with Recorder("market", workspace=workspace) as rec:
        did = rec.record(messages=HISTORY, output="", tools=TOOLS, tool_calls=[CALL])
        rec.record(prompt="plain", output="text answer")
        path = rec.path
    first, plain = _lines(path)
    assert first["tools"] == TOOLS and first["tool_calls"] == [CALL] and first["output"] == ""
    assert first["messages"][2] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert first["messages"][3]["tool_call_id"] == "call_1"
    assert "tools" not in plain and "tool_calls" not in plain
    ds = read_dataset([str(path)])
    d = next(x for x in ds.decisions if x.decision_id == did)
    assert d.tools == TOOLS and d.tool_calls == [CALL] and d.output == ""
    assert d.messages[2] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert d.messages[3] == {"role": "tool", "content": "bought 3", "tool_call_id": "call_1"}
    assert d.target_message() == {"role": "assistant", "content": "", "tool_calls": [CALL]}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
         "tool_calls[0].function.name"),
        ({"tool_calls": [{"function": {"name": "buy", "arguments": {"qty": 3}}}]},
         "tool_calls[0].function.arguments"),
        ({"tools": {"buy": {}}, "output": "x"}, "tools"),
        ({"messages": [{"role": "tool", "content": "r"}], "output": "x"},
         "messages[0].tool_call_id"),
    ],
)  # fmt: skip
def test_recorder_refuses_bad_tool_input_and_writes_nothing(workspace, kwargs, field):
    rec = Recorder("market", workspace=workspace)
    args = {"messages": [{"role": "user", "content": "hi"}], "output": "", **kwargs}
    with pytest.raises(ValueError, match="^" + re.escape(f"record: {field}:")):
        rec.record(**args)
    assert rec.path is None  # nothing half-written
    rec.close()


def test_proxy_records_the_requests_tools_and_tool_history(workspace, tiny_server):
    with RecordingProxy(tiny_server.url, "market", port=0, workspace=workspace) as px:
        client = openai.OpenAI(base_url=px.url, api_key="x", max_retries=0)
        client.chat.completions.create(
            model="base", messages=HISTORY, tools=TOOLS, tool_choice="auto", max_tokens=4
        )
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="base", messages=HISTORY[:2], tools="buy")
        assert bad.value.body["param"] == "tools"
        (rec,) = _lines(px.path)
    assert rec["tools"] == TOOLS and "tools" not in rec["metadata"]["params"]
    assert rec["metadata"]["params"]["tool_choice"] == "auto"
    assert rec["messages"][2]["tool_calls"] == [CALL] and rec["messages"][3]["tool_call_id"]
    (d,) = read_dataset([str(px.path)]).decisions
    assert d.tools == TOOLS and d.messages[2]["tool_calls"] == [CALL]


def test_proxy_records_text_and_calls_and_skips_calls_the_reader_would_refuse(workspace, caplog):
    from test_proxy import ScriptedUpstream

    def answer(message: dict[str, Any]) -> dict[str, Any]:
        return {"id": "x", "object": "chat.completion", "model": "up", "choices": [
            {"index": 0, "finish_reason": "tool_calls", "message": message}]}  # fmt: skip

    both = {"role": "assistant", "content": "Buying.", "tool_calls": [CALL]}
    bad_call = {**CALL, "function": {"name": "buy", "arguments": {"qty": 3}}}  # not JSON text
    up = ScriptedUpstream(
        ScriptedUpstream.json(answer(both)),
        ScriptedUpstream.json(
            answer({"role": "assistant", "content": None, "tool_calls": [bad_call]})
        ),
    )
    with RecordingProxy(up.url, "market", port=0, workspace=workspace) as px:
        client = openai.OpenAI(base_url=px.url, api_key="x", max_retries=0)
        first = client.chat.completions.create(model="m", messages=HISTORY[:2], tools=TOOLS)
        assert first.choices[0].message.tool_calls[0].function.name == "buy"
        with caplog.at_level(logging.WARNING, logger="simtune.collect.proxy"):
            second = client.chat.completions.create(model="m", messages=HISTORY[:2], tools=TOOLS)
        assert second.choices[0].finish_reason == "tool_calls"  # the caller still gets it
        (rec,) = _lines(px.path)
    assert rec["output"] == "Buying." and rec["tool_calls"] == [CALL] and rec["tools"] == TOOLS
    assert "not recorded" in caplog.text and "tool_calls[0].function.arguments" in caplog.text


def test_old_records_with_calls_as_json_text_read_as_tool_calls(tmp_path):
    old = {
        "decision_id": "d1",
        "messages": [{"role": "user", "content": "hi"}],
        "output": json.dumps([CALL]),
        "metadata": {"source": "proxy", "tool_calls": [CALL], "params": {"tools": TOOLS}},
    }
    text = {"decision_id": "d2", "prompt": "p", "output": '["a list", "not calls"]',
            "metadata": {"tools": TOOLS}}  # fmt: skip
    path = tmp_path / "decisions_old.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (old, text)))
    d1, d2 = read_dataset([str(path)]).decisions
    assert d1.tool_calls == [CALL] and d1.output == "" and d1.tools == TOOLS
    assert d2.tool_calls is None and d2.output == text["output"] and d2.tools == TOOLS
    # Some clients send "tool_calls": [] on every assistant turn: no calls, not an error.
    from simtune.openai.protocol import check_messages

    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "tool_calls": []},
    ]
    assert check_messages(turns) == turns
    empty = {"decision_id": "d3", "messages": turns + [turns[0]], "output": "c", "tool_calls": []}
    path.write_text(json.dumps(empty) + "\n")
    (d3,) = read_dataset([str(path)]).decisions
    assert d3.tool_calls is None and d3.messages[1] == {"role": "assistant", "content": "b"}


def test_validate_names_file_line_and_tool_field(tmp_path):
    good = {"decision_id": "ok", "messages": [{"role": "user", "content": "hi"}],
            "output": "", "tools": TOOLS, "tool_calls": [CALL]}  # fmt: skip
    bad_call = {**good, "decision_id": "b1", "tool_calls": [{"function": {"name": 3}}]}
    bad_tool_msg = {**good, "decision_id": "b2",
                    "messages": [*HISTORY[:3], {"role": "tool", "content": "r"}]}  # fmt: skip
    bad_tools = {**good, "decision_id": "b3", "tools": "buy"}
    path = tmp_path / "decisions_bad.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in (good, bad_call, bad_tool_msg, bad_tools))
    )
    res = run_cli("data", "validate", str(path))
    assert res.returncode == 2, res.stdout + res.stderr
    out = res.stdout
    assert f"{path}:2: field 'tool_calls[0].function.name': must be a non-empty string" in out
    assert f"{path}:3: field 'messages[3].tool_call_id':" in out
    assert f"{path}:4: field 'tools': must be a list of tools" in out


# --- train ----------------------------------------------------------------------------------

OLD_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_tiny_template_renders_tools_and_is_unchanged_without_them():
    from simtune.training.tiny import build_tokenizer

    tok = build_tokenizer()
    plain = [HISTORY[0], HISTORY[1], {"role": "assistant", "content": "ok"}, HISTORY[3]]
    for gen in (True, False):
        assert tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=gen) == (
            tok.apply_chat_template(
                plain, tokenize=False, add_generation_prompt=gen, chat_template=OLD_TEMPLATE
            )
        )
    from simtune.openai.protocol import template_messages

    text = tok.apply_chat_template(
        template_messages([*HISTORY[:3], HISTORY[3]]), tools=TOOLS, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou trade.\n\n# Tools\n<tools>\n")
    assert json.dumps(TOOLS[0], ensure_ascii=False) in text
    assert '<tool_call>{"name": "buy", "arguments": {"qty": 3}}</tool_call><|im_end|>' in text
    assert "<|im_start|>tool\nbought 3<|im_end|>" in text


def _tool_decisions(n: int) -> list[Any]:
    from simtune.decisions.reader import normalize

    rec = {"messages": HISTORY, "output": "", "tools": TOOLS, "tool_calls": [CALL]}
    return [normalize({**rec, "decision_id": f"d{i}"}, "f.jsonl", i + 1) for i in range(n)]


@pytest.mark.slow
def test_sft_trains_on_the_rendered_tool_call_and_the_trained_model_serves_it(tiny_model, tmp_path):
    import torch

    from simtune.config import build_config
    from simtune.serving.engine import Engine
    from simtune.serving.server import Server
    from simtune.training.model import load_model, load_tokenizer, resolve_model
    from simtune.training.sft import build_examples, train_sft

    decisions = _tool_decisions(8)
    cfg = build_config(
        overrides={
            "llm_path": str(tiny_model),
            "dataset_path": ["unused"],
            "max_steps": 60,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 8,
            "warmup_ratio": 0.0,
            "lr_scheduler_type": "constant",
            "logging_steps": 10,
            "seed": 0,
            "lora_dropout": 0.0,
        }
    )
    spec = resolve_model(str(tiny_model))
    tok = load_tokenizer(spec)
    ex = build_examples(decisions, tok, cfg)
    ids, mask = ex.input_ids[0], ex.completion_mask[0]
    answer = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    prompt = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    # The loss covers the call as the template renders it, not JSON text of the wire shape.
    assert answer == '<tool_call>{"name": "buy", "arguments": {"qty": 3}}</tool_call><|im_end|>\n'
    assert "<tools>" in prompt and '"name": "buy"' in prompt

    def answer_loss(model: Any) -> float:
        x = torch.tensor([ids])
        labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask, strict=True)]])
        with torch.no_grad():
            return float(model(input_ids=x, labels=labels).loss)

    model = load_model(spec, trainable_adapter=True)
    before_loss = answer_loss(model)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    _, trained = train_sft(cfg, ex, model, tok, tmp_path / "work", [])
    trained.eval()
    after_loss = answer_loss(trained)
    lora_after = {n: p.detach() for n, p in trained.named_parameters() if "lora_B" in n}
    assert lora_after and all(not lora_after[n].equal(p) for n, p in lora_before.items())
    assert after_loss < before_loss / 4, (before_loss, after_loss)

    # Serve the trained model: its greedy answer is the call, read back as tool_calls.
    merged = tmp_path / "merged"
    trained.merge_and_unload().save_pretrained(merged, safe_serialization=True)
    tok.save_pretrained(merged)
    engine = Engine.load([str(merged)], max_new_tokens=64, device="cpu", precision="fp32")
    try:
        with Server(engine) as srv:
            client = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)
            resp = client.chat.completions.create(
                model="base", messages=HISTORY, tools=TOOLS, temperature=0
            )
            choice = resp.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            (call,) = choice.message.tool_calls
            assert call.type == "function" and call.id.startswith("call_")
            assert call.function.name == "buy" and json.loads(call.function.arguments) == {"qty": 3}
            assert choice.message.content is None
            stream = client.chat.completions.create(
                model="base", messages=HISTORY, tools=TOOLS, temperature=0, stream=True
            )
            chunks = list(stream)
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            calls = [tc for d in deltas for tc in d.tool_calls or ()]
            assert [c.function.name for c in calls] == ["buy"]
            assert json.loads(calls[0].function.arguments) == {"qty": 3}
            assert not "".join(d.content or "" for d in deltas)
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
            # tool_choice "none": no tools in the prompt, nothing parsed: a text answer.
            text = client.chat.completions.create(
                model="base", messages=HISTORY, tools=TOOLS, tool_choice="none", temperature=0
            )
            assert text.choices[0].message.tool_calls is None
            assert text.choices[0].finish_reason in ("stop", "length")
    finally:
        engine.close()


def test_a_template_without_tools_warns_once_and_trains_on_calls_as_text(tiny_model, caplog):
    from simtune.config import build_config
    from simtune.training import sft
    from simtune.training.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = OLD_TEMPLATE.replace("'\n' + message['content']",
                                             "'\n' + (message['content'] or '')")  # fmt: skip
    assert sft.tool_support(tok) == (False, False)
    cfg = build_config(overrides={"llm_path": str(tiny_model), "dataset_path": ["unused"]})
    sft._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="simtune.training.sft"):
        ex = sft.build_examples(_tool_decisions(3), tok, cfg)
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("ignores 'tools'" in w for w in warnings) == 1
    assert sum("ignores assistant 'tool_calls'" in w for w in warnings) == 1
    ids, mask = ex.input_ids[0], ex.completion_mask[0]
    answer = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert json.loads(answer.removesuffix("<|im_end|>\n")) == [CALL]


# --- serve ----------------------------------------------------------------------------------


def test_parse_tool_calls_on_fixed_generations():
    from simtune.serving.engine import parse_tool_calls

    got = parse_tool_calls('<tool_call>{"name": "buy", "arguments": {"qty": 3}}</tool_call>')
    assert got is not None
    content, (call,) = got
    assert content == "" and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "buy", "arguments": '{"qty": 3}'}
    two = parse_tool_calls(
        'Let me.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>'
    )
    assert two is not None and two[0] == "Let me."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in two[1]] == [
        ("a", "{}"),
        ("b", '{"x": 1}'),
    ]
    for text in (
        "no call",
        '<tool_call>{"name": "buy", "arguments": {"qty": 3}}',  # cut off by max_tokens
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "x", "arguments": [1]}</tool_call>',
    ):
        assert parse_tool_calls(text) is None, text


def test_streamed_text_is_held_only_where_a_call_may_begin():
    from simtune.serving.server import _HeldCalls

    held = _HeldCalls()
    sent = [held.add(d) for d in ["Hi <", "b>", " then <tool", "_call>", '{"name": "a", ', '"arguments": {}}', "</tool_call>"]]  # fmt: skip
    assert sent == ["Hi ", "<b>", " then ", "", "", "", ""]
    rest, calls = held.end()
    assert rest == "" and calls is not None and calls[0]["function"]["name"] == "a"
    broken = _HeldCalls()
    assert broken.add("<tool_call>{oops") == ""
    assert broken.end() == ("<tool_call>{oops", None)  # not a call: the text it was


def test_server_takes_tools_and_answers_in_openai_shape(tiny_server):
    """The random tiny model's answer is whatever it says: the response is checked for its
    shape (the parsing itself: the trained model above, and the fixed strings)."""
    client = openai.OpenAI(base_url=tiny_server.url, api_key="x", max_retries=0)
    resp = client.chat.completions.create(model="base", messages=HISTORY, tools=TOOLS)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
    else:
        assert isinstance(choice.message.content, str) and choice.finish_reason in (
            "stop",
            "length",
        )
    chunks = list(
        client.chat.completions.create(model="base", messages=HISTORY, tools=TOOLS, stream=True)
    )
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": "buy"}, "tools"),
        ({"tools": [{"type": "function", "function": {"description": "x"}}]},
         "tools[0].function.name"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
         "messages[0].tool_calls[0].function"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "r"}]},
         "messages[1].tool_call_id"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    ],
)  # fmt: skip
def test_server_refuses_bad_tool_input_naming_the_field(tiny_server, body, param):
    import urllib.error
    import urllib.request

    payload = {"model": "base", "messages": [{"role": "user", "content": "hi"}], **body}
    req = urllib.request.Request(
        tiny_server.url + "/chat/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    error = json.loads(err.value.read())["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]
