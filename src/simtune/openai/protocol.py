"""OpenAI's chat/completions wire format, parsed once for the recording proxy, the
in-process `Recorder` and `simtune serve` (plain Python: no aiohttp, no torch, cheap to
import).

- `check_messages`: a request's ``messages`` checked and normalised (refusing what the
  dataset reader would refuse), raising `ProtocolError` with the JSON path of the
  field (``messages[2].content``) as ``param``.
- `answer_of`: the first choice of a non-streamed answer (text, finish reason, tool
  calls, model, id, usage) as an `Answer`.
- `StreamAssembly`: the same, assembled from a stream's chunks (parsed objects, or the
  payloads of SSE ``data:`` lines as bytes).
- `check_tools`, `check_tool_calls`, `check_tool_choice`: a request's tool schemas, an
  assistant turn's (or a record's) tool calls and ``tool_choice``, checked the same way.
- `template_messages`: checked messages as chat templates take them (tool-call arguments
  as objects, Hugging Face's convention, where the wire carries JSON text).
- `error_body`, `sse_event`: OpenAI's error object and one SSE event, as servers send them.

The proxy reads JSON it parsed itself (dicts); the Recorder reads what an OpenAI-style
client library hands its caller (pydantic models, or dicts from duck-typed clients).
One core reads both through `field`, so the two cannot drift apart; the adapters only
differ in how they get the objects (bytes on the wire vs. a client's return value).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_SCALARS = (str, bytes, int, float, bool, list, tuple)


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
"""The chat roles a record's messages may have (OpenAI's): what a record may hold and a server
accepts."""


def role_problem(role: str) -> str | None:
    """Why `role` is not one of `CHAT_ROLES` (the words every reader and server uses), or
    None when it is."""
    if role in CHAT_ROLES:
        return None
    return f"unknown role {role[:50]!r} (expected one of {', '.join(CHAT_ROLES)})"


class ProtocolError(ValueError):
    """A request that breaks the OpenAI wire format. `param` is the JSON path of the
    offending field (OpenAI's ``param``), `code` OpenAI's error code where one applies.
    A ValueError, so in-process callers (the Recorder) can treat it as one."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def check_messages(
    value: Any, *, flatten: bool = False, null_content: bool = True
) -> list[dict[str, Any]]:
    """A chat request's ``messages``, checked: a non-empty list of objects with a known
    string ``role`` and a ``content`` that is a string, a list of parts or null. Returns
    new plain messages (the input is not modified): null content becomes ``""``.
    Tool turns as OpenAI has them: an assistant message's ``tool_calls`` are checked
    (`check_tool_calls`, an empty list counting as none) and a ``tool`` message needs a
    string ``tool_call_id``; other keys (``name``, ...) are kept.

    `flatten` (for a chat template, which takes text): list content becomes one string,
    its parts' ``text`` joined, and every part must have a string ``text``. Without it
    (the proxy and the Recorder, which record what the model was sent) list content is
    kept as sent and parts without ``text`` (images, audio) are allowed: the model may
    take them, and the dataset reader keeps the text parts.

    `null_content` False refuses null content instead, except on a turn that called
    tools (`Recorder.record`: there the caller writes the record by hand, and a missing
    text is more likely a mistake)."""
    if value is None:
        raise ProtocolError(
            "'messages' is required", param="messages", code="missing_required_parameter"
        )
    if not isinstance(value, list) or not value:
        raise ProtocolError("'messages' must be a non-empty list of messages", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ProtocolError(
                f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]"
            )
        if why := role_problem(m["role"]):
            raise ProtocolError(f"messages[{i}].role: {why}", param=f"messages[{i}].role")
        calls = m.get("tool_calls")
        if isinstance(calls, (list, tuple)) and not calls:
            calls = None  # some clients send an empty list on every assistant turn
        if calls is not None:
            if m["role"] != "assistant":
                raise ProtocolError(
                    f"messages[{i}].tool_calls: only an assistant message calls tools",
                    param=f"messages[{i}].tool_calls",
                )
            m = {**m, "tool_calls": check_tool_calls(calls, f"messages[{i}].tool_calls")}
        if m["role"] == "tool" and not (
            isinstance(m.get("tool_call_id"), str) and m["tool_call_id"]
        ):
            raise ProtocolError(
                f"messages[{i}].tool_call_id: a tool message needs the string id of the "
                "call it answers",
                param=f"messages[{i}].tool_call_id",
            )
        content = m.get("content")
        if content is None and (null_content or calls):  # an assistant turn that only called tools
            m = {**m, "content": ""}
        elif isinstance(content, list):
            # A part without 'text' counts as "" unless the content must be all text.
            missing = None if flatten else ""
            texts = [p.get("text", missing) if isinstance(p, dict) else None for p in content]
            if not all(isinstance(t, str) for t in texts):
                raise ProtocolError(
                    f"messages[{i}].content parts must be objects with a string 'text'",
                    param=f"messages[{i}].content",
                )
            if flatten:
                m = {**m, "content": "".join(texts)}  # type: ignore[arg-type]
        elif not isinstance(content, str):
            raise ProtocolError(
                f"messages[{i}].content must be a string, a list of parts"
                + (" or null" if null_content else ""),
                param=f"messages[{i}].content",
            )
        out.append(m)
    return out


