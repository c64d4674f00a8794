"""What simtune's OpenAI-compatible HTTP servers share (the recording proxy, `serve`).

- `start_site`: the aiohttp application (every path to one dispatch coroutine), its
  runner and the TCP site: bind host/port (a `ConfigError` naming ``--host/--port`` when
  that fails), warn when the address is not loopback (`is_loopback`).
- `LoopThread`: both have an async ``startup()`` (bind, open logs) and ``shutdown()``
  (drain calls in flight, close), used from tests and Python code as
  ``with Server(...):`` (a background thread) and from the CLI as a blocking process
  that stops cleanly on SIGINT/SIGTERM.
- `Reject` / `error_response`: a request answered with OpenAI's error shape
  (`simtune.openai.protocol.error_body`), which the official client turns into its
  typed exceptions; `reject_from` turns a `ProtocolError` (bad messages) into a 400.

The wire format itself (messages, answers, streams, the error object) is
`simtune.openai.protocol`, which needs no aiohttp.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from simtune import jsontext
from simtune.errors import ConfigError
from simtune.openai.protocol import ProtocolError, error_body

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


def reject_from(exc: ProtocolError) -> Reject:
    """A request that breaks the wire format (`simtune.openai.protocol`): a 400."""
    return Reject(400, exc.message, param=exc.param, code=exc.code)


def parse_body(body: bytes) -> Any:
    """A request body by the strict rules of `simtune.jsontext` (400 naming the field)."""
    try:
        return jsontext.loads(body, max_depth=jsontext.REQUEST_MAX_DEPTH)
    except jsontext.JSONTextError as exc:
        where = f"{exc.field}: " if exc.field else ""
        raise Reject(
            400,
            f"the request body is not valid JSON: {where}{exc.message[:200]}",
            param=exc.field,
            code="invalid_json",
        ) from None


def check_headers(headers: Any) -> None:
    """400 naming the header when a value holds bytes that are not UTF-8 (aiohttp keeps
    them as surrogate escapes, which can be neither recorded nor forwarded)."""
    for name, value in headers.items():
        if jsontext.has_surrogate(value):
            raise Reject(
                400,
                f"header {name}: not UTF-8 text",
                param=name,
                code="invalid_header",
            )


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

    resp = web.json_response(
        error_body(exc.message, type_=exc.type, param=exc.param, code=exc.code),
        status=exc.status,
    )
    if exc.status == 413 or exc.code == "client_gone":
        # The body is left unread (or the client is gone): close, rather than read on.
        resp.force_close()
    return resp


def app_runner(app: Any, **kwargs: Any) -> Any:
    """An aiohttp ``AppRunner`` whose own errors (a request line or headers its parser
    refuses, a body it cannot read) are answered in OpenAI's JSON error shape and logged
    as one INFO line (a client's mistake, not the server's), instead of aiohttp's plain
    text and an ERROR with a traceback. Relies on aiohttp's ``RequestHandler.handle_error``
    (3.x): the hook aiohttp calls for exactly these."""
    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler

    class _Handler(RequestHandler):
        def handle_error(
            self,
            request: Any,
            status: int = 500,
            exc: BaseException | None = None,
            message: str | None = None,
        ) -> web.StreamResponse:
            if status >= 500:
                return super().handle_error(request, status, exc, message)
            log.info(
                "refused a malformed request from %s: %d %s",
                getattr(request, "remote", None),
                status,
                (message or str(exc or ""))[:200].replace("\n", " "),
            )
            if request.writer.output_size > 0:
                raise ConnectionError("response already started: cannot send the error")
            text = (message or "").split("\n")[0] or "malformed HTTP request"
            resp = web.json_response(
                error_body(f"malformed HTTP request: {text[:300]}", code="bad_http_request"),
                status=status,
            )
            resp.force_close()
            return resp

    class _Server(web.Server):
        def __call__(self) -> RequestHandler:
            return _Handler(self, loop=self._loop, **self._kwargs)

    class _Runner(web.AppRunner):
        async def _make_server(self) -> web.Server:
            server = await super()._make_server()
            server.__class__ = _Server  # same object, our protocol factory
            return server

    # A body left unread (a 413) is still drained for a short while after the answer is
    # sent: closing a socket with unread data makes the kernel send a reset, which can
    # destroy the 413 before a client that is still sending reads it (seen under load).
    # aiohttp's default is 10 s of this; 2 s is enough on loopback and LANs and bounds
    # what a client can hold a connection for with a body nobody will read.
    kwargs.setdefault("lingering_time", 2.0)
    return _Runner(app, **kwargs)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen_error(host: str, port: int, exc: OSError) -> ConfigError:
    """The one-line error for an address that cannot be bound (taken, not ours)."""
    return ConfigError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror or exc}")


async def start_site(
    dispatch: Callable[[Any], Awaitable[Any]],
    *,
    host: str,
    port: int,
    max_body: int,
    shutdown_timeout: float,
    keyed: bool,
    reach: str,
) -> tuple[Any, int]:
    """Serve every path through `dispatch` on `host`:`port`; returns the runner (the
    caller's to ``cleanup()``) and the port bound (`port` 0 picks a free one). A port
    that cannot be bound is a `ConfigError` (the runner is cleaned up first). An address
    other than loopback logs a warning saying who can then use `reach` (and, unless
    `keyed`, that ``--api-key`` would require a key)."""
    from aiohttp import web

    app = web.Application(client_max_size=max_body)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    # No per-request logging: it costs more than the proxying itself (bench/).
    runner = app_runner(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise listen_error(host, port, exc) from None
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    if not is_loopback(host):
        log.warning(
            "listening on %s, not loopback: anyone who can reach this address can use the %s%s",
            host,
            reach,
            "" if keyed else " (set --api-key to require a key)",
        )
    return runner, bound


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
