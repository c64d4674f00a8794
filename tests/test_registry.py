"""models/registry.json: parallel writers, atomic writes, path-traversal guards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE, run_cli

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


# --- MLflow's registry: one model per experiment, aliases, model specs -------------------


def test_model_specs_slash_is_a_version_at_is_an_alias():
    from simtune.serving.models import RegisteredSpec, parse_registered

    cases = {
        "market": RegisteredSpec("market"),
        "market/3": RegisteredSpec("market", version="3"),
        "market@champion": RegisteredSpec("market", alias="champion"),
        "models:/market/3": RegisteredSpec("market", version="3"),
        "models:/market@champion": RegisteredSpec("market", alias="champion"),
        "models:/market@2": RegisteredSpec("market", alias="2"),  # MLflow's meaning
        "models:/market": RegisteredSpec("market"),
        "./market": None,
        "a/b/3": None,
        "market/latest": None,  # a path, not a version
    }
    for spec, want in cases.items():
        assert parse_registered(spec) == want, spec
    with pytest.warns(DeprecationWarning, match="write market/2"):
        assert parse_registered("market@2") == RegisteredSpec("market", version="2")
    for bad in ("models:/market/champion", "models:/market@", "models:/a/b/3"):
        with pytest.raises(ConfigError, match="models:/NAME/VERSION"):
            parse_registered(bad)


@pytest.mark.parametrize("alias", ["2", "v2", "latest", "has space", "a/b", ""])
def test_bad_aliases_are_refused(alias):
    from simtune.config.names import alias_problem

    assert alias_problem(alias)
    assert alias_problem("champion") is None and alias_problem("prod-2024_a") is None


@pytest.fixture(scope="module")
def sft_then_ppo(tmp_path_factory, tiny_model):
    """An SFT job and a PPO job continuing from it, in one experiment of one workspace."""
    from simtune import run_tuning

    ws = tmp_path_factory.mktemp("ws-registry")
    common = dict(
        llm_path=str(tiny_model),
        dataset_path=[str(SAMPLE)],
        workspace=str(ws),
        experiment_name="market",
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
    )
    sft = run_tuning(tuning_mode="sft", **common)
    ppo = run_tuning(
        **{**common, "llm_path": sft.adapter_path},
        tuning_mode="ppo",
        ppo_epochs=1,
        max_length=128,
    )
    return ws, sft, ppo


pytestmark_slow = pytest.mark.slow


@pytestmark_slow
def test_sft_and_ppo_are_versions_of_one_registered_model(sft_then_ppo):
    import hashlib

    import mlflow

    ws, sft, ppo = sft_then_ppo
    assert sft.registered_model_name == ppo.registered_model_name == "market"
    assert (sft.registered_model_version, ppo.registered_model_version) == ("1", "2")
    client = mlflow.MlflowClient(sft.tracking_uri)
    for job, mode in ((sft, "sft"), (ppo, "ppo")):
        mv = client.get_model_version("market", job.registered_model_version)
        assert mv.run_id == job.run_id
        assert mv.tags["simtune.tuning_mode"] == mode
        assert mv.tags["simtune.model_id"] == job.model_id and mv.tags["simtune.base_model"]
        # The training data, as an MLflow dataset input of the run.
        (inp,) = client.get_run(job.run_id).inputs.dataset_inputs
        assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
        sha = hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
        assert inp.dataset.digest == hashlib.sha256(sha.encode()).hexdigest()[:32]
        assert inp.dataset.name == SAMPLE.name
        assert inp.dataset.source_type == "simtune_decisions"
        assert json.loads(inp.dataset.source) == {"uris": [SAMPLE.resolve().as_uri()]}
    assert not client.search_registered_models("name = 'market-sft'")


@pytestmark_slow
def test_promote_moves_the_alias_from_sft_to_ppo(sft_then_ppo):
    import mlflow

    ws, sft, ppo = sft_then_ppo
    client = mlflow.MlflowClient(sft.tracking_uri)
    r = run_cli("models", "--workspace", str(ws), "promote", "market", "1", "--alias", "champion")
    assert r.returncode == 0, r.stderr
    assert client.get_registered_model("market").aliases == {"champion": 1}
    r = run_cli("models", "--workspace", str(ws), "promote", "market", "2", "--alias", "champion")
    assert r.returncode == 0, r.stderr
    assert "market@champion -> version 2, ppo (was version 1)" in " ".join(r.stdout.split())
    assert client.get_registered_model("market").aliases == {"champion": 2}

    listed = json.loads(run_cli("models", "--workspace", str(ws), "list", "--json").stdout)
    aliases = {e["model_id"]: e.get("mlflow_aliases") for e in listed}
    assert aliases == {sft.model_id: [], ppo.model_id: ["champion"]}
    shown = json.loads(run_cli("models", "--workspace", str(ws), "show", ppo.model_id).stdout)
    assert shown["registry"]["mlflow_aliases"] == ["champion"]

    # Bad name, version, alias: one line, exit 2, nothing changed.
    empty = ws.parent / "empty-ws"
    empty.mkdir(exist_ok=True)
    bad = {
        ("nosuch", "1", "champion", ws): "NAME 'nosuch': no registered MLflow model",
        ("market", "9", "champion", ws): "VERSION 9: market has no such version (versions: 1, 2)",
        ("market", "x", "champion", ws): "VERSION 'x': a version number",
        ("market", "1", "2", ws): "--alias '2': an alias may not be a number (NAME/2 is version 2)",
        ("market", "1", "latest", ws): "--alias 'latest': reserved by MLflow",
        ("market", "1", "a b", ws): "--alias 'a b': 1-255 letters, digits",
        ("market", "1", "champion", empty): "no MLflow store at",
    }
    for (name, version, alias, where), message in bad.items():
        r = run_cli("models", "--workspace", str(where), "promote", name, version, "--alias", alias)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (name, r.stderr)
    assert client.get_registered_model("market").aliases == {"champion": 2}
    assert not (empty / "mlflow.db").exists()


@pytestmark_slow
def test_specs_resolve_to_the_versions_they_name(sft_then_ppo, caplog):
    from simtune.errors import ModelError
    from simtune.serving.models import resolve_served

    ws, sft, ppo = sft_then_ppo
    import mlflow

    mlflow.MlflowClient(sft.tracking_uri).set_registered_model_alias("market", "first", "1")
    for spec, job in (
        ("market/1", sft),
        ("models:/market/1", sft),
        ("market@first", sft),
        ("models:/market@first", sft),
        ("market", ppo),  # the latest version
    ):
        s = resolve_served(spec, workspace=ws)
        assert (s.training_run_id, s.name) == (job.run_id, f"market/{job.registered_model_version}")
    with pytest.warns(DeprecationWarning):
        assert resolve_served("market@1", workspace=ws).training_run_id == sft.run_id
    with pytest.raises(ModelError, match=r"no alias 'nope' \(aliases: .*first -> 1"):
        resolve_served("market@nope", workspace=ws)
    with pytest.raises(ModelError, match=r"no version 7 \(versions: 1, 2\)"):
        resolve_served("market/7", workspace=ws)
    r = run_cli("eval", "--model", "market@nope", "--sim", "job_market", "--workspace", str(ws))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "has no alias 'nope'" in r.stderr


@pytestmark_slow
def test_serve_an_alias_with_the_openai_client(sft_then_ppo):
    import mlflow
    import openai
    from conftest import free_port, wait_http

    ws, sft, ppo = sft_then_ppo
    mlflow.MlflowClient(sft.tracking_uri).set_registered_model_alias("market", "best", "2")
    port = free_port()
    exe = Path(sys.executable).with_name("simtune")
    proc = subprocess.Popen(
        [str(exe), "serve", "--model", "models:/market@best", "--workspace", str(ws)]
        + ["--port", str(port), "--max-new-tokens", "4", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=180, proc=proc)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["market/2", "base"]
        r = c.chat.completions.create(
            model="market/2", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert r.model == "market/2" and r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