# --- tools --------------------------------------------------------------------------------


def _bad(where: str, message: str) -> ProtocolError:
    return ProtocolError(f"{where}: {message}", param=where)


def check_tools(value: Any, where: str = "tools") -> list[dict[str, Any]] | None:
    """A request's ``tools`` (None when absent or empty): a list of
    ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``, returned
    as plain dicts, otherwise as sent (``parameters`` is the caller's JSON schema: the
    chat template shows it to the model verbatim)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise _bad(where, "must be a list of tools")
    out = []
    for i, tool in enumerate(value):
        tool = plain(tool)
        at = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise _bad(at, "must be an object")
        if tool.get("type", "function") != "function":
            raise _bad(
                f"{at}.type", f"unsupported tool type {tool.get('type')!r} (only 'function')"
            )
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{at}.function", "must be an object with a 'name'")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"{at}.function.name", "must be a non-empty string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _bad(f"{at}.function.parameters", "must be a JSON schema object")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise _bad(f"{at}.function.description", "must be a string")
        out.append({**tool, "type": "function"})
    return out or None


def check_tool_calls(value: Any, where: str = "tool_calls") -> list[dict[str, Any]]:
    """An assistant turn's ``tool_calls`` in OpenAI's shape: a non-empty list of
    ``{"id", "type": "function", "function": {"name", "arguments"}}`` whose ``arguments``
    is a string (the wire's JSON text, kept verbatim: a model may have written invalid
    JSON, and that is what it said). Keys come back in the wire's order (id, type,
    function: name, arguments) however they were read, so one call is one text."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _bad(where, "must be a non-empty list of tool calls")
    out = []
    for i, call in enumerate(value):
        call = plain(call)
        at = f"{where}[{i}]"
        if not isinstance(call, dict):
            raise _bad(at, "must be an object")
        if call.get("type", "function") != "function":
            raise _bad(
                f"{at}.type", f"unsupported call type {call.get('type')!r} (only 'function')"
            )
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise _bad(f"{at}.id", "must be a string")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{at}.function", "must be an object with 'name' and 'arguments'")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"{at}.function.name", "must be a non-empty string")
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            raise _bad(f"{at}.function.arguments", "must be a string (JSON text)")
        entry: dict[str, Any] = {"id": call["id"]} if call.get("id") is not None else {}
        entry["type"] = "function"
        entry["function"] = {**_in_order(fn, ("name", "arguments")), "arguments": args}
        out.append(entry)
    return out


TOOL_CHOICES = ("auto", "none")


