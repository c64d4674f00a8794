"""DPO and KTO on the tiny model: how pairs and labels are formed, what trains, what is
tracked and registered, and the data errors (exit 2, nothing left behind)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from test_ppo import BAD, GOOD, SKILLS, _mlflow_statuses, logp_gap, preference_data

HELD_OUT = [
    f"You are a job seeker skilled in {s}. Apply or wait? Answer in JSON."
    for s in ("plumbing", "teaching", "music")
]
FAST = dict(
    learning_rate=1e-3,
    max_steps=10,
    per_device_train_batch_size=4,
    max_length=128,
    seed=0,
)


def _records(path: Path, rows: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps({"decision_id": str(i), **r}) + "\n" for i, r in enumerate(rows))
    )
    return path


def _cfg(mode: str, **kw):
    from simtune.config import build_config

    return build_config(
        overrides={"tuning_mode": mode, "llm_path": "x", "dataset_path": ["x"], **kw}
    )


def _decisions(rows: list[dict]):
    from simtune.decisions.schema import Decision

    return [Decision(decision_id=str(i), **r) for i, r in enumerate(rows)]


def test_dpo_pairs_best_with_worst_per_prompt_and_drops_ties_and_unscored():
    from simtune.training.preference import build_dpo_pairs

    rows = [
        {"prompt": "a", "output": "mid", "reward": 0.5},
        {"prompt": "a", "output": "best", "reward": 2.0},
        {"prompt": "a", "output": "worst", "reward": -1.0},
        {"prompt": "b", "output": "x", "rating": 3.0},  # a tie: no pair
        {"prompt": "b", "output": "y", "rating": 3.0},
        {"prompt": "c", "output": "alone", "reward": 1.0},  # one answer: no pair
        {"prompt": "d", "output": "good", "rating": 5.0},
        {"prompt": "d", "output": "bad", "rating": 1.0},
        {"prompt": "d", "output": "unscored"},
    ]
    data = build_dpo_pairs(_decisions(rows), _cfg("dpo"))
    assert [p[-1]["content"] for p in data.rows["prompt"]] == ["a", "d"]
    assert [c[0]["content"] for c in data.rows["chosen"]] == ["best", "good"]
    assert [r[0]["content"] for r in data.rows["rejected"]] == ["worst", "bad"]
    assert data.stats == {
        "num_pairs": 2,
        "unscored_dropped": 1,
        "prompts_single_answer": 1,
        "prompts_tied": 1,
    }


def test_kto_labels_by_threshold_default_mean_and_drops_unscored():
    from simtune.training.preference import build_kto_examples

    rows = [
        {"prompt": "a", "output": "o1", "reward": 0.0},
        {"prompt": "a", "output": "o2", "reward": 1.0},
        {"prompt": "b", "output": "o3", "reward": 3.0},
        {"prompt": "b", "output": "o4"},
    ]
    data = build_kto_examples(_decisions(rows), _cfg("kto"))
    assert data.rows["label"] == [False, False, True]  # mean of 0, 1, 3 is 4/3
    assert data.stats["desirable_threshold"] == pytest.approx(4 / 3)
    assert data.stats["unscored_dropped"] == 1
    data = build_kto_examples(_decisions(rows), _cfg("kto", desirable_threshold=0.5))
    assert data.rows["label"] == [False, True, True]
    assert (data.stats["num_desirable"], data.stats["num_undesirable"]) == (2, 1)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dpo", "kto"])
def test_preference_mode_trains_tracks_and_registers(mode, tiny_model, workspace, tmp_path):
    """Weights changed, the loss fell, the held-out log-prob gap between the rewarded and
    the punished answer rose, and the run, the registered version and the registry entry
    exist; the adapter loads on its base."""
    import mlflow
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from simtune import run_tuning

    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    before = logp_gap(tiny_model, None, HELD_OUT)
    result = run_tuning(
        tuning_mode=mode,
        llm_path=str(tiny_model),
        dataset_path=[str(data)],
        workspace=str(workspace),
        **FAST,
    )
    after = logp_gap(tiny_model, result.adapter_path, HELD_OUT)
    assert after > before + 1.0, (before, after)

    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["simtune.tuning_mode"] == mode
    losses = [m.value for m in client.get_metric_history(result.run_id, "train/loss")]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3]) - 0.1, losses
    margins = [m.value for m in client.get_metric_history(result.run_id, "train/rewards/margins")]
    assert margins[-1] > margins[0], margins
    assert result.registered_model_name == "llm_tuning"  # one registered model per experiment
    version = client.get_model_version(result.registered_model_name, "1")
    assert version.tags["simtune.model_id"] == result.model_id
    assert version.tags["simtune.tuning_mode"] == mode
    entries = json.loads((workspace / "models" / "registry.json").read_text())["models"]
    assert entries[0]["tuning_mode"] == mode
    if mode == "dpo":
        assert result.dataset["num_pairs"] == len(SKILLS)
    else:
        assert (result.dataset["num_desirable"], result.dataset["num_undesirable"]) == (8, 8)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), result.adapter_path
    )
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    merged_free = {
        n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p
        for n, p in model.state_dict().items()
        if "lora_" not in n
    }
    assert all(merged_free[n].equal(p) for n, p in base.items() if n in merged_free)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "rows", "extra", "needle"),
    [
        (
            "dpo",
            [
                {"prompt": "p1", "output": GOOD, "reward": 1.0},
                {"prompt": "p2", "output": BAD, "reward": 0.0},
            ],
            [],
            "no preference pair for DPO",
        ),
        (
            "dpo",
            [
                {"prompt": "p", "output": GOOD, "reward": 1.0},
                {"prompt": "p", "output": BAD, "reward": 1.0},
            ],
            [],
            "only answers that scored the same",
        ),
        ("kto", [{"prompt": "p", "output": GOOD}], [], "has a reward or rating"),
        (
            "kto",
            [
                {"prompt": "p", "output": GOOD, "reward": 1.0},
                {"prompt": "q", "output": BAD, "reward": 0.0},
            ],
            ["--desirable_threshold", "5"],
            "all 2 scored decisions are undesirable",
        ),
        (
            "kto",
            [
                {"prompt": "p", "output": GOOD, "reward": 1.0},
                {"prompt": "q", "output": BAD, "reward": 0.0},
            ],
            ["--per_device_train_batch_size", "1"],
            "KTO needs at least 2",
        ),
    ],
)
def test_preference_data_errors_exit_2_and_leave_nothing(
    mode, rows, extra, needle, tiny_model, workspace, tmp_path
):
    data = _records(tmp_path / "decisions_x.jsonl", rows)
    proc = run_cli(
        "train",
        "--tuning_mode",
        mode,
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(data),
        "--workspace",
        str(workspace),
        *extra,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr[-2000:]
    assert _mlflow_statuses(workspace) == []
    assert not (workspace / "models").exists() or not any((workspace / "models").iterdir())
