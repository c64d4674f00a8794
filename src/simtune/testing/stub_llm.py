"""A scriptable OpenAI-compatible server on loopback, for tests, benchmarks and smoke runs.

It answers ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``
(streaming included, as server-sent events like OpenAI's) with text from a ``reply``
function, and can be told to fail the next requests with a given status (429, 500, ...)
to exercise retries. It is a real HTTP server (aiohttp) in a background thread, so the
official `openai` client, the recording proxy and the judge talk to it over TCP.

    with StubLLM(reply=lambda body: '{"number": 2}') as llm:
        client = openai.OpenAI(base_url=llm.url, api_key="x")
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

Reply = Callable[[dict[str, Any]], str]


def default_reply(body: dict[str, Any]) -> str:
    """'stub answer: <the last message or prompt, first 40 chars>'."""
    if body.get("messages"):
        text = str(body["messages"][-1].get("content", ""))
    else:
        text = str(body.get("prompt", ""))
    return f"stub answer: {text[:40]}"


class StubLLM:
    """Args:
    reply: request body -> answer text (default `default_reply`).
    model: the model id it lists and reports.
    delay: seconds to wait before answering (simulates a slow model).
    """

    def __init__(
        self,
        reply: Reply | None = None,
        *,
        model: str = "stub-model",
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
        record_requests: bool = True,
    ) -> None:
        self.reply = reply or default_reply
        self.model, self.host, self.port, self.delay = model, host, port, delay
        self.record_requests = record_requests
        self.requests: list[dict[str, Any]] = []
        self._failures: deque[tuple[int, dict[str, Any], dict[str, str]]] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None

    @property
    def url(self) -> str:
        """The ``/v1`` base URL clients use."""
        return f"http://{self.host}:{self.port}/v1"

    def fail_next(
        self,
        status: int,
        times: int = 1,
        *,
        body: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next `times` completion requests with `status` and an OpenAI-style error."""
        error = body or {"error": {"message": f"scripted failure {status}", "type": "stub_error"}}
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        with self._lock:
            self._failures.extend([(status, error, headers)] * times)

    # --- server ---------------------------------------------------------------------------

    def _app(self) -> Any:
        from aiohttp import web

        async def models(request: web.Request) -> web.Response:
            return web.json_response(
                {
                    "object": "list",
                    "data": [{"id": self.model, "object": "model", "owned_by": "stub"}],
                }
            )

        async def complete(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            chat = request.path.endswith("/chat/completions")
            if self.record_requests:
                with self._lock:
                    self.requests.append(
                        {"path": request.path, "headers": dict(request.headers), "body": body}
                    )
            with self._lock:
                failure = self._failures.popleft() if self._failures else None
            if failure is not None:
                status, error, headers = failure
                return web.json_response(error, status=status, headers=headers)
            if self.delay:
                await asyncio.sleep(self.delay)
            text = self.reply(body)
            cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            created = int(time.time())
            model = body.get("model") or self.model
            usage = {"prompt_tokens": 1, "completion_tokens": len(text.split()), "total_tokens": 0}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if not body.get("stream"):
                choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                return web.json_response(
                    {
                        "id": cid,
                        "object": "chat.completion" if chat else "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [choice],
                        "usage": usage,
                    }
                )
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            pieces = [w + " " for w in text.split(" ")]
            pieces[-1] = pieces[-1][:-1]
            for i, piece in enumerate(pieces + [None]):
                if chat:
                    delta = {} if piece is None else {"content": piece}
                    if i == 0:
                        delta["role"] = "assistant"
                    c: dict[str, Any] = {"index": 0, "delta": delta}
                else:
                    c = {"index": 0, "text": piece or ""}
                c["finish_reason"] = "stop" if piece is None else None
                chunk = {
                    "id": cid,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [c],
                }
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", complete)
        app.router.add_post("/v1/completions", complete)
        return app

    def start(self) -> StubLLM:
        from aiohttp import web

        ready = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._runner = web.AppRunner(self._app(), access_log=None)
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, self.host, self.port)
                loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            except BaseException as exc:  # reported to the caller of start()
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="stub-llm", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    def __enter__(self) -> StubLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
