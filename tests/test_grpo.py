"""GRPO on the tiny model: what trains, what is tracked and registered, reward rise on
held-out prompts for rewards of several shapes, and bad options refused before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli
from test_ppo import SKILLS, _mlflow_statuses, mean_sampled_reward, preference_data

pytestmark = pytest.mark.slow

HELD_OUT = [
    f"You are a job seeker skilled in {s}. Apply or wait? Answer in JSON."
    for s in ("plumbing", "teaching", "music", "farming")
]
GRPO_FAST = dict(
    tuning_mode="grpo",
    learning_rate=1e-3,
    max_new_tokens=8,
    per_device_train_batch_size=8,
    num_generations=4,
    seed=0,
)
REWARDS = {
    # name: (source of `reward(completion, **_)`, least rise of the held-out mean)
    "keyword": ("float('on' in completion.lower())", 0.25),
    "length": ("max(0.0, 1.0 - abs(len(completion) - 12) / 12)", 0.05),
    "digits": ("sum(c.isdigit() for c in completion) / max(1, len(completion))", 0.04),
}


def _reward_file(tmp_path: Path, shape: str) -> str:
    source, _ = REWARDS[shape]
    path = tmp_path / f"{shape}.py"
    path.write_text(f"def reward(completion, record, **_):\n    return {source}\n")
    return f"{path}:reward"


def test_lora_changes_base_stays_frozen_and_records_reach_the_reward(tiny_model, tmp_path):
    """train_grpo directly: every LoRA B matrix moved off zero, no base weight changed,
    and the reward function saw each answer with its own decision record."""
    from simtune.config import build_config
    from simtune.decisions.reader import read_dataset
    from simtune.training.grpo import build_grpo_inputs, train_grpo
    from simtune.training.model import load_model, load_tokenizer, resolve_model

    (tmp_path / "spy.py").write_text(
        "import json, os\n"
        "def reward(prompt, completion, record, **_):\n"
        f"    with open({str(tmp_path / 'seen.jsonl')!r}, 'a') as fh:\n"
        "        fh.write(json.dumps([prompt, record.prompt]) + '\\n')\n"
        "    return float('on' in completion)\n"
    )
    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    cfg = build_config(
        overrides={
            "llm_path": str(tiny_model),
            "dataset_path": [str(data)],
            "reward_fn": f"{tmp_path / 'spy.py'}:reward",
            "max_steps": 3,
            **GRPO_FAST,
        }
    )
    spec = resolve_model(str(tiny_model))
    tok = load_tokenizer(spec)
    inputs = build_grpo_inputs(read_dataset(cfg.dataset_path).decisions, tok, cfg, spec)
    model = load_model(spec, trainable_adapter=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics, trained = train_grpo(cfg, inputs, model, tok, tmp_path / "job", [])
    after = {
        n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p.detach()
        for n, p in trained.named_parameters()
        if "lora_" not in n
    }
    lora = {n: p.detach() for n, p in trained.named_parameters() if "lora_" in n}
    frozen_lora = [n for n, p in trained.named_parameters() if "lora_" in n and not p.requires_grad]
    assert lora and not frozen_lora, frozen_lora[:5]
    moved = [n for n, p in lora.items() if "lora_B" in n and p.abs().sum() > 0]
    assert moved and len(moved) == sum("lora_B" in n for n in lora), "a LoRA B stayed zero"
    assert set(after) == set(before)
    for name, p in before.items():
        assert after[name].equal(p), f"frozen base parameter {name} changed"
    seen = [tuple(json.loads(line)) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 3 * 8  # 3 steps x batch of 8 answers, each scored once
    assert all(p == r for p, r in seen), "an answer was scored with another decision's record"
    assert metrics["global_step"] == 3 and metrics["reward_source/calls"] == 24


def test_grpo_job_tracks_registers_loads_and_raises_reward(tiny_model, workspace, tmp_path):
    """A real run_tuning GRPO job with a sparse 0/1 --reward_fn: the held-out reward rose,
    the MLflow run has GRPO's curves, the model is registered and loads."""
    import mlflow
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from simtune import run_tuning

    reward = eval(f"lambda completion: {REWARDS['keyword'][0]}")  # noqa: S307 (our literal)
    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    before = mean_sampled_reward(tiny_model, None, HELD_OUT, reward)
    result = run_tuning(
        llm_path=str(tiny_model),
        dataset_path=[str(data)],
        workspace=str(workspace),
        reward_fn=_reward_file(tmp_path, "keyword"),
        max_steps=30,
        **GRPO_FAST,
    )
    after = mean_sampled_reward(tiny_model, result.adapter_path, HELD_OUT, reward)
    assert after > before + REWARDS["keyword"][1], (before, after)

    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["simtune.tuning_mode"] == "grpo"
    assert run.data.params["num_generations"] == "4"
    for name in ("train/reward", "train/rewards/simtune_reward/mean", "train/loss"):
        history = client.get_metric_history(result.run_id, name)
        assert [m.step for m in history] == list(range(1, 31)), name
        assert all(math.isfinite(m.value) for m in history), name
    rewards = [m.value for m in client.get_metric_history(result.run_id, "train/reward")]
    assert sum(rewards[-5:]) > sum(rewards[:5]), rewards  # the training answers improved too

    assert result.registered_model_name == "llm_tuning"  # one registered model per experiment
    version = client.get_model_version(result.registered_model_name, "1")
    assert version.tags["simtune.model_id"] == result.model_id
    assert version.tags["simtune.tuning_mode"] == "grpo"
    entries = json.loads((workspace / "models" / "registry.json").read_text())["models"]
    assert entries[0]["tuning_mode"] == "grpo" and entries[0]["model_id"] == result.model_id
    meta = json.loads((Path(result.adapter_path) / "simtune.json").read_text())
    assert meta["dataset"]["num_grpo_prompts"] == 2 * len(SKILLS)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), result.adapter_path
    )
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


