"""Run an asyncio server in a background thread, or in the foreground until a signal.

Shared by the recording proxy and `simtune serve`: both are aiohttp apps with an async
`startup()` (bind, open logs) and `shutdown()` (drain calls in flight, close), used
from tests and Python code as ``with Server(...):`` (a background thread) and from the
CLI as a blocking process that stops cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


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
