"""What simtune's OpenAI-compatible HTTP servers share (the recording proxy, `serve`).

- `LoopThread`: both are aiohttp apps with an async ``startup()`` (bind, open logs) and
  ``shutdown()`` (drain calls in flight, close), used from tests and Python code as
  ``with Server(...):`` (a background thread) and from the CLI as a blocking process
  that stops cleanly on SIGINT/SIGTERM.
- `Reject` / `error_body` / `error_response`: a request answered with OpenAI's error
  shape ``{"error": {"message", "type", "param", "code"}}``, which the official client
  turns into its typed exceptions.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


class Reject(Exception):
    """A request the server answers itself with an OpenAI-style error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type_,
        )


def error_body(
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def check_api_key(headers: Any, key: bytes | None, message: str) -> None:
    """Raise a 401 `Reject` unless `headers` carry `key` (``Authorization: Bearer KEY`` or
    ``X-Api-Key: KEY``); compared in constant time. No key configured: anything passes."""
    if key is None:
        return
    auth = headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    given = given or headers.get("X-Api-Key", "")
    # Header text may carry surrogate escapes (undecodable bytes): encode them back.
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key):
        raise Reject(401, message, code="invalid_api_key")


def error_response(exc: Reject) -> Any:
    """`exc` as an aiohttp JSON response with its status."""
    from aiohttp import web

    return web.json_response(
        error_body(exc.message, type_=exc.type, param=exc.param, code=exc.code),
        status=exc.status,
    )


class LoopThread:
    """`start()`/`stop()` a server's event loop in a daemon thread; `run_until_signal()`
    runs it in the calling thread instead."""

    def __init__(
        self,
        startup: Callable[[], Awaitable[None]],
        shutdown: Callable[[], Awaitable[None]],
        *,
        name: str,
        join_timeout: float,
    ) -> None:
        self.startup, self.shutdown = startup, shutdown
        self.name, self.join_timeout = name, join_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Returns once the server listens; a startup error is raised here."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                loop.run_until_complete(self.startup())
            except BaseException as exc:  # handed to the caller of start()
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.shutdown())
            loop.close()

        self._thread = threading.Thread(target=serve, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(60)
        if errors:
            self._thread.join()
            self.loop = self._thread = None
            raise errors[0]

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(self.join_timeout)
            self.loop = self._thread = None

    def run_until_signal(self, stopping: str = "stopping") -> None:
        """Serve in this thread until SIGINT or SIGTERM, then shut down cleanly."""
        asyncio.run(self._until_signal(stopping))

    async def _until_signal(self, stopping: str) -> None:
        await self.startup()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        try:
            await stop.wait()
            log.info("%s", stopping)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.shutdown()