def check_tool_choice(value: Any) -> str:
    """A request's ``tool_choice``: ``"auto"`` (the default) or ``"none"``. Forcing a call
    (``"required"``, a named function) would need constrained decoding, which `simtune
    serve` does not do: refused rather than silently not honoured."""
    if value is None:
        return "auto"
    if value in TOOL_CHOICES:
        return value
    raise ProtocolError(
        f"tool_choice: only {' or '.join(repr(c) for c in TOOL_CHOICES)} is supported",
        param="tool_choice",
    )


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked messages as a chat template takes them: each tool call's ``arguments``
    parsed into an object where it is a JSON object (Hugging Face templates -- Qwen2.5,
    Hermes, SmolLM3 -- ``tojson`` them, which would render OpenAI's JSON text as one
    quoted string), left as text otherwise. The input is not modified."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_template_call(c) for c in calls]}
        out.append(m)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            fn = {**fn, "arguments": parsed}
    return {**call, "function": fn}


# --- answers ------------------------------------------------------------------------------


def field(obj: Any, name: str) -> Any:
    """``obj[name]`` of a JSON object, ``obj.name`` of a client library's response model;
    None for anything else (JSON scalars and lists have no fields: ``"x".index`` is a
    method, not the choice's index)."""
    if isinstance(obj, dict):
        return obj.get(name)
    if obj is None or isinstance(obj, _SCALARS):
        return None
    return getattr(obj, name, None)


def plain(obj: Any) -> Any:
    """A response model as a plain dict (fields that are None left out), else `obj`."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(exclude_none=True)
    return obj


def usage_of(obj: Any) -> dict[str, Any] | None:
    """The ``usage`` object of an answer or chunk, as a plain dict (None if absent)."""
    usage = plain(field(obj, "usage"))
    return usage if isinstance(usage, dict) and usage else None


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the joined ``text`` of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = [field(p, "text") for p in content]
        return "".join(t for t in texts if isinstance(t, str))
    return ""


def _is_index_0(choice: Any) -> bool:
    index = field(choice, "index")
    return index is None or index == 0


def _first_choice(choices: Any) -> Any:
    """Choice 0 (the one a caller reads as the answer), else the first one."""
    if not isinstance(choices, (list, tuple)) or not choices:
        return None
    for c in choices:
        if c is not None and not isinstance(c, _SCALARS) and _is_index_0(c):
            return c
    return choices[0]


def _in_order(obj: Any, first: tuple[str, ...]) -> Any:
    """A dict with the keys `first` (those present) first, the others after."""
    if not isinstance(obj, dict):
        return obj
    out = {k: obj[k] for k in first if k in obj}
    out.update(obj)  # the keys already in `out` keep their place
    return out


def calls_text(calls: list[Any]) -> str:
    """Tool calls as text: the JSON list of the calls, keys in the wire's order (id, type,
    function: name, arguments) however they were read (a client's models dump theirs
    alphabetically). What records before tool-call support held as ``output`` (the
    reader recognises those), and the fallback a template without tool support trains on."""
    ordered = []
    for call in calls:
        call = _in_order(call, ("id", "type", "function"))
        if isinstance(call, dict) and "function" in call:
            call = {**call, "function": _in_order(call["function"], ("name", "arguments"))}
        ordered.append(call)
    return json.dumps(ordered, ensure_ascii=False)


def _answer_calls(calls: list[Any]) -> list[Any]:
    """An answer's tool calls in OpenAI's shape when they are well-formed (the usual
    case), else as they came (recorded, and refused by the reader, rather than dropped)."""
    try:
        return check_tool_calls(calls)
    except ProtocolError:
        return [plain(c) for c in calls]


@dataclass
class Answer:
    """The first choice of an answer: what a decision records."""

    text: str
    """The output: the message's text (``""`` for an answer that only called tools)."""
    finish_reason: str | None = None
    tool_calls: list[Any] | None = None
    """The tool calls, in OpenAI's shape (`check_tool_calls`); None when there are none."""
    n_choices: int = 1
    model: str | None = None
    id: str | None = None
    usage: dict[str, Any] | None = None

    @property
    def empty(self) -> bool:
        """No text and no tool calls: nothing a decision record could hold."""
        return not self.tool_calls and not self.text.strip()


