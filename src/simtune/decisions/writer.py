"""Append-only decision logs (DESIGN.md §2–4), shared by the recorder and the proxy.

Durability contract: once `DecisionLog.append` returns, the line is in the kernel's
page cache through one ``write(2)`` on an ``O_APPEND`` descriptor, so it survives the
process being killed (SIGKILL included). It survives a power cut only with
``fsync="always"``, which costs a disk flush per record (milliseconds on most disks,
against a few microseconds otherwise). Nothing is buffered in user space: there is no
queue that could die with the process. Lines are never rewritten; later scores are
appended as event lines that the reader folds into their decisions.

Episode credit (`spread_return`): an episode's return R for n decisions is assigned by
one of three rules, chosen per recorder/proxy and written into every event line:

- ``uniform`` (default): each decision gets R / n (the shares sum to R);
- ``last``: the last decision gets R, the others 0 (a sparse terminal reward);
- ``discounted``: decision i (0-based) gets ``gamma ** (n - 1 - i) * R``, the
  Monte-Carlo return seen from that decision when R arrives after the last one.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Hashable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from simtune import jsontext
from simtune.config.proxy import CREDIT_RULES, FSYNC_POLICIES  # the --fsync/--credit choices
from simtune.errors import ConfigError
from simtune.util import check_name

# Bumped in a forked child, so logs and recorders inherited through fork() notice
# (one integer compare per record, where os.getpid() would be a system call).
_fork_generation = 0
_fork_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _fork_generation, _fork_lock
    _fork_generation += 1
    _fork_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def fork_generation() -> int:
    """How many fork()s lie between the interpreter's start and this process."""
    return _fork_generation


def new_decision_id() -> str:
    """A random uuid4 as 32 hex digits (a third of the cost of ``uuid.uuid4().hex``)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return b.hex()


_stamp_cache: tuple[int, str] = (-1, "")


def utc_now() -> str:
    """ISO-8601 UTC with microseconds, e.g. ``2026-11-28T04:48:07.123456+00:00``.

    Formatting the date once per second makes this several times cheaper than
    ``datetime.now(timezone.utc).isoformat()`` (it runs once per record).
    """
    global _stamp_cache
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    cached = _stamp_cache  # one read: another thread may swap the tuple meanwhile
    if cached[0] != seconds:
        cached = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
        _stamp_cache = cached
    return f"{cached[1]}.{nanos // 1000:06d}+00:00"


# Built once: json.dumps builds a JSONEncoder, and JSONEncoder.encode a C encoder, on
# every call (a few microseconds, as much as encoding a typical record). The
# circular-reference check is off because the C encoder's recursion limit catches a
# cycle anyway (as RecursionError, turned into ValueError by `encode_json`).
_encoder = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), default=str, check_circular=False, allow_nan=False
)
try:
    from json.encoder import c_make_encoder, encode_basestring

    # The arguments JSONEncoder.iterencode passes for the options above (CPython 3.10-3.13).
    _c_encode = c_make_encoder(None, str, encode_basestring, None, ":", ",", False, False, False)
except (ImportError, TypeError):  # no C accelerator (or another signature): the slow path
    _c_encode = None


def encode_json(value: Any) -> str:
    """Compact JSON text of `value`, non-ASCII kept as is. Objects JSON doesn't know are
    written as ``str(obj)``. Raises ValueError for what the strict reader
    (`simtune.jsontext`) would refuse: NaN/Infinity, nesting deeper than its limit, and
    a self-referencing structure."""
    try:
        text = "".join(_c_encode(value, 0)) if _c_encode is not None else _encoder.encode(value)
    except RecursionError:
        raise ValueError(
            f"cannot write as JSON: nested more than {jsontext.MAX_DEPTH} levels or refers to itself"
        ) from None
    except ValueError as exc:  # allow_nan=False
        problem = jsontext.find_problem(value)
        where = f"{problem.field}: " if problem is not None and problem.field else ""
        raise ValueError(f"cannot write as JSON: {where}{exc}") from None
    if text.count("[") + text.count("{") > jsontext.MAX_DEPTH:  # cheap bound first
        problem = jsontext.find_problem(value)
        if problem is not None:
            raise ValueError(f"cannot write as JSON: {problem.field}: {problem.message}")
    return text


def encode_line(obj: dict[str, Any]) -> bytes:
    """One JSON line as UTF-8 bytes, newline included (see `encode_json`). Raises
    ValueError naming the field for a lone surrogate (not writable as UTF-8)."""
    text = encode_json(obj) + "\n"
    try:
        return text.encode()
    except UnicodeEncodeError:
        problem = jsontext.find_problem(obj)
        where = f"{problem.field}: " if problem is not None and problem.field else ""
        raise ValueError(
            f"cannot write as JSON: {where}holds a lone surrogate: not valid Unicode"
        ) from None


def datasets_dir(workspace: str | os.PathLike[str], env_name: str) -> Path:
    """``<workspace>/envs/<env_name>/datasets``; the env name is checked against traversal."""
    return Path(workspace) / "envs" / check_name(env_name, "env name") / "datasets"


def new_log_name() -> str:
    """``decisions_<utc timestamp>_<pid>_<random>.jsonl``: unique across processes that
    start in the same microsecond, and sorted by start time."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"decisions_{stamp}_{os.getpid()}_{secrets.token_hex(2)}.jsonl"


