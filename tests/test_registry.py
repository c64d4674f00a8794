"""models/registry.json: parallel writers, atomic writes, path-traversal guards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simtune.errors import ConfigError, SimtuneError
from simtune.tracking.registry import Registry
from simtune.util import check_name

WRITER = """
import sys
from pathlib import Path
from simtune.tracking.registry import Registry
Registry(Path(sys.argv[1])).add({"model_id": sys.argv[2], "path": str(Path(sys.argv[1]) / "models" / sys.argv[2])})
"""


def test_eight_parallel_registrations_leave_eight_entries(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"model-{i}"])
        for i in range(8)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0] * 8
    data = json.loads((tmp_path / "models" / "registry.json").read_text())
    assert sorted(e["model_id"] for e in data["models"]) == [f"model-{i}" for i in range(8)]
    assert not list((tmp_path / "models").glob(".registry-*.tmp")), "temp file left behind"


@pytest.mark.parametrize("bad", ["../x", "a/b", "/abs", "..", "a\x00b", "", ".hidden", "a" * 300])
def test_traversal_and_odd_names_rejected(bad, tmp_path):
    with pytest.raises(ConfigError, match="invalid model id"):
        check_name(bad)
    with pytest.raises(ConfigError):
        Registry(tmp_path).add({"model_id": bad, "path": "x"})
    assert not (tmp_path / "models" / "registry.json").exists()


def test_duplicate_and_missing_ids(tmp_path):
    reg = Registry(tmp_path)
    reg.add({"model_id": "m1", "path": str(tmp_path / "models" / "m1")})
    with pytest.raises(SimtuneError, match="already registered"):
        reg.add({"model_id": "m1", "path": "x"})
    with pytest.raises(SimtuneError, match="no model 'm2'"):
        reg.get("m2")
    assert [e["model_id"] for e in reg.list()] == ["m1"]


def test_delete_removes_only_dirs_inside_models(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    inside = tmp_path / "models" / "m-in"
    inside.mkdir(parents=True)
    reg = Registry(tmp_path)
    reg.add({"model_id": "m-in", "path": str(inside)})
    reg.add({"model_id": "m-out", "path": str(outside)})
    reg.delete("m-in")
    reg.delete("m-out")
    assert not inside.exists() and outside.exists()
    assert reg.list() == []


def test_corrupt_registry_is_reported_not_overwritten(tmp_path):
    path = tmp_path / "models" / "registry.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(SimtuneError, match="corrupt registry"):
        Registry(tmp_path).add({"model_id": "m", "path": "x"})
    assert path.read_text() == "{not json"
    assert Path(path).stat().st_size == 9
