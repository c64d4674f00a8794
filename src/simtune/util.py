"""Small mechanisms every part uses, each written once: atomic file writes, safe names,
the first line of an error, stop signals routed to a handler, and loading a user's
``module:attr`` / ``file.py:attr``.

Nothing heavy is imported here (the CLI imports it on every start)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from simtune.errors import ConfigError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_name(value: str, what: str = "model id") -> str:
    """Reject anything that could escape a directory: '..', separators, NUL, absolute.
    Guards every name that becomes a path: model ids, env names, run and agent ids."""
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise ConfigError(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only")
    return value


def first_line(exc: BaseException) -> str:
    """An exception's first line (library errors can run to pages), or its type name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def write_atomic(path: Path, data: str | bytes, *, fsync: bool = True) -> None:
    """Temp file in the same directory, (fsync,) rename: readers see the old file or the
    new one, never half of it, whenever the writer is killed. `fsync=False` for caches,
    which are rebuilt if a power cut loses them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any, *, compact: bool = False, fsync: bool = True) -> None:
    """`data` as JSON through `write_atomic` (indented unless `compact`)."""
    if compact:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)
    else:
        text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    write_atomic(path, text, fsync=fsync)


def load_object(spec: str, flag: str, what: str = "object") -> Any:
    """Import `module:attr` or `path/to/file.py:attr` (dotted attributes work:
    `module:Class.method`): a user's reward function (--reward_fn) or simulation class
    (--sim). Raises ConfigError naming `flag` and what failed."""
    target, sep, attr = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not target.strip() or not attr.strip() or not spec.strip():
        raise ConfigError(
            f"{flag}: expected 'module:{what}' or 'path/to/file.py:{what}', got {spec!r}"
        )
    target, attr = target.strip(), attr.strip()
    if target.endswith(".py") or "/" in target or os.sep in target:
        module = _import_file(target, spec, flag)
    else:
        module = _import_module(target, spec, flag)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{flag}: module {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _import_file(target: str, spec: str, flag: str) -> Any:
    path = Path(target).expanduser()
    if not path.is_file():
        raise ConfigError(f"{flag}: no such file: {target}")
    name = f"simtune_user_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise ConfigError(f"{flag}: cannot import {target} (not a Python file?)")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ConfigError(
            f"{flag}: importing {target} failed: {type(exc).__name__}: {exc}"
        ) from None
    return module


def _import_module(target: str, spec: str, flag: str) -> Any:
    top = target.split(".")[0]
    cwd = Path.cwd()
    if (
        str(cwd) not in sys.path
        and "" not in sys.path
        and ((cwd / f"{top}.py").is_file() or (cwd / top / "__init__.py").is_file())
    ):
        # Like `python -m`: a module in the current directory is importable (the
        # `simtune` console script does not put the current directory on sys.path).
        sys.path.insert(0, str(cwd))
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == top or target.startswith(missing + "."):
            raise ConfigError(
                f"{flag}: no module named {missing or target!r} (from {spec!r}; "
                "give an importable module or a path/to/file.py)"
            ) from None
        # The module exists but one of *its* imports is missing.
        raise ConfigError(
            f"{flag}: importing {target!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    except Exception as exc:
        raise ConfigError(
            f"{flag}: importing {target!r} failed: {type(exc).__name__}: {exc}"
        ) from None


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