def answer_of(response: Any, chat: bool) -> Answer:
    """The first choice of a non-streamed chat (`chat`) or text completion answer; its
    `text` is ``""`` when there is none (not recordable unless it called tools: the
    reader refuses empty outputs)."""
    choices = field(response, "choices")
    first = _first_choice(choices)
    answer = Answer(
        text="",
        finish_reason=field(first, "finish_reason"),
        n_choices=len(choices) if isinstance(choices, (list, tuple)) else 1,
        model=field(response, "model"),
        id=field(response, "id"),
        usage=usage_of(response),
    )
    if not chat:
        text = field(first, "text")
        answer.text = text if isinstance(text, str) else ""
        return answer
    msg = field(first, "message")
    answer.text = content_text(field(msg, "content"))
    calls = field(msg, "tool_calls")
    if isinstance(calls, (list, tuple)) and calls:
        answer.tool_calls = _answer_calls(list(calls))
    elif function_call := field(msg, "function_call"):  # the legacy single-call shape
        answer.tool_calls = _answer_calls([{"type": "function", "function": plain(function_call)}])
    return answer


class StreamAssembly:
    """The first choice of a streamed answer, assembled chunk by chunk (`feed` for
    parsed chunks, `feed_data` for SSE payloads as bytes); `answer` once it ended."""

    __slots__ = ("chat", "parts", "calls", "model", "finish", "usage", "id", "ended", "bad")

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.parts: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.model: str | None = None
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.id: str | None = None
        self.ended = False  # saw ``data: [DONE]``
        self.bad: str | None = None  # why this stream cannot be recorded

    def feed_data(self, payload: bytes) -> bool:
        """One SSE ``data:`` payload (the bytes after ``data:``, stripped): ``[DONE]``
        ends the stream; a JSON object is a chunk; anything else spoils the stream.
        True when it was a chunk."""
        if payload == b"[DONE]":
            self.ended = True
            return False
        if not payload.startswith(b"{"):
            self.bad = self.bad or "a data event that is not a JSON object"
            return False
        try:
            chunk = json.loads(payload)
        except (ValueError, RecursionError):
            self.bad = self.bad or "a data event that is not valid JSON"
            return False
        self.feed(chunk)
        return True

    def feed(self, chunk: Any) -> None:
        if field(chunk, "error"):
            self.bad = "the upstream sent an error event"
            return
        self.model = field(chunk, "model") or self.model
        self.id = field(chunk, "id") or self.id
        self.usage = usage_of(chunk) or self.usage
        choices = field(chunk, "choices")
        for c in choices if isinstance(choices, (list, tuple)) else ():
            if c is None or isinstance(c, _SCALARS) or not _is_index_0(c):
                continue
            finish = field(c, "finish_reason")
            if finish:
                self.finish = finish
            if not self.chat:
                text = field(c, "text")
                if isinstance(text, str) and text:
                    self.parts.append(text)
                continue
            delta = field(c, "delta")
            text = content_text(field(delta, "content"))
            if text:
                self.parts.append(text)
            calls = field(delta, "tool_calls")
            for call in calls if isinstance(calls, (list, tuple)) else ():
                self._add_call(call)

    def _add_call(self, call: Any) -> None:
        """A tool call arrives in pieces: its id and name once, its arguments in parts."""
        if call is None or isinstance(call, _SCALARS):
            return
        index = field(call, "index")
        entry = self.calls.setdefault(
            index if isinstance(index, int) else 0,
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if field(call, "id"):
            entry["id"] = field(call, "id")
        fn = field(call, "function")
        for key in ("name", "arguments"):
            piece = field(fn, key)
            if isinstance(piece, str):
                entry["function"][key] += piece

    def answer(self) -> Answer:
        text = "".join(self.parts)
        calls = None
        if self.calls:  # a call whose id never came is recorded without one
            pieces = [self.calls[k] for k in sorted(self.calls)]
            calls = _answer_calls([{k: v for k, v in c.items() if v is not None} for c in pieces])
        return Answer(
            text=text,
            finish_reason=self.finish,
            tool_calls=calls,
            model=self.model,
            id=self.id,
            usage=self.usage,
        )


# --- what servers send --------------------------------------------------------------------


def error_body(
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse_event(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
"""The event that ends an OpenAI stream."""
