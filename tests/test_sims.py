"""The example job market: collection through the CLI, determinism, expert vs random,
an LLM policy over HTTP (StubLLM), error paths, and the collected data training as is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import free_port, run_cli

from simtune.decisions import read_dataset
from simtune.sims import LLMPolicy, list_simulations, run_simulation
from simtune.sims.core import INVALID_REWARD, load_answer
from simtune.testing.stub_llm import StubLLM


def raw_lines(directory: Path) -> list[dict]:
    return [
        json.loads(line)
        for f in sorted(directory.glob("decisions_*.jsonl"))
        for line in f.read_text().splitlines()
    ]


def test_cli_expert_run_records_rewarded_decisions(workspace: Path) -> None:
    r = run_cli(
        "sims", "run", "job_market", "--expert", "--episodes", "2", "--workspace", str(workspace),
        "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    data = workspace / "envs" / "job_market" / "datasets"
    assert result["path"] and Path(result["path"]).parent == data
    assert len(list(data.glob("decisions_*.jsonl"))) == 1
    assert result["policy"] == "expert-policy" and result["invalid"] == 0

    ds = read_dataset([str(data)])
    assert len(ds.decisions) == result["decisions"] > 20
    assert ds.orphan_events == 0
    assert {d.agent_type for d in ds.decisions} == {"JobSeeker", "Employer"}
    assert {d.metadata["kind"] for d in ds.decisions} == {"apply", "hire", "accept"}
    for d in ds.decisions:
        assert d.reward is not None, d.source
        assert [m["role"] for m in d.messages] == ["system", "user"]
        assert json.loads(d.output)  # the expert always answers JSON
        assert d.model == "expert-policy" and d.run_id == result["run_id"]
    mean = sum(d.reward for d in ds.decisions) / len(ds.decisions)
    assert mean == pytest.approx(result["mean_reward"], abs=1e-3)

    # Every decision got an immediate reward and an episode share (uniform rule).
    lines = raw_lines(data)
    shares = [x for x in lines if x.get("event") == "reward" and "episode_return" in x]
    immediate = [x for x in lines if x.get("event") == "reward" and "episode_return" not in x]
    ids = {d.decision_id for d in ds.decisions}
    assert {x["decision_id"] for x in shares} == ids
    assert {x["decision_id"] for x in immediate} == ids
    assert {x["rule"] for x in shares} == {"uniform"}


def test_same_seed_same_run_and_episodes_share_start_states(tmp_path: Path) -> None:
    def run(ws: str, seed: int, policy: str = "expert", episodes: int = 2) -> list[tuple]:
        res = run_simulation(
            "job_market", policy, episodes=episodes, seed=seed, workspace=str(tmp_path / ws),
            env_name="jm_test", run_id=f"run-{ws}",
        )  # fmt: skip
        assert res.env_name == "jm_test" and res.run_id == f"run-{ws}"
        ds = read_dataset([str(tmp_path / ws / "envs" / "jm_test" / "datasets")])
        return [
            (d.agent_id, d.step, d.metadata["episode"], d.messages, d.output, round(d.reward, 6))
            for d in ds.decisions
        ]

    a, b, c = run("a", 3), run("b", 3), run("c", 4)
    assert a == b
    assert a != c
    # Episode 1 starts from the same state whatever the policy did in the run.
    first_prompt = a[0][3]
    assert run("d", 3, "random", 1)[0][3] == first_prompt


def test_expert_earns_clearly_more_than_random(tmp_path: Path) -> None:
    expert = run_simulation("job_market", "expert", episodes=8, seed=0, workspace=str(tmp_path))
    rand = run_simulation("job_market", "random", episodes=8, seed=0, workspace=str(tmp_path))
    assert expert.invalid == rand.invalid == 0
    assert expert.expert_agreement == 1.0 and rand.expert_agreement < 0.6
    assert expert.mean_reward > rand.mean_reward + 0.25
    assert expert.mean_immediate_reward > rand.mean_immediate_reward + 0.2
    for kind in ("apply", "hire", "accept"):
        assert expert.by_kind[kind]["mean_reward"] > rand.by_kind[kind]["mean_reward"], kind
    for agent_type in ("JobSeeker", "Employer"):
        assert expert.mean_episode_return[agent_type] > rand.mean_episode_return[agent_type]


def stub_reply(body: dict) -> str:
    """Applies (fenced JSON) to the first vacancy listed, answers hires with prose."""
    prompt = body["messages"][-1]["content"]
    if '"apply"' in prompt:
        first = re.search(r"^- (E\d+):", prompt, re.M).group(1)
        return f'```json\n{{"apply": ["{first}"]}}\n```'
    if '"hire"' in prompt:
        return "I would hire the most experienced one."
    return '{"accept": null}'


def test_llm_policy_over_http_counts_and_penalises_invalid_answers(tmp_path: Path) -> None:
    with StubLLM(reply=stub_reply, model="stub-model", delay=0.002) as llm:
        result = run_simulation(
            "job_market", LLMPolicy(llm.url), episodes=2, steps=3, workspace=str(tmp_path)
        )
        requests = list(llm.requests)
        cli = run_cli(
            "sims", "run", "job_market", "--model-url", llm.url, "--model", "named-model",
            "--episodes", "1", "--steps", "2", "--workspace", str(tmp_path / "cli"), "--json",
        )  # fmt: skip
    assert result.policy == "stub-model"
    assert len(requests) == result.decisions
    assert requests[0]["body"]["model"] == "stub-model"
    assert [m["role"] for m in requests[0]["body"]["messages"]] == ["system", "user"]

    hire, apply = result.by_kind["hire"], result.by_kind["apply"]
    assert apply["invalid"] == 0  # fenced JSON is accepted
    assert hire["decisions"] > 0 and hire["invalid"] == hire["decisions"] == result.invalid
    assert "accept" not in result.by_kind  # invalid hire answers default to "nobody"

    records = [x for x in raw_lines(Path(result.dataset_dir)) if "event" not in x]
    assert len(records) == result.decisions
    for rec in records:
        assert rec["model"] == "stub-model"
        assert rec["latency_s"] >= 0.002
        if rec["metadata"]["kind"] == "hire":
            assert rec["reward"] == INVALID_REWARD
            assert rec["metadata"]["invalid_reason"] == "not a JSON object"
            assert rec["output"].startswith("I would hire")
        else:
            assert "reward" not in rec and "invalid_reason" not in rec["metadata"]

    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    assert out["policy"] == "named-model" and out["invalid"] == out["by_kind"]["hire"]["invalid"]


def test_empty_answers_are_invalid_but_not_recorded(tmp_path: Path) -> None:
    """A model that emits end-of-text at once answers "": penalised, counted, and left out
    of the log (the reader refuses empty outputs, so one would spoil the whole folder)."""
    with StubLLM(reply=lambda body: "", model="silent") as llm:
        result = run_simulation(
            "job_market", LLMPolicy(llm.url), episodes=1, steps=2, workspace=str(tmp_path)
        )
    assert result.decisions > 0 and result.invalid == result.decisions
    assert result.mean_reward == pytest.approx(INVALID_REWARD)
    assert not list(Path(result.dataset_dir).glob("decisions_*.jsonl"))  # nothing to record


def test_unreachable_model_url_fails_in_one_line_and_writes_nothing(workspace: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    r = run_cli("sims", "run", "job_market", "--model-url", url, "--workspace", str(workspace))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model-url" in lines[0] and "cannot reach" in lines[0], r.stderr
    assert not (workspace / "envs").exists()


def test_unknown_sim_and_policy_flags(workspace: Path) -> None:
    r = run_cli("sims", "run", "no_such_sim", "--expert", "--workspace", str(workspace))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "simtune: error: unknown simulation 'no_such_sim' (available: job_market)"
    ]
    r = run_cli("sims", "run", "job_market", "--expert", "--random")
    assert r.returncode == 2 and "not allowed with" in r.stderr
    r = run_cli("sims", "run", "job_market")
    assert r.returncode == 2 and "required" in r.stderr
    r = run_cli("sims", "list", "--json")
    assert r.returncode == 0
    assert [s["name"] for s in json.loads(r.stdout)] == ["job_market"]
    assert not (workspace / "envs").exists()
    assert list_simulations()[0]["agent_types"] == ["JobSeeker", "Employer"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"hire": "S1"}', "S1"),
        ('```json\n{"hire": null}\n```', None),
        ('Sure! {"hire": "S2"} is my choice.', "S2"),
    ],
)
def test_load_answer_accepts(text: str, value: object) -> None:
    assert load_answer(text, "hire") == value


@pytest.mark.parametrize(
    ("text", "reason"),
    [("hire S1", "not a JSON object"), ('["S1"]', "not a JSON object"), ("{}", "no 'hire' key")],
)
def test_load_answer_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        load_answer(text, "hire")


@pytest.mark.slow
def test_expert_data_trains_sft_and_offline_ppo(tiny_model: Path, workspace: Path) -> None:
    from simtune import run_tuning

    sim = run_simulation("job_market", "expert", episodes=2, workspace=str(workspace))
    common = dict(
        llm_path=str(tiny_model),
        dataset_path=[sim.dataset_dir],
        workspace=str(workspace),
        max_steps=2,
        max_length=320,
        learning_rate=5e-3,
        per_device_train_batch_size=8,
        warmup_ratio=0.0,
        lora_dropout=0.0,
        seed=0,
    )
    sft = run_tuning(tuning_mode="sft", **common)
    assert sft.dataset["num_records"] == sim.decisions
    assert (Path(sft.adapter_path) / "adapter_model.safetensors").is_file()
    ppo = run_tuning(tuning_mode="ppo", ppo_epochs=1, **common)
    assert ppo.dataset["num_used"] == sim.decisions
    assert (Path(ppo.adapter_path) / "adapter_model.safetensors").is_file()
