"""Serve a base model and its LoRA adapters as an OpenAI-compatible endpoint (DESIGN.md §7).

`simtune serve --model ID|NAME[/VERSION]|NAME@ALIAS|PATH ...` loads the base once, attaches every
adapter to it by name and answers ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions`` (streaming too) on loopback; the request's ``model`` picks the
adapter, ``"base"`` is the base model itself. From Python::

    engine = Engine.load(["sft-tiny-...", "ppo-tiny-..."], workspace=ws)
    engine.generate("base", ["Hello"], max_tokens=16)           # in-process
    with Server(engine) as server:                               # over HTTP
        client = openai.OpenAI(base_url=server.url, api_key="x")

Batching (transformers backend). One scheduler thread owns the model. It runs a decode
loop with a KV cache over a *batch of rows*; each row is one request, left-padded.
Between two decode steps it takes waiting requests (up to ``max_batch_size`` rows),
prefills them as a small batch of their own and merges their cache into the running one
(padding the shorter cache on the left), so a request arriving mid-generation joins at
the next token instead of waiting for the batch to drain ("iteration-level" or
continuous batching, like vLLM's scheduler but without paged memory). Finished and
abandoned rows (client gone) leave the batch at once, and cache columns that only
padding still uses are cut. Rows of different adapters share one batch: PEFT's mixed
batch inference (per-row adapter names, ``"__base__"`` for the base) applies each LoRA
only to its own rows; a batch of a single adapter (or only the base) instead switches
PEFT's active adapter, which is cheaper per step. Every generated token is handed to
its request as it is made, so streaming and batching work together.

Measured on the tiny model on 2 CPU cores (``bench/serve_throughput.py``): 8 concurrent
clients get ~4x the tokens/s of one client; mixed-adapter batches ~2.3x (PEFT's
per-row routing costs ~25% over a single-adapter batch there); no batching ~1x.

HTTP contract
-------------
- ``GET /health`` -> ``{"status": "ok", "models": [...]}`` (no key needed; with
  ``api_key`` set, the model names only for a request carrying the key).
- ``GET /v1/models``, ``GET /v1/models/{id}``: the served names (adapters first, then
  ``base``), OpenAI's list shape plus ``root`` (the base model) and ``parent``.
- ``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's chat template
  (generation prompt added); ``POST /v1/completions``: ``prompt`` a string, a list of
  strings (one choice each), token ids or lists of token ids.
  Honoured: ``max_tokens`` / ``max_completion_tokens`` (default: no cap but the model's
  context window, as in vLLM; ``--max-new-tokens`` sets a default and upper bound, a
  longer request is clipped and ends with ``finish_reason: "length"``), ``temperature`` (0 = greedy), ``top_p``, ``stop`` (up to
  4 strings, not included in the answer), ``stream`` and ``stream_options.include_usage``.
  ``usage`` counts prompt and completion tokens. ``n`` > 1, ``logprobs`` and ``echo``
  are refused (400); other OpenAI fields (penalties, seed, ...) are ignored.
- Tools (chat): ``tools`` (function schemas) are passed to the chat template, and
  messages may hold assistant turns with ``tool_calls`` and ``tool`` results. When the
  template writes calls as ``<tool_call>{"name", "arguments"}</tool_call>`` (Qwen2.5,
  Hermes, SmolLM3, the tiny model: `engine.tags_tool_calls`) and the answer parses as
  such calls (`engine.parse_tool_calls`), the message carries ``tool_calls`` (OpenAI's
  shape; ``content`` the text outside the tags, or null) and ``finish_reason`` is
  ``"tool_calls"``; otherwise the answer is text. Streamed, text streams until a
  ``<tool_call>`` may have begun; from there the answer is held and ends as one
  ``tool_calls`` delta (or as text, when it did not parse). ``tool_choice``: ``"auto"``
  (default) or ``"none"`` (the tools are left out of the prompt and nothing is parsed);
  forcing a call (``"required"``, a named function) is refused (400). A malformed
  ``tools``, ``tool_calls`` or a ``tool`` message without ``tool_call_id`` is a 400
  naming the field.
- Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
  a body that is not strict JSON (`simtune.jsontext`: NaN/Infinity, lone surrogates,
  nesting over ``REQUEST_MAX_DEPTH``), a body that is not an object, a missing/invalid
  field or message role, a prompt longer than the context (checked by its characters
  before tokenizing, then by tokens; tokenizing runs off the event loop), a request
  aiohttp's parser refuses -> 400; a
  ``model`` that is not served -> 404 (``code: "model_not_found"``); unknown path ->
  404; wrong method -> 405; body over 16 MiB -> 413; missing or wrong key when
  ``api_key`` is set -> 401 (``Authorization: Bearer KEY`` or ``X-Api-Key: KEY``); an
  error inside generation -> 500 (or an ``error`` event in a stream). The server keeps
  serving after any of them. Messages are checked by `simtune.openai.protocol` (the
  proxy's and the Recorder's words and ``param``); the engine's refusals
  (`simtune.serving.engine.EngineError`) become statuses here and only here:
  ``UnknownModel`` 404, ``InvalidPrompt`` (``PromptTooLong`` too) 400, ``EngineClosed``
  503, anything else 500.
- A client that disconnects mid-answer (stream or not) frees its batch row at the next
  decode step; the other requests are not affected.

Deliberate simplifications
--------------------------
- One tokenizer for all served names: the base model's (the one the adapters were
  trained with); adapters that added tokens to their own tokenizer are not supported.
- No paged KV cache: a batch's cache is as long as its longest row (left padding), so
  very uneven prompt lengths waste memory; ``max_batch_size`` bounds it.
- Requests are admitted in arrival order, with no priorities and no preemption; a
  merged cache needs plain (non-sliding-window) layers, otherwise new requests wait
  for the running batch to finish (still batched, just not mid-flight).
- The vLLM backend launches vLLM's own OpenAI server (``python -m
  vllm.entrypoints.openai.api_server``) as a subprocess with the base and
  ``--lora-modules``; it is not exercised by the test suite (no GPU, no vllm there),
  and vLLM applies its own limits: ``--max-new-tokens`` is not passed on (vLLM bounds a
  request by the model's context), ``--max-batch-size`` becomes ``--max-num-seqs``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simtune.config.serve import DEFAULT_PORT  # declared with ServeArgs (its flag's default)
from simtune.errors import ConfigError
from simtune.openai.http import (
    LoopThread,
    check_api_key,
    error_response,
    listen_error,
    parse_body,
    reject_from,
    start_site,
)
from simtune.openai.http import Reject as _Reject
from simtune.openai.protocol import (
    SSE_DONE,
    ProtocolError,
    check_messages,
    check_tool_choice,
    check_tools,
    error_body,
    sse_event,
)
from simtune.serving.engine import (
    MAX_STOP,
    TOOL_CALL_OPEN,
    Engine,
    EngineClosed,
    EngineError,
    EngineRequest,
    Generation,
    InvalidPrompt,
    Prompt,
    Sink,
    UnknownModel,
    is_token_ids,
    parse_tool_calls,
    tags_tool_calls,
)
from simtune.serving.models import BASE_NAME, alias_map, resolve_all
from simtune.serving.vllm import choose_backend, run_vllm, vllm_command, vllm_env

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)


MAX_BODY = 16 * 1024 * 1024


# What the engine's refusals are over HTTP; anything else it raises (a dead scheduler)
# is the server's fault: 500.
_STATUS: tuple[tuple[type[EngineError], int], ...] = (
    (UnknownModel, 404),
    (InvalidPrompt, 400),
    (EngineClosed, 503),
)


def _reject_from(exc: EngineError) -> _Reject:
    status = next((status for kind, status in _STATUS if isinstance(exc, kind)), 500)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return _Reject(status, exc.message, param=exc.param, code=exc.code, type_=kind)


class _AsyncSink(Sink):
    """Forwards the scheduler's callbacks into an asyncio queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.stream = stream

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server stopped
            pass

    def text(self, delta: str) -> None:
        if self.stream:
            self._put(("text", delta))

    def done(self, gen: Generation) -> None:
        self._put(("done", gen))

    def error(self, exc: BaseException) -> None:
        self._put(("error", exc))


