"""Which models a `--model` names: a model id, a directory, a registered `NAME[@VERSION]` or
`models:/` URI, resolved to a base model and LoRA adapter directories (what is served
under which name), apart from the engine that generates and the server that speaks HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simtune.config import resolve_workspace
from simtune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


BASE_NAME = "base"

_VERSION = re.compile(r"^\d+$")


@dataclass
class ServedModel:
    """One thing `simtune serve --model` named, resolved to files."""

    name: str
    """The name clients put in ``"model"``."""
    adapter_dir: str | None
    """LoRA adapter directory; None for the base model itself."""
    base_model: str
    """Base model: absolute local directory or hub id."""
    training_run_id: str | None = None
    registered_name: str | None = None
    registered_version: str | None = None


def resolve_served(
    spec: str, *, workspace: str | Path | None = None, tracking_uri: str | None = None
) -> ServedModel:
    """Resolve one ``--model`` value, cheapest source first: an MLflow ``models:/`` URI, a
    directory (adapter or base model), a local model id (``models/registry.json``), an
    MLflow registered model ``NAME``, ``NAME@VERSION`` or ``NAME@alias`` (its adapter is
    downloaded once into ``<workspace>/models/.mlflow-cache/``; versions never change)."""
    ws = resolve_workspace(workspace)
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("--model: empty model name")
    if spec == BASE_NAME:
        raise ConfigError(
            "--model base: the base model is always served as 'base'; name an adapter "
            "(model id, MLflow NAME[@VERSION] or directory) or a base model directory"
        )
    if spec.startswith("models:/"):
        rest = spec[len("models:/") :].strip("/")
        if "/" in rest:
            name, version = rest.rsplit("/", 1)
        else:
            name, _, version = rest.partition("@")
        found = _from_mlflow(name, version or None, ws, tracking_uri, spec)
        if found is None:
            raise ModelError(f"--model: no registered MLflow model {name!r} ({spec})")
        return found
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_path(path, spec, name=path.resolve().name, workspace=ws)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _from_path(path, spec, name=path.name, workspace=ws)  # served as 'base'
    if path.exists():
        raise ModelError(
            f"--model: {spec} is a file, not a model or adapter directory (nor a .gguf file)"
        )
    entry = _registry_entry(ws, spec)
    if entry is not None:
        return _from_registry(entry, spec)
    local = ws / "models" / spec
    if re.match(r"^[\w.-]+$", spec) and (local / "adapter_config.json").is_file():
        return _from_path(local, spec, name=spec)  # a model dir whose registry entry is gone
    if not spec.startswith((".", "/", "~")):
        name, _, version = spec.rpartition("@") if "@" in spec else (spec, "", "")
        found = _from_mlflow(name, version or None, ws, tracking_uri, spec)
        if found is not None:
            return found
    raise ModelError(
        f"--model: unknown model {spec!r}: not a model id in {ws / 'models' / 'registry.json'}, "
        "not a registered MLflow model, and not a model or adapter directory"
    )


def _from_path(
    path: Path, spec: str, *, name: str, workspace: Path | None = None, **extra: Any
) -> ServedModel:
    """`workspace` holds the dequantized copy of a GGUF base (`materialize_gguf`)."""
    from simtune.training.model import resolve_model

    cfg_file = path / "adapter_config.json"
    if cfg_file.is_file():
        try:
            task = json.loads(cfg_file.read_text()).get("task_type")
        except (OSError, json.JSONDecodeError):
            task = None  # resolve_model reports it
        if task == "SEQ_CLS":
            raise ModelError(f"--model: {spec} is a reward model (it scores, it does not generate)")
    try:
        found = resolve_model(str(path), workspace)
    except ModelError as exc:
        raise ModelError(str(exc).replace("--llm_path", "--model", 1)) from None
    if found.adapter is None:
        return ServedModel(BASE_NAME, None, found.base)
    meta: dict[str, Any] = {}
    try:
        meta = json.loads((path / "simtune.json").read_text()).get("mlflow") or {}
    except (OSError, json.JSONDecodeError):
        pass
    return ServedModel(
        name=name,
        adapter_dir=found.adapter,
        base_model=found.base,
        training_run_id=extra.get("run_id") or meta.get("run_id"),
        registered_name=extra.get("registered_name") or meta.get("registered_model_name"),
        registered_version=extra.get("registered_version")
        or (
            str(meta["registered_model_version"]) if meta.get("registered_model_version") else None
        ),
    )


def _registry_entry(ws: Path, spec: str) -> dict[str, Any] | None:
    from simtune.tracking.registry import Registry

    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$", spec) or ".." in spec:
        return None
    reg = Registry(ws)
    if not reg.path.is_file():
        return None
    for entry in reg.list():
        if entry.get("model_id") == spec:
            return entry
    return None


def _from_registry(entry: dict[str, Any], spec: str) -> ServedModel:
    if entry.get("tuning_mode") == "reward":
        raise ModelError(f"--model: {spec} is a reward model (it scores, it does not generate)")
    path = Path(entry.get("path", ""))
    if not path.is_dir():
        raise ModelError(f"--model: model {spec} is registered but its directory {path} is missing")
    ml = entry.get("mlflow") or {}
    return _from_path(
        path,
        spec,
        name=spec,
        run_id=ml.get("run_id"),
        registered_name=ml.get("registered_model_name"),
        registered_version=str(ml["registered_model_version"])
        if ml.get("registered_model_version")
        else None,
    )


def _from_mlflow(
    name: str, version: str | None, ws: Path, tracking_uri: str | None, spec: str
) -> ServedModel | None:
    """The adapter of a registered MLflow model version, or None when no such model."""
    from simtune.tracking.tracker import check_reachable, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(tracking_uri, ws)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return None  # no store yet: do not let MLflow create an empty one as a side effect
    check_reachable(uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        escaped = name.replace("\\", "\\\\").replace("'", "\\'")
        versions = client.search_model_versions(f"name = '{escaped}'")
    except MlflowException:
        return None
    if not versions:
        return None
    try:
        if version is None:
            mv = max(versions, key=lambda v: int(v.version))
        elif _VERSION.match(version):
            mv = client.get_model_version(name, version)
        else:
            mv = client.get_model_version_by_alias(name, version)
    except MlflowException:
        latest = max(int(v.version) for v in versions)
        raise ModelError(
            f"--model: MLflow model {name!r} has no version or alias {version!r} "
            f"(latest version: {latest})"
        ) from None
    ver = str(mv.version)
    # Beside the local models (and git-ignored with them); one folder per store, since two
    # tracking servers can both have a "NAME" version 1.
    cache = ws / "models" / ".mlflow-cache" / hashlib.sha1(uri.encode()).hexdigest()[:12]
    slug = re.sub(r"[^\w.-]+", "_", name).strip(".")[:80]  # never '..' or a separator
    target = cache / f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:8]}" / ver
    if not (target / "adapter_config.json").is_file():
        source = client.get_model_version_download_uri(name, ver).rstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=target.parent))
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/artifacts/adapter", dst_path=str(tmp), tracking_uri=uri
            )
            if target.exists():  # another process won the race; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(local, target)
        except MlflowException as exc:
            raise ModelError(
                f"--model: cannot download the adapter of {name} v{ver}: {str(exc)[:200]}"
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    served = _from_path(
        target,
        spec,
        name=f"{name}@{ver}",
        run_id=mv.run_id,
        registered_name=name,
        registered_version=ver,
    )
    return served


def resolve_all(
    models: Sequence[str], *, workspace: str | Path | None = None, tracking_uri: str | None = None
) -> dict[str, ServedModel]:
    """Resolve every ``--model``; check they share one base. Returns served name ->
    model, adapters first and the base last (under ``"base"``)."""
    if isinstance(models, str):
        models = [models]
    if not models:
        raise ConfigError("--model: name at least one model to serve")
    out: dict[str, ServedModel] = {}
    base: ServedModel | None = None
    first_spec = ""
    for spec in models:
        s = resolve_served(spec, workspace=workspace, tracking_uri=tracking_uri)
        if base is None:
            base, first_spec = ServedModel(BASE_NAME, None, s.base_model), spec
        elif not _same_base(s.base_model, base.base_model):
            raise ModelError(
                f"--model {spec}: its base model {s.base_model} differs from {base.base_model} "
                f"(of --model {first_spec}); all served adapters must share one base"
            )
        if s.adapter_dir is None:
            continue  # the base itself: always served as "base"
        if s.name in out or s.name == BASE_NAME:
            raise ConfigError(f"--model {spec}: the name {s.name!r} is served twice")
        out[s.name] = s
    assert base is not None
    out[BASE_NAME] = base
    return out


def alias_map(
    served: dict[str, ServedModel],
    models: Sequence[str],
    names: Sequence[str],
    workspace: str | Path | None = None,
    tracking_uri: str | None = None,
) -> dict[str, str]:
    """``--served-model-name`` NAMEs -> the served name of the first ``--model`` they
    stand for (``"base"`` when that is the base model itself)."""
    if not names:
        return {}
    first = resolve_served(models[0], workspace=workspace, tracking_uri=tracking_uri)
    target = first.name if first.adapter_dir else BASE_NAME
    out: dict[str, str] = {}
    for name in names:
        if not name or len(name) > 256 or any(c.isspace() or not c.isprintable() for c in name):
            raise ConfigError(
                f"--served-model-name {name!r}: 1-256 printable characters, no spaces"
            )
        if name in served or name in out:
            raise ConfigError(f"--served-model-name {name}: the name is served twice")
        out[name] = target
    return out


def _same_base(a: str, b: str) -> bool:
    if Path(a).is_dir() and Path(b).is_dir():
        return Path(a).resolve() == Path(b).resolve()
    return a == b