def check_credit(rule: str, gamma: float) -> None:
    if rule not in CREDIT_RULES:
        raise ConfigError(
            f"credit rule {rule!r} is not one of {', '.join(CREDIT_RULES)} (see spread_return)"
        )
    if not 0.0 <= float(gamma) <= 1.0:
        raise ConfigError(f"gamma must be in [0, 1], got {gamma!r}")


def spread_return(value: float, n: int, rule: str = "uniform", gamma: float = 0.9) -> list[float]:
    """The shares of an episode return `value` for `n` decisions in time order."""
    check_credit(rule, gamma)
    if n <= 0:
        return []
    if rule == "uniform":
        return [value / n] * n
    if rule == "last":
        return [0.0] * (n - 1) + [float(value)]
    return [float(gamma) ** (n - 1 - i) * value for i in range(n)]


def reward_events(
    shares: Iterable[tuple[str, float]],
    episode_return: float,
    rule: str,
    timestamp: str,
    gamma: float | None = None,
) -> list[dict[str, Any]]:
    """The reward event lines of one closed episode: one per (decision id, share), each
    with the episode's return and credit rule (and `gamma`, when given)."""
    events = []
    for did, share in shares:
        event: dict[str, Any] = {
            "event": "reward",
            "decision_id": did,
            "value": share,
            "episode_return": episode_return,
            "rule": rule,
            "timestamp": timestamp,
        }
        if gamma is not None:
            event["gamma"] = gamma
        events.append(event)
    return events


class Episodes:
    """Which decisions belong to the open episode of each key (e.g. (run_id, agent_id)).

    Held in memory by design: a crash loses only the *grouping* of an unfinished
    episode, never a record. Thread-safe.
    """

    def __init__(self) -> None:
        self._open: dict[Hashable, list[str]] = {}
        self._lock = threading.Lock()

    def add(self, key: Hashable, decision_id: str) -> None:
        with self._lock:
            self._open.setdefault(key, []).append(decision_id)

    def close(self, match: Any) -> dict[Hashable, list[str]]:
        """Remove and return ``{key: decision ids in order}`` for every key where
        ``match(key)`` holds."""
        with self._lock:
            return {k: self._open.pop(k) for k in [k for k in self._open if match(k)]}


class DecisionLog:
    """One append-only JSONL file. Thread-safe; opened lazily on the first append (a
    recorder that records nothing leaves no empty file behind); a forked child opens
    its own file instead of sharing its parent's (and gets a fresh lock, in case another
    thread of the parent held it at the fork)."""

    def __init__(self, directory: str | os.PathLike[str], fsync: str = "none") -> None:
        if fsync not in FSYNC_POLICIES:
            raise ConfigError(f"fsync policy {fsync!r} is not one of {', '.join(FSYNC_POLICIES)}")
        self.directory = Path(directory)
        self.fsync = fsync
        self.path: Path | None = None
        self._fd: int | None = None
        self._generation = _fork_generation
        self._lock = threading.Lock()
        self.lines = 0

    def _open(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / new_log_name()
        # O_EXCL: never append to somebody else's file, even on a name collision.
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.path = path
        return self._fd

    def _forked(self) -> None:
        """In a forked child: drop the parent's file (the child writes its own)."""
        with _fork_lock:
            if self._generation == _fork_generation:
                return  # another thread of the child got here first
            self._lock = threading.Lock()
            if self._fd is not None:
                os.close(self._fd)  # the child's copy of the descriptor only
            self._fd, self.path, self.lines = None, None, 0
            self._generation = _fork_generation

    def append(self, obj: dict[str, Any]) -> None:
        """Write one JSON line with a single write(2) (see the module docstring)."""
        self.append_line(encode_line(obj))

    def append_line(self, data: bytes) -> None:
        """Write `data`, one complete line ending in a newline, with a single write(2)."""
        if self._generation != _fork_generation:
            self._forked()
        with self._lock:
            fd = self._fd if self._fd is not None else self._open()
            n = os.write(fd, data)
            if n != len(data):  # a regular file takes it whole; short only when the disk fills
                view = memoryview(data)[n:]
                while view:
                    view = view[os.write(fd, view) :]
            if self.fsync == "always":
                os.fsync(fd)
            self.lines += 1

    def extend(self, objs: Iterable[dict[str, Any]]) -> None:
        for obj in objs:
            self.append(obj)

    def close(self) -> None:
        if self._generation != _fork_generation:
            self._forked()
        with self._lock:
            if self._fd is not None:
                if self.fsync in ("always", "close"):
                    os.fsync(self._fd)
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
