"""The local model registry: `models/registry.json` (DESIGN.md §2, §6).

Every write takes an exclusive file lock and replaces the file atomically (temp file
in the same directory, fsync, rename), so parallel jobs never lose an entry and a
crash never leaves half a file.

YuLan-OneSim's model library (`src/backend/models/model_library.py`) keeps the same
file: ``{"models": [ModelMetadata, ...]}`` with ``model_id``, ``model_name``,
``model_type`` (``base``/``fine_tuned``/``embedding``), ``path``, ``created_at`` and
optional ``description``, ``config_file``, ``base_model_id``, ``fine_tuning_params``,
``version``, ``size``, ``tags``; its UI lists models by ``model_type``. Entries OneSim
wrote are kept as they are (its older ``base_models``/``fine_tuned_models``/
``embedding_models`` lists are read as one), and `add` gives each simtune entry those
fields too (`onesim_fields`), so OneSim's UI lists simtune's models.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simtune.errors import SimtuneError
from simtune.util import check_name, write_json_atomic

_ONESIM_OLD = ("base_models", "fine_tuned_models", "embedding_models")


def onesim_fields(entry: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    """The ModelMetadata fields of YuLan-OneSim's model library for a simtune entry: a
    tuned chat model is ``fine_tuned`` (a reward model ``reward``, which OneSim's chat
    lists leave out); ``base_model_id`` is the registered entry whose ``path`` is the
    base model's, when there is one."""
    mode = entry.get("tuning_mode", "")
    base = entry.get("base_model") or ""
    base_id = None
    for m in models:
        if base and m.get("path") and m.get("model_id") and _same_path(m["path"], base):
            base_id = m["model_id"]
            break
    version = (entry.get("mlflow") or {}).get("registered_model_version")
    return {
        "model_name": entry["model_id"],
        "model_type": "reward" if mode == "reward" else "fine_tuned",
        "description": f"simtune {mode} LoRA adapter of {Path(base).name or base}",
        "config_file": None,
        "base_model_id": base_id,
        "fine_tuning_params": {"tuning_mode": mode, "base_model": base},
        "version": str(version) if version else None,
        "size": None,
        "tags": ["simtune", mode] if mode else ["simtune"],
    }


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


class Registry:
    def __init__(self, workspace: Path) -> None:
        self.models_dir = Path(workspace) / "models"
        self.path = self.models_dir / "registry.json"

    def _lock(self) -> Any:
        from filelock import FileLock

        self.models_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock", timeout=60)

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"version": 1, "models": []}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SimtuneError(
                f"{self.path}: corrupt registry ({exc.msg} at line {exc.lineno})"
            ) from None
        if isinstance(data, list):  # another writer's bare list of entries
            data = {"version": 1, "models": data}
        elif (
            isinstance(data, dict) and "models" not in data and any(k in data for k in _ONESIM_OLD)
        ):
            # OneSim's older layout: one list per model type
            data = {"version": 1, "models": [m for k in _ONESIM_OLD for m in data.get(k) or []]}
        elif (
            isinstance(data, dict)
            and "models" not in data
            and all(isinstance(v, dict) for v in data.values())
        ):  # a mapping of id -> entry
            data = {"version": 1, "models": [{"model_id": k, **v} for k, v in data.items()]}
        data.setdefault("models", [])
        for m in data["models"]:
            # YuLan-OneSim's ModelMetadata entries name a model by model_name (or id)
            if isinstance(m, dict) and "model_id" not in m:
                m["model_id"] = str(m.get("id") or m.get("model_name") or "")
        return data

    def _update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        with self._lock():
            data = self._read()
            result = change(data)
            write_json_atomic(self.path, data)
            return result

    def add(self, entry: dict[str, Any]) -> None:
        check_name(entry["model_id"])

        def change(data: dict[str, Any]) -> None:
            if any(m["model_id"] == entry["model_id"] for m in data["models"]):
                raise SimtuneError(f"model id {entry['model_id']} is already registered")
            data["models"].append({**onesim_fields(entry, data["models"]), **entry})

        self._update(change)

    def update(self, model_id: str, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        """Apply `change` to one entry in place, under the lock (read-modify-write, so a
        concurrent add or delete is never lost); returns the updated entry."""
        check_name(model_id)

        def apply(data: dict[str, Any]) -> dict[str, Any]:
            for m in data["models"]:
                if m["model_id"] == model_id:
                    change(m)
                    return m
            raise SimtuneError(f"no model {model_id!r} in {self.path}")

        return self._update(apply)

    def list(self) -> list[dict[str, Any]]:
        return list(self._read()["models"])

    def get(self, model_id: str) -> dict[str, Any]:
        check_name(model_id)
        for m in self._read()["models"]:
            if m["model_id"] == model_id:
                return m
        raise SimtuneError(f"no model {model_id!r} in {self.path}")

    def delete(self, model_id: str, *, remove_files: bool = True) -> dict[str, Any]:
        """Drop the entry (and its directory when it lies inside models/)."""
        check_name(model_id)

        def change(data: dict[str, Any]) -> dict[str, Any]:
            for i, m in enumerate(data["models"]):
                if m["model_id"] == model_id:
                    return data["models"].pop(i)
            raise SimtuneError(f"no model {model_id!r} in {self.path}")

        entry = self._update(change)
        target = Path(entry.get("path", ""))
        if (
            remove_files
            and target.is_dir()
            and self.models_dir.resolve() in target.resolve().parents
        ):
            shutil.rmtree(target)
        return entry
