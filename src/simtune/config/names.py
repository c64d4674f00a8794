"""Names and places every command resolves the same way: the workspace, MLflow names."""

from __future__ import annotations

import os
import re
from pathlib import Path

from simtune.errors import ConfigError


def resolve_workspace(workspace: str | os.PathLike[str] | None = None) -> Path:
    """The workspace root, absolute: `workspace`, else $SIMTUNE_HOME, else the current
    directory. Every command and API that takes a workspace resolves it here."""
    return Path(workspace or os.environ.get("SIMTUNE_HOME") or os.getcwd()).resolve()


_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f\\]|(^|/)\.\.?(/|$)")


def mlflow_name_problem(value: str | None, flag: str) -> str | None:
    """An MLflow experiment, registered-model or run name: refused before any work when
    empty, holding control characters or backslashes, or with a '.'/'..' path segment
    (MLflow turns experiment and model names into artifact paths, and a traversal there
    failed only after training). A registered model name also may not hold '/' or ':'
    (it is one segment of `models:/<name>/<version>`)."""
    if value is None:
        return None
    if not str(value).strip():
        return f"{flag}: must not be empty"
    if value != value.strip() or _UNSAFE_NAME.search(value):
        return (
            f"{flag}: {value!r} is not a usable name (no leading/trailing spaces, control "
            "characters, backslashes or '.'/'..' path segments)"
        )
    if flag == "--registered_model_name" and any(c in value for c in "/:"):
        return f"{flag}: {value!r} may not contain '/' or ':'"
    return None


_ALIAS = re.compile(r"^[\w-]{1,255}$", re.ASCII)


def alias_problem(value: str, flag: str = "--alias") -> str | None:
    """A registered-model alias: MLflow's rules (1-255 letters, digits, '_' or '-'; not
    'latest', not 'v<digits>', which MLflow reserves), and not all digits, since
    `NAME/2` names version 2 and `NAME@2` once did too."""
    if not _ALIAS.match(value or ""):
        return f"{flag} {value!r}: 1-255 letters, digits, '_' or '-'"
    if value.isdigit():
        return f"{flag} {value!r}: an alias may not be a number (NAME/{value} is version {value})"
    if value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
        return f"{flag} {value!r}: reserved by MLflow ('latest' and v<number> name versions)"
    return None


def check_mlflow_name(value: str | None, flag: str) -> None:
    """`mlflow_name_problem`, raised."""
    problem = mlflow_name_problem(value, flag)
    if problem:
        raise ConfigError(problem)
