"""Errors that reach the user as one line (CLI exit code 2), never as a traceback."""

from __future__ import annotations


class SimtuneError(Exception):
    """Base class: a problem the user can fix (bad input, bad option, unreachable server)."""


class ConfigError(SimtuneError):
    """An option has a bad value; the message names the flag."""


class DataError(SimtuneError):
    """A dataset problem; the message names file, line and field where they apply."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}{what}{message}")
        self.path, self.line, self.field = path, line, field


class ModelError(SimtuneError):
    """The model path is not a usable model or adapter."""


class TrackingError(SimtuneError):
    """The MLflow tracking server cannot be reached or refused the request."""
