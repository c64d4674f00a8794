"""Which models a `--model` names: a model id, a directory, a registered MLflow model
(`NAME`, `NAME/VERSION`, `NAME@ALIAS`, `models:/NAME/VERSION`, `models:/NAME@ALIAS`),
resolved to a base model and LoRA adapter directories (what is served under which name),
apart from the engine that generates and the server that speaks HTTP.

The rule for registered models (`parse_registered`): `/` names a version, `@` an alias,
as in MLflow's own `models:/` URIs. `NAME@2` meant version 2 before aliases existed; an
alias may itself be called "2" in MLflow, so that form is deprecated: it still means
version 2 for one release, with a warning to write `NAME/2` (`models:/NAME@2` is always
the alias, as in MLflow).
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


@dataclass(frozen=True)
class RegisteredSpec:
    """A registered MLflow model as a `--model` names it: at most one of version and
    alias; neither means the latest version."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version:
            return f"{self.name}/{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


def parse_registered(spec: str, flag: str = "--model") -> RegisteredSpec | None:
    """`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/NAME`, `NAME/VERSION`,
    `NAME@ALIAS` or `NAME`; None for what cannot be a registered model (a path). A
    `models:/` URI that is malformed raises ConfigError. `NAME@<digits>` is read as
    version <digits> with a DeprecationWarning (see the module docstring)."""
    spec = spec.strip()
    if spec.startswith("models:/"):
        rest = spec[len("models:/") :].strip("/")
        name, sep, alias = rest.partition("@")
        if not sep and "/" in rest:
            name, version = rest.rsplit("/", 1)
            if "/" in name or not _VERSION.match(version):
                raise ConfigError(
                    f"{flag} {spec}: write models:/NAME/VERSION (a version number) or "
                    "models:/NAME@ALIAS"
                )
            return RegisteredSpec(name, version=version)
        if not name or "/" in name or (sep and not alias):
            raise ConfigError(f"{flag} {spec}: write models:/NAME/VERSION or models:/NAME@ALIAS")
        return RegisteredSpec(name, alias=alias or None)
    if not spec or spec.startswith((".", "/", "~")):
        return None
    if "@" in spec:
        name, _, alias = spec.rpartition("@")
        if not name or not alias or "/" in name or "/" in alias:
            return None
        if _VERSION.match(alias):
            import warnings

            warnings.warn(
                f"{flag} {spec}: NAME@{alias} for version {alias} is deprecated ('@' names an "
                f"alias, and an alias may be called {alias!r}); write {name}/{alias}",
                DeprecationWarning,
                stacklevel=2,
            )
            log.warning(
                "%s %s: NAME@%s for version %s is deprecated; write %s/%s",
                flag,
                spec,
                alias,
                alias,
                name,
                alias,
            )
            return RegisteredSpec(name, version=alias)
        return RegisteredSpec(name, alias=alias)
    if spec.count("/") == 1:
        name, version = spec.split("/")
        return RegisteredSpec(name, version=version) if name and _VERSION.match(version) else None
    return None if "/" in spec else RegisteredSpec(spec)


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
    MLflow registered model (`parse_registered`: ``NAME``, ``NAME/VERSION``, ``NAME@ALIAS``;
    its adapter is downloaded once into ``<workspace>/models/.mlflow-cache/``; versions
    never change). A registered model is served as ``NAME/VERSION``."""
    ws = resolve_workspace(workspace)
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("--model: empty model name")
    if spec == BASE_NAME:
        raise ConfigError(
            "--model base: the base model is always served as 'base'; name an adapter "
            "(model id, MLflow NAME, NAME/VERSION or NAME@ALIAS, or directory) or a base "
            "model directory"
        )
    if spec.startswith("models:/"):
        reg = parse_registered(spec)
        assert reg is not None
        found = _from_mlflow(reg, ws, tracking_uri, spec)
        if found is None:
            raise ModelError(f"--model: no registered MLflow model {reg.name!r} ({spec})")
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
    reg = parse_registered(spec)
    if reg is not None:
        found = _from_mlflow(reg, ws, tracking_uri, spec)
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
    reg: RegisteredSpec, ws: Path, tracking_uri: str | None, spec: str
) -> ServedModel | None:
    """The adapter of a registered MLflow model version, or None when no such model."""
    name, version, alias = reg.name, reg.version, reg.alias
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
    known = sorted(int(v.version) for v in versions)
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version is not None:
            mv = client.get_model_version(name, version)
        else:
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException:
        if alias is not None:
            aliases = _aliases(client, name)
            raise ModelError(
                f"--model {spec}: MLflow model {name!r} has no alias {alias!r} (aliases: "
                + (", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none")
                + f"; set one with `simtune models promote {name} VERSION --alias {alias}`)"
            ) from None
        raise ModelError(
            f"--model {spec}: MLflow model {name!r} has no version {version} (versions: "
            + ", ".join(map(str, known))
            + ")"
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
        name=f"{name}/{ver}",
        run_id=mv.run_id,
        registered_name=name,
        registered_version=ver,
    )
    return served


def _aliases(client: Any, name: str) -> dict[str, str]:
    """alias -> version of a registered model ({} when it cannot be read)."""
    try:
        return {
            str(k): str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()
        }
    except Exception:
        return {}


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
