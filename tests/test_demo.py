"""`simtune demo --quick` end to end, and `simtune loop` for two rounds, on CPU.

The demo is the README's main job: every stage must leave its artefact (decision logs,
registered models, MLflow runs) and the tuned models must not earn less reward than the
base they started from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli


def _decisions(path: str) -> list:
    from simtune.decisions.reader import read_dataset

    return read_dataset([path]).decisions


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_ppo_is_not_below_base(tmp_path):
    import mlflow

    ws = tmp_path / "demo"
    proc = run_cli("demo", "--quick", "--workspace", str(ws), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    out = " ".join(proc.stdout.split())
    result = json.loads((ws / "demo_result.json").read_text())
    stages = [s["name"] for s in result["stages"]]
    assert stages == ["model", "base", "expert", "sft", "collect", "ppo", "eval"]

    # 1. expert demonstrations, every one scored by the environment
    expert = _decisions(result["expert_data"])
    assert len(expert) > 50
    assert all(d.reward is not None for d in expert)
    assert {d.model for d in expert} == {"expert-policy"}

    # 2. + 4. SFT and PPO models: on disk, in models/registry.json, in MLflow's registry;
    # PPO continued from the SFT adapter.
    entries = {
        e["model_id"]: e
        for e in json.loads((ws / "models" / "registry.json").read_text())["models"]
    }
    sft, ppo = result["sft"], result["ppo"]
    assert set(entries) == {sft["model_id"], ppo["model_id"]}
    assert entries[sft["model_id"]]["tuning_mode"] == "sft"
    assert entries[ppo["model_id"]]["tuning_mode"] == "ppo"
    meta = json.loads((Path(ppo["adapter_path"]) / "simtune.json").read_text())
    assert meta["continued_from_adapter"] == sft["adapter_path"]
    client = mlflow.MlflowClient(result["tracking_uri"])
    # one registered model for the demo's experiment, the mode a version tag
    for job, mode in ((sft, "sft"), (ppo, "ppo")):
        name = job["registered_model_name"]
        assert name == "simtune-demo"
        version = client.get_model_version(name, job["registered_model_version"])
        assert version.run_id == job["run_id"] and version.tags["simtune.tuning_mode"] == mode
        assert client.get_run(job["run_id"]).info.status == "FINISHED"
        assert job["model_id"] in out
    losses = [m.value for m in client.get_metric_history(sft["run_id"], "train/loss")]
    assert len(losses) == result["size"]["sft_steps"] and losses[-1] < losses[0]

    # 3. the served SFT model played the simulation and its rewards were recorded
    collected = _decisions(result["collect_data"])
    assert collected and all(d.reward is not None for d in collected)
    assert {d.model for d in collected} == {sft["model_id"]}

    # every run is in the demo's experiment: training, simulation and evaluation runs
    exp = client.get_experiment_by_name("simtune-demo")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    kinds = [r.data.tags.get("simtune.kind") for r in runs]
    assert kinds.count("simulation") == 2
    evals = [r for r in runs if r.data.tags.get("simtune.kind") == "evaluation"]
    assert len(evals) == 3 and all(r.info.status == "FINISHED" for r in evals)
    assert set(result["evaluation"]["runs"].values()) == {r.info.run_id for r in evals}

    # 5. the reward table: printed, and the tuned models not below the base
    scores = {s["name"]: s for s in result["scores"]}
    assert list(scores) == ["base", "sft", "ppo", "expert", "random"]
    for name in ("base", "sft", "ppo"):
        assert scores[name]["decisions"] > 0
    base, sft_r, ppo_r = (scores[n]["mean_reward"] for n in ("base", "sft", "ppo"))
    print(f"quick demo: base {base}, sft {sft_r}, ppo {ppo_r}")  # shown with -s / on failure
    assert ppo_r >= base
    assert sft_r >= base
    for needle in ("mean reward", "base", "sft", "ppo", "expert (reference)", "simtune ui"):
        assert needle in out, needle


@pytest.mark.slow
def test_loop_two_rounds_sft_then_ppo(tmp_path):
    ws = tmp_path / "loop"
    config = tmp_path / "train.yaml"
    # Tiny sizes: this checks the loop's plumbing, not how much the model learns.
    config.write_text(
        "learning_rate: 5.0e-3\nper_device_train_batch_size: 8\nwarmup_ratio: 0.0\n"
        "lora_dropout: 0.0\nmax_length: 256\nlogging_steps: 1\n"
        "sft:\n  max_steps: 12\nppo:\n  max_steps: 2\n  ppo_epochs: 1\n  kl_coef: 0.0\n"
    )
    proc = run_cli(
        "loop",
        "--sim",
        "job_market",
        "--rounds",
        "2",
        "--episodes",
        "3",
        "--eval-episodes",
        "1",
        "--steps",
        "3",
        "--config",
        str(config),
        "--workspace",
        str(ws),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    result = json.loads((ws / "loop_result.json").read_text())
    r0, r1 = result["rounds"]
    assert (r0["mode"], r0["collected_with"]) == ("sft", "expert")
    assert (r1["mode"], r1["collected_with"]) == ("ppo", r0["model_id"])
    assert r1["previous"]["mean_reward"] == r0["eval"]["mean_reward"]
    assert r0["previous"]["name"] == "base"
    assert {d.model for d in _decisions(r1["data"])} == {r0["model_id"]}
    meta = json.loads((ws / "models" / r1["model_id"] / "simtune.json").read_text())
    assert meta["continued_from_adapter"] == str(ws / "models" / r0["model_id"])
    assert meta["config"]["max_steps"] == 2 and meta["config"]["ppo_epochs"] == 1
    out = " ".join(proc.stdout.split())
    assert r1["model_id"] in out and "simtune loop" in out


def test_loop_rejects_an_unknown_simulation_before_doing_anything(tmp_path):
    proc = run_cli("loop", "--sim", "no_such_sim", "--workspace", str(tmp_path / "ws"))
    assert proc.returncode == 2
    assert "unknown simulation 'no_such_sim'" in proc.stderr
    assert not (tmp_path / "ws" / "models").exists()


def test_loop_takes_a_users_simulation_class_and_config_sections(tmp_path):
    from simtune.errors import ConfigError
    from simtune.loop import _loop_options, resolve_sim
    from simtune.sims import SIMULATIONS

    sim_file = tmp_path / "my_sim.py"
    sim_file.write_text(
        "from simtune.sims.job_market import JobMarket\n\n"
        "class SmallMarket(JobMarket):\n"
        "    name = 'small_market'\n\n"
        "    def __init__(self):\n"
        "        super().__init__(seekers=2, employers=1)\n"
    )
    try:
        assert resolve_sim(f"{sim_file}:SmallMarket") == "small_market"
        assert SIMULATIONS["small_market"].__name__ == "SmallMarket"
    finally:
        SIMULATIONS.pop("small_market", None)
    with pytest.raises(ConfigError, match="--sim"):
        resolve_sim(f"{sim_file}:Missing")
    with pytest.raises(ConfigError, match="unknown simulation"):
        resolve_sim("no_such_sim")

    config = tmp_path / "train.yaml"
    config.write_text(
        "learning_rate: 1.0e-4\nsft:\n  max_steps: 5\nppo:\n  learning_rate: 1.0e-5\n"
    )
    assert _loop_options(str(config), "sft") == {"learning_rate": 1e-4, "max_steps": 5}
    assert _loop_options(str(config), "ppo") == {"learning_rate": 1e-5, "rollout": "offline"}
    # Without a config: the demo's options for tiny models.
    assert _loop_options(None, "ppo")["kl_coef"] == 0.0