@pytest.mark.parametrize("shape", ["length", "digits"])
def test_grpo_raises_rewards_of_other_shapes_on_held_out_prompts(
    shape, tiny_model, workspace, tmp_path
):
    """A target-like and a share-like reward rise too (the sparse one is above)."""
    from simtune import run_tuning

    reward = eval(f"lambda completion: {REWARDS[shape][0]}")  # noqa: S307 (our literal)
    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    before = mean_sampled_reward(tiny_model, None, HELD_OUT, reward)
    result = run_tuning(
        llm_path=str(tiny_model),
        dataset_path=[str(data)],
        workspace=str(workspace),
        reward_fn=_reward_file(tmp_path, shape),
        max_steps=30,
        **GRPO_FAST,
    )
    after = mean_sampled_reward(tiny_model, result.adapter_path, HELD_OUT, reward)
    assert after > before + REWARDS[shape][1], (shape, before, after)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "--tuning_mode grpo needs exactly one reward source"),
        (["--reward_fn", "REWARD", "--num_generations", "3"], "--num_generations 3: the batch"),
        (["--reward_fn", "REWARD", "--num_generations", "1"], "at least 2 answers"),
        (["--reward_fn", "REWARD", "--beta", "-0.1"], "--beta: must be >= 0"),
        (["--reward_fn", "no_such_module_xyz:f"], "--reward_fn"),
    ],
)
def test_bad_grpo_options_fail_before_any_work(args, needle, tiny_model, workspace, tmp_path):
    (tmp_path / "r.py").write_text("def reward(completion, **_):\n    return 0.0\n")
    args = [f"{tmp_path / 'r.py'}:reward" if a == "REWARD" else a for a in args]
    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS[:2])
    proc = run_cli(
        "train",
        "--tuning_mode",
        "grpo",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(data),
        "--workspace",
        str(workspace),
        *args,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr[-2000:]
    assert _mlflow_statuses(workspace) == []
    assert not (workspace / "models").exists() or not any((workspace / "models").iterdir())


def test_grpo_sigterm_checkpoints_and_resume_finishes_the_same_run(tiny_model, workspace, tmp_path):
    """--save_steps, SIGTERM (checkpoint at the current step, run KILLED, exit 130,
    nothing published) and --resume (same run and model id, to the final step)."""
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    args = [
        "train",
        "--tuning_mode",
        "grpo",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(data),
        "--workspace",
        str(workspace),
        "--reward_fn",
        _reward_file(tmp_path, "keyword"),
        "--max_steps",
        "40",
        "--save_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--max_new_tokens",
        "8",
    ]
    exe = Path(sys.executable).with_name("simtune")
    proc = subprocess.Popen(
        [str(exe), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if list(workspace.glob("jobs/*/checkpoints/checkpoint-*/trainer_state.json")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    with sqlite3.connect(workspace / "mlflow.db") as con:
        [(run_id, status)] = list(con.execute("select run_uuid, status from runs"))
    assert status == "KILLED"
    steps = [
        int(p.parent.name.split("-")[1])
        for p in workspace.glob("jobs/*/checkpoints/checkpoint-*/trainer_state.json")
    ]
    assert steps and 0 < max(steps) < 40, steps
    assert not (workspace / "models" / "registry.json").exists()

    done = run_cli(*args, "--resume", "--json", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["run_id"] == run_id and result["metrics"]["global_step"] == 40
    with sqlite3.connect(workspace / "mlflow.db") as con:
        assert list(con.execute("select status from runs")) == [("FINISHED",)]
    assert json.loads((workspace / "models" / "registry.json").read_text())["models"]


def test_grpo_scores_with_an_llm_judge_over_http(tiny_model, workspace, tmp_path):
    """--judge_url: a real OpenAI-compatible endpoint (the stub server) is asked once per
    sampled answer, and its 1-5 score, mapped to [-1, 1], is GRPO's reward."""
    import mlflow

    from simtune import run_tuning
    from simtune.testing.stub_llm import StubLLM

    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    with StubLLM(reply=lambda body: "Fine.\nScore: 4", model="judge") as judge:
        result = run_tuning(
            llm_path=str(tiny_model),
            dataset_path=[str(data)],
            workspace=str(workspace),
            judge_url=judge.url,
            judge_model="judge",
            max_steps=2,
            **GRPO_FAST,
        )
        asked = [r["body"] for r in judge.requests if r["path"].endswith("/chat/completions")]
    assert len(asked) == 2 * 8 and all(b["model"] == "judge" for b in asked)
    client = mlflow.MlflowClient(result.tracking_uri)
    rewards = [m.value for m in client.get_metric_history(result.run_id, "train/reward")]
    assert rewards == [pytest.approx(0.5)] * 2  # (4 - 3) / 2, the judge's mapping
    assert result.metrics["reward_source/unparsable"] == 0


def test_grpo_scores_with_a_simtune_reward_model(tiny_model, workspace, tmp_path):
    """--reward_model: a reward model from --tuning_mode reward, named by its model id,
    scores every sampled answer; its scores are GRPO's reward curve."""
    import mlflow

    from simtune import run_tuning

    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    rm = run_tuning(
        tuning_mode="reward",
        llm_path=str(tiny_model),
        dataset_path=[str(data)],
        workspace=str(workspace),
        max_steps=4,
        per_device_train_batch_size=8,
        seed=0,
    )
    result = run_tuning(
        llm_path=str(tiny_model),
        dataset_path=[str(data)],
        workspace=str(workspace),
        reward_model=rm.model_id,
        max_steps=2,
        **GRPO_FAST,
    )
    assert result.metrics["reward_source/samples"] == 2 * 8
    client = mlflow.MlflowClient(result.tracking_uri)
    rewards = [m.value for m in client.get_metric_history(result.run_id, "train/reward")]
    assert len(rewards) == 2 and all(math.isfinite(r) and r != 0.0 for r in rewards), rewards
    assert result.registered_model_name == "llm_tuning"  # one registered model per experiment
