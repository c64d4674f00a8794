"""Stop signals routed to a handler for the length of a block (training, a launch)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[bool]:
    """Send SIGINT and SIGTERM to `handler` while the block runs, then restore the
    previous handlers. Yields whether the handler was installed: Python sets signal
    handlers from the main thread only, so elsewhere the block runs without it."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield True
    finally:
        for s, h in previous.items():
            if h is not None:  # None: set outside Python; cannot be restored
                signal.signal(s, h)
