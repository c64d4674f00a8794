"""MLflow registered-model aliases (DESIGN.md §6): `simtune models promote` points one at
a version, `simtune models list/show` say which aliases each local model's version has.

Aliases, not MLflow's deprecated stages. An alias names a version of one registered
model; since SFT and PPO jobs of an experiment register versions of the same model (the
mode is a version tag), `champion` can move from an SFT version to a PPO one. An alias is
checked before MLflow is touched (`simtune.config.names.alias_problem`): all digits is
refused, since `NAME/2` names version 2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from simtune.errors import ConfigError

log = logging.getLogger(__name__)


def _client(uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _store_missing(uri: str) -> Path | None:
    """The sqlite file of `uri` when it does not exist (MLflow would create it)."""
    from simtune.tracking.tracker import sqlite_path

    db = sqlite_path(uri)
    return db if db is not None and not db.is_file() else None


def promote(
    name: str, version: str, alias: str, *, tracking_uri: str | None, workspace: Path
) -> dict[str, Any]:
    """Point `alias` of registered model `name` at `version` (MLflow's
    `set_registered_model_alias`); returns what was done, with the version the alias
    pointed to before ("" when new). A missing store, model or version is a ConfigError,
    and nothing is changed."""
    from simtune.config.names import alias_problem, mlflow_name_problem
    from simtune.tracking.tracker import check_reachable, prepare_store, resolve_tracking_uri

    for problem in (mlflow_name_problem(name, "NAME"), alias_problem(alias)):
        if problem:
            raise ConfigError(problem)
    if not version.isdigit():
        raise ConfigError(f"VERSION {version!r}: a version number (1, 2, ...)")
    uri = resolve_tracking_uri(tracking_uri, workspace)
    missing = _store_missing(uri)
    if missing is not None:
        raise ConfigError(f"NAME {name!r}: no MLflow store at {missing}, so no registered models")
    check_reachable(uri)
    prepare_store(uri)
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise ConfigError(
            f"NAME {name!r}: no registered MLflow model of that name at {uri} (registered: "
            + (", ".join(known) or "none")
            + ")"
        ) from None
    try:
        mv = client.get_model_version(name, str(int(version)))
    except MlflowException:
        versions = sorted(
            int(v.version) for v in client.search_model_versions(f"name = '{_q(name)}'")
        )
        raise ConfigError(
            f"VERSION {version}: {name} has no such version (versions: "
            + (", ".join(map(str, versions)) or "none")
            + ")"
        ) from None
    before = {str(k): str(v) for k, v in (model.aliases or {}).items()}.get(alias, "")
    client.set_registered_model_alias(name, alias, mv.version)
    return {
        "name": name,
        "alias": alias,
        "version": str(mv.version),
        "previous_version": before,
        "tuning_mode": (mv.tags or {}).get("simtune.tuning_mode", ""),
        "model_id": (mv.tags or {}).get("simtune.model_id", ""),
        "model_uri": f"models:/{name}@{alias}",
        "tracking_uri": uri,
    }


def _q(name: str) -> str:
    return name.replace("\\", "\\\\").replace("'", "\\'")


def entry_aliases(entries: list[dict[str, Any]], workspace: Path) -> dict[str, list[str]]:
    """model id -> the aliases its registered MLflow version has now, for the local
    registry's entries. A store that is missing or does not answer is skipped (one
    warning): listing local models must not depend on a server."""
    from simtune.tracking.tracker import resolve_tracking_uri, unreachable_reason

    wanted: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in entries:
        ml = e.get("mlflow") or {}
        if ml.get("registered_model_name") and ml.get("registered_model_version"):
            uri = ml.get("tracking_uri") or resolve_tracking_uri(None, workspace)
            wanted.setdefault((uri, ml["registered_model_name"]), []).append(e)
    out: dict[str, list[str]] = {}
    down: set[str] = set()
    for (uri, name), group in wanted.items():
        if uri in down or _store_missing(uri) is not None:
            continue
        why = unreachable_reason(uri) if uri.startswith(("http://", "https://")) else None
        if why:
            down.add(uri)
            log.warning("MLflow at %s unreachable (%s): aliases not shown", uri, why)
            continue
        try:
            aliases = _client(uri).get_registered_model(name).aliases or {}
        except Exception as exc:  # a deleted model, a permission error: show no aliases
            log.debug("aliases of %s at %s: %s", name, uri, exc)
            continue
        for e in group:
            version = str(e["mlflow"]["registered_model_version"])
            out[e["model_id"]] = sorted(a for a, v in aliases.items() if str(v) == version)
    return out