@dataclass
class _Params:
    model: str
    prompts: list[Prompt]
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool
    include_usage: bool
    tools: list[dict[str, Any]] | None = None
    """The tool schemas for the chat template (None with ``tool_choice: "none"``)."""


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _Reject(400, f"'{key}' must be a number in [{lo:g}, {hi:g}]", param=key)
    return float(value)


def _parse(body: Any, chat: bool) -> _Params:
    if not isinstance(body, dict):
        raise _Reject(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Reject(
            400, "'model' is required (a string)", param="model", code="missing_required_parameter"
        )
    prompts: list[Prompt]
    tools = None
    if chat:
        try:  # a chat template takes text: content parts joined, null as ""
            prompts = [check_messages(body.get("messages"), flatten=True)]
            tools = check_tools(body.get("tools"))
            if check_tool_choice(body.get("tool_choice")) == "none":
                tools = None
        except ProtocolError as exc:
            raise reject_from(exc) from None
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise _Reject(
                400, "'prompt' is required", param="prompt", code="missing_required_parameter"
            )
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif isinstance(prompt, list) and prompt and all(is_token_ids(p) for p in prompt):
            prompts = [list(p) for p in prompt]
        elif is_token_ids(prompt):
            prompts = [list(prompt)]
        else:
            raise _Reject(
                400,
                "'prompt' must be a string, a list of strings, token ids or lists of token ids",
                param="prompt",
            )
        if body.get("echo"):
            raise _Reject(400, "'echo' is not supported", param="echo")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise _Reject(400, "only n=1 is supported", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _Reject(400, "'logprobs' is not supported", param="logprobs")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise _Reject(400, f"'{key}' must be a positive integer", param=key)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _Reject(400, f"'stop' must be a string or a list of up to {MAX_STOP}", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _Reject(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _Reject(400, "'stream_options' must be an object", param="stream_options")
    if stream and len(prompts) > 1:
        raise _Reject(400, "streaming takes one prompt per request", param="prompt")
    return _Params(
        model=model,
        prompts=prompts,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),  # OpenAI's default
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=stops,
        stream=bool(stream),
        include_usage=bool(options.get("include_usage")),
        tools=tools,
    )


class Server:
    """The OpenAI-compatible HTTP front of an `Engine` (contract: module docstring).

    ``start()`` serves in a background thread (``port=0`` picks a free port; see `url`);
    ``serve_forever()`` serves in this thread until SIGINT/SIGTERM. The engine is the
    caller's: `stop` does not close it.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        shutdown_timeout: float = 5.0,
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {port}")
        self.engine = engine
        self.host, self.port = host, int(port)
        self.api_key = api_key or None
        self._key = self.api_key.encode() if self.api_key else None
        self.shutdown_timeout = shutdown_timeout
        self._runner: Any = None
        # A thread of its own, or the foreground until a signal (shared with the proxy).
        self._lifecycle = LoopThread(
            self._startup,
            self._shutdown,
            name="simtune-serve",
            join_timeout=self.shutdown_timeout + 30,
        )
        self._created = int(time.time())

    @property
    def url(self) -> str:
        """The ``/v1`` base URL clients use."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    # --- lifecycle ----------------------------------------------------------------------

    async def _startup(self) -> None:
        self._runner, self.port = await start_site(
            self._dispatch,
            host=self.host,
            port=self.port,
            max_body=MAX_BODY,
            shutdown_timeout=self.shutdown_timeout,
            keyed=self.api_key is not None,
            reach="model",
        )
        log.info("serving %s at %s", ", ".join(self.engine.names), self.url)

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> Server:
        """Serve in a background thread; returns once listening (`port` is then set)."""
        self._lifecycle.start()
        return self

    def stop(self) -> None:
        """Stop serving (requests in flight get `shutdown_timeout` to finish)."""
        self._lifecycle.stop()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT or SIGTERM, then shut down cleanly."""
        self._lifecycle.run_until_signal("stopping")

    # --- requests -----------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        try:
            path = request.path.rstrip("/")
            if path == "/health":
                return web.json_response(self._health(request))
            if not path.startswith("/v1/"):
                raise _Reject(404, f"unknown path {request.path!r}", code="not_found")
            self._check_key(request)
            endpoint = path[4:]
            if endpoint in ("chat/completions", "completions"):
                if request.method != "POST":
                    raise _Reject(405, f"{path} takes POST, not {request.method}", code="method")
                return await self._completion(request, endpoint == "chat/completions")
            if endpoint == "models" or endpoint.startswith("models/"):
                if request.method != "GET":
                    raise _Reject(405, f"{path} takes GET, not {request.method}", code="method")
                return self._models(endpoint[len("models/") :] if "/" in endpoint else None)
            raise _Reject(404, f"unknown path {request.path!r}", code="not_found")
        except _Reject as exc:
            return error_response(exc)
        except EngineError as exc:
            return error_response(_reject_from(exc))
        except ConnectionError as exc:  # the client hung up (mid-body, say): not a bug
            log.info("client hung up during %s %s (%s)", request.method, request.path, exc)
            return error_response(_Reject(400, "the client hung up", code="client_gone"))
        except Exception:  # a bug: the client still gets an OpenAI-style answer
            log.exception("server error on %s %s", request.method, request.path)
            return error_response(
                _Reject(500, "internal error in simtune serve", type_="server_error")
            )

    def _check_key(self, request: web.Request) -> None:
        check_api_key(
            request.headers,
            self._key,
            "missing or wrong API key (send Authorization: Bearer KEY)",
        )

    def _health(self, request: web.Request) -> dict[str, Any]:
        """``{"status": "ok"}`` for anyone; the served names only with the key (when set)."""
        try:
            self._check_key(request)
        except _Reject:
            return {"status": "ok"}
        return {"status": "ok", "models": self.engine.names}

    def _model_card(self, name: str) -> dict[str, Any]:
        s = self.engine.served[name]
        return {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "simtune",
            "root": s.base_model,
            "parent": None if s.adapter_dir is None else BASE_NAME,
        }

    def _models(self, one: str | None) -> web.Response:
        from aiohttp import web

        if one is None:
            data = [self._model_card(n) for n in self.engine.names]
            return web.json_response({"object": "list", "data": data})
        if one not in self.engine.served:
            raise _Reject(
                404, f"the model {one!r} is not served here", param="model", code="model_not_found"
            )
        return web.json_response(self._model_card(one))

    async def _completion(self, request: web.Request, chat: bool) -> web.StreamResponse:
        from aiohttp import web

        if request.content_length is not None and request.content_length > MAX_BODY:
            raise _Reject(413, "request body over 16 MiB", code="request_too_large")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _Reject(413, "request body over 16 MiB", code="request_too_large") from None
        p = _parse(parse_body(raw), chat)
        loop = asyncio.get_running_loop()
        sinks = [_AsyncSink(loop, p.stream) for _ in p.prompts]
        # Tokenize (and refuse a bad prompt or an unknown model: an `EngineError`, answered
        # by _dispatch) before queueing any; submit takes the ids.
        # Off the event loop: a long prompt takes seconds, and other clients are waiting.
        encoded = await loop.run_in_executor(
            None, lambda: [self.engine.encode(p.model, prompt, p.tools) for prompt in p.prompts]
        )
        parse_calls = bool(p.tools) and tags_tool_calls(self.engine.tokenizer)
        reqs = [
            self.engine.submit(
                p.model,
                prompt,
                sink,
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                stop=p.stop,
            )
            for prompt, sink in zip(encoded, sinks, strict=True)
        ]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if p.stream:
            return await self._stream(request, chat, p, rid, reqs[0], sinks[0], parse_calls)
        results: list[Generation] = []
        try:
            for sink in sinks:
                while True:
                    try:
                        kind, value = await asyncio.wait_for(sink.queue.get(), timeout=0.5)
                    except TimeoutError:
                        if request.transport is None or request.transport.is_closing():
                            raise ConnectionResetError from None  # client gone: free the rows
                        continue
                    if kind == "error":
                        raise value
                    if kind == "done":
                        results.append(value)
                        break
        except ConnectionResetError:
            for r in reqs:
                self.engine.cancel(r)
            log.debug("client disconnected before its answer; request abandoned")
            return web.Response(status=499)
        except EngineError as exc:
            for r in reqs:
                self.engine.cancel(r)
            raise _reject_from(exc) from None
        except BaseException:
            for r in reqs:
                self.engine.cancel(r)
            raise
        choices = []
        for i, g in enumerate(results):
            choice: dict[str, Any] = {
                "index": i,
                "finish_reason": g.finish_reason,
                "logprobs": None,
            }
            parsed = parse_tool_calls(g.text) if parse_calls else None
            if parsed is not None:
                content, calls = parsed
                choice["message"] = {
                    "role": "assistant",
                    "content": content or None,
                    "tool_calls": calls,
                }
                choice["finish_reason"] = "tool_calls"
            elif chat:
                choice["message"] = {"role": "assistant", "content": g.text}
            else:
                choice["text"] = g.text
            choices.append(choice)
        prompt_tokens = sum(g.prompt_tokens for g in results)
        completion_tokens = sum(g.completion_tokens for g in results)
        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": p.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    async def _stream(
        self,
        request: web.Request,
        chat: bool,
        p: _Params,
        rid: str,
        req: EngineRequest,
        sink: _AsyncSink,
        parse_calls: bool = False,
    ) -> web.StreamResponse:
        from aiohttp import web

        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        held = _HeldCalls() if parse_calls else None

        def chunk(
            text: str | None,
            finish: str | None,
            first: bool = False,
            calls: list[dict[str, Any]] | None = None,
        ) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                if calls:  # whole calls in one delta (OpenAI sends them in pieces)
                    delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            choice.update(finish_reason=finish, logprobs=None)
            payload = {"id": rid, "object": obj, "created": created, "model": p.model}
            payload["choices"] = [choice]
            return sse_event(payload)

        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await resp.prepare(request)
            if chat:
                await resp.write(chunk("", None, first=True))
            while True:
                kind, value = await sink.queue.get()
                if kind == "text":
                    if held is not None:
                        value = held.add(value)
                    if value:
                        await resp.write(chunk(value, None))
                    continue
                if kind == "error":
                    exc = value
                    err = (
                        error_body(exc.message, type_="invalid_request_error", code=exc.code)
                        if isinstance(exc, EngineError)
                        else error_body("generation failed in simtune serve", type_="server_error")
                    )
                    await resp.write(sse_event(err))
                    break
                gen: Generation = value
                finish = gen.finish_reason
                if held is not None:
                    rest, calls = held.end()
                    if rest:
                        await resp.write(chunk(rest, None))
                    if calls:
                        await resp.write(chunk(None, None, calls=calls))
                        finish = "tool_calls"
                await resp.write(chunk(None if chat else "", finish))
                if p.include_usage:
                    usage = {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": p.model,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": gen.prompt_tokens,
                            "completion_tokens": gen.completion_tokens,
                            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
                        },
                    }
                    await resp.write(sse_event(usage))
                await resp.write(SSE_DONE)
                break
            await resp.write_eof()
        except ConnectionError:
            # The client hung up: free its batch row; everyone else carries on.
            self.engine.cancel(req)
            log.debug("client disconnected mid-stream; request abandoned")
        except asyncio.CancelledError:  # server shutting down
            self.engine.cancel(req)
            raise
        return resp


class _HeldCalls:
    """A streamed answer that may turn into tool calls: text passes through until a
    ``<tool_call>`` may have begun (a tail that could be the tag's start is held, as a
    stop string's is), everything after that is held until the end, where it becomes
    the calls -- or, when it does not parse as calls, the text it was."""

    __slots__ = ("pending", "calling")

    def __init__(self) -> None:
        self.pending = ""  # text not yet sent
        self.calling = False  # a <tool_call> tag was seen: hold the rest

    def add(self, delta: str) -> str:
        """The part of `delta` (with what was held) that can be sent as text now."""
        self.pending += delta
        if self.calling:
            return ""
        at = self.pending.find(TOOL_CALL_OPEN)
        if at >= 0:
            self.calling = True
            out, self.pending = self.pending[:at], self.pending[at:]
        else:
            keep = next(
                (n for n in range(min(len(TOOL_CALL_OPEN) - 1, len(self.pending)), 0, -1)
                 if self.pending.endswith(TOOL_CALL_OPEN[:n])),
                0,
            )  # fmt: skip
            out = self.pending[: len(self.pending) - keep]
            self.pending = self.pending[len(out) :]
        return out

    def end(self) -> tuple[str, list[dict[str, Any]] | None]:
        """(held text still to send, the tool calls or None)."""
        parsed = parse_tool_calls(self.pending) if self.calling else None
        if parsed is None:
            return self.pending, None
        return parsed  # the text around the calls (the text before them is sent already)


def check_port_free(host: str, port: int) -> None:
    """Fail in milliseconds, before a model is loaded, when the port is taken."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind((host, port))
        except OSError as exc:
            raise listen_error(host, port, exc) from None


def serve(
    models: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    backend: str = "auto",
    workspace: str | Path | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    max_batch_size: int = 8,
    max_new_tokens: int | None = None,
    trust_remote_code: bool = False,
    served_model_names: Sequence[str] = (),
) -> None:
    """`simtune serve`: resolve, check the port, load, serve until SIGINT/SIGTERM.
    `served_model_names` (``--served-model-name``, as in vLLM) are more names for the
    first ``--model``."""
    if max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    chosen = choose_backend(backend)
    served = resolve_all(models, workspace=workspace, tracking_uri=tracking_uri)
    aliases = alias_map(served, models, served_model_names, workspace, tracking_uri)
    check_port_free(host, port)
    if chosen == "vllm":
        cmd = vllm_command(
            served,
            host=host,
            port=port,
            max_batch_size=max_batch_size,
            trust_remote_code=trust_remote_code,
        )
        for alias, target in aliases.items():
            if target == BASE_NAME:
                cmd.insert(cmd.index("--served-model-name") + 2, alias)
            else:
                cmd += ["--lora-modules", f"{alias}={served[target].adapter_dir}"]
        run_vllm(cmd, vllm_env(api_key, device, dict(os.environ)))
        return
    engine = Engine._load_resolved(
        served,
        device=device,
        precision=precision,
        max_batch_size=max_batch_size,
        max_new_tokens=max_new_tokens,
        trust_remote_code=trust_remote_code,
    )
    engine.add_aliases(aliases)
    try:
        Server(engine, host=host, port=port, api_key=api_key).serve_forever()
    finally:
        engine.close()
