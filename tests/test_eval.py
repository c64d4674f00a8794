"""`simtune eval`: metrics, side-by-side comparison, MLflow evaluation runs, sim mode, bad input."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import SAMPLE, run_cli

CONST = '{"a": 1}'
FAST = dict(
    per_device_train_batch_size=8,
    warmup_ratio=0.0,
    lr_scheduler_type="constant",
    logging_steps=5,
    seed=0,
    lora_dropout=0.0,
)


# --- metric helpers (no model) -----------------------------------------------------------


def test_exact_match_normalises_whitespace_fences_and_json():
    from simtune.evaluation import exact_match, is_json_answer, normalise_answer

    assert exact_match('{"a":1,  "b": [1, 2]}', '{"b": [1,2], "a": 1}')  # key order, spacing
    assert exact_match('```json\n{"a": 1}\n```', CONST)  # fences removed
    assert exact_match("  hire   the\nfirst one ", "hire the first one")
    assert not exact_match('{"a": true}', '{"a": 1}')  # canonical JSON: true is not 1
    assert not exact_match('{"a": 1} thanks', CONST)
    assert normalise_answer("```\nplain\n```") == "text:plain"
    assert is_json_answer("```json\n[1, 2]\n```") and is_json_answer(CONST)
    assert not is_json_answer("3") and not is_json_answer('Sure: {"a": 1}')
    assert not is_json_answer("")


def test_dataset_metrics_aggregate_rows_with_json_denominator():
    from simtune.evaluation import dataset_metrics

    def row(gen: str, ref: str, reward: float | None, tokens: int, finish: str = "stop"):
        from simtune.evaluation import exact_match, is_json_answer

        ref_json = is_json_answer(ref)
        return {
            "generated": gen,
            "reference": ref,
            "exact_match": exact_match(gen, ref),
            "reference_is_json": ref_json,
            "json_valid": is_json_answer(gen) if ref_json else None,
            "reward": reward,
            "completion_tokens": tokens,
            "finish_reason": finish,
        }

    rows = [
        row(CONST, CONST, 1.0, 4),
        row('{"a": 2}', CONST, 0.0, 4),
        row("nonsense", CONST, 0.0, 16, "length"),
        row("wait", "wait", 0.5, 2),
    ]
    m = dataset_metrics(rows)
    assert m["num_samples"] == 4 and m["json_records"] == 3
    assert m["exact_match"] == pytest.approx(2 / 4)
    assert m["json_valid"] == pytest.approx(2 / 3)  # only rows whose reference is JSON
    assert m["mean_reward"] == pytest.approx(1.5 / 4)
    assert m["mean_tokens"] == pytest.approx(26 / 4)
    assert m["mean_chars"] == pytest.approx(sum(len(r["generated"]) for r in rows) / 4)
    assert m["truncated"] == pytest.approx(0.25)
    no_reward = dataset_metrics([{**r, "reward": None} for r in rows])
    assert "mean_reward" not in no_reward


# --- bad input: one line, nothing loaded ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_options_fail_before_anything_loads(tmp_path, workspace):
    from simtune.errors import ConfigError, DataError, SimtuneError
    from simtune.evaluation import evaluate

    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"prompt": "q", "output": CONST}) + "\n")
    ws = str(workspace)
    with pytest.raises(ConfigError, match="exactly one of --dataset_path .* or --sim"):
        evaluate(["x"], workspace=ws)
    with pytest.raises(ConfigError, match="exactly one"):
        evaluate(["x"], dataset_path=str(data), sim="job_market", workspace=ws)
    with pytest.raises(ConfigError, match="unknown simulation"):
        evaluate(["x"], sim="nope", workspace=ws)
    with pytest.raises(ConfigError, match="--reward_fn / --judge_url"):
        evaluate(["x"], sim="job_market", reward_fn="m:f", workspace=ws)
    with pytest.raises(ConfigError, match="--reward_fn"):
        evaluate(["x"], dataset_path=str(data), reward_fn=str(tmp_path / "no.py:f"), workspace=ws)
    with pytest.raises(ConfigError, match="not both"):
        evaluate(["x"], dataset_path=str(data), reward_fn="m:f", judge_url="http://x", workspace=ws)
    with pytest.raises(ConfigError, match="--judge_model needs --judge_url"):
        evaluate(["x"], dataset_path=str(data), judge_model="j", workspace=ws)
    with pytest.raises(ConfigError, match="--max_tokens"):
        evaluate(["x"], dataset_path=str(data), max_tokens=0, workspace=ws)
    with pytest.raises(ConfigError, match="--model"):
        evaluate([], dataset_path=str(data), workspace=ws)
    with pytest.raises(ConfigError, match="'base' means the base model of the other"):
        evaluate(["base"], dataset_path=str(data), workspace=ws)
    with pytest.raises(ConfigError, match="given more than once"):
        evaluate(["a", "a"], dataset_path=str(data), workspace=ws)
    with pytest.raises(DataError, match="no_such.jsonl"):
        evaluate(["x"], dataset_path=str(tmp_path / "no_such.jsonl"), workspace=ws)
    with pytest.raises(SimtuneError, match="--judge_url"):
        evaluate(
            ["x"],
            dataset_path=str(data),
            judge_url=f"http://127.0.0.1:{_free_port()}/v1",
            judge_model="j",
            workspace=ws,
        )
    with pytest.raises(SimtuneError, match="unknown model 'nope'"):
        evaluate(["nope"], dataset_path=str(data), workspace=ws)
    assert not (workspace / "mlflow.db").exists(), "a failed check created an MLflow store"


def test_cli_bad_input_exits_2_with_one_line(tmp_path, workspace):
    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"prompt": "q", "output": CONST}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "output": "x"}\n{"prompt": \n{"prompt": "q", "output": "y"}\n')
    ws = ["--workspace", str(workspace)]
    cases = [
        (["--model", "x"], "one of the arguments --dataset_path"),
        (["--model", "x", "--sim", "job_market", "--dataset_path", str(data)], "not allowed"),
        (["--model", "nope", "--dataset_path", str(data)], "unknown model 'nope'"),
        (["--model", "x", "--dataset_path", str(bad)], "bad.jsonl:2"),
        (
            [
                "--model",
                "x",
                "--dataset_path",
                str(data),
                "--judge_url",
                f"http://127.0.0.1:{_free_port()}/v1",
                "--judge_model",
                "j",
            ],
            "--judge_url",
        ),
    ]
    for args, needle in cases:
        res = run_cli("eval", *args, *ws, timeout=120)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, res.stderr)


# --- two tiny adapters, base, MLflow ----------------------------------------------------


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _short_prompts() -> list[str]:
    # One line of each bundled prompt: short, so the tiny model trains in seconds.
    recs = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    return [r["prompt"].splitlines()[1] for r in recs]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A workspace with two adapters in two experiments: `const` trained hard to answer
    {"a": 1}, `sample` briefly on the bundled sample; and a held-out file."""
    from simtune import run_tuning

    root = tmp_path_factory.mktemp("eval")
    ws = root / "ws"
    prompts = _short_prompts()
    const_data = _write_jsonl(
        root / "const.jsonl",
        [{"prompt": f"Case {i}: {p}", "output": CONST} for i, p in enumerate(prompts[:24])],
    )
    common = dict(llm_path=str(tiny_model), workspace=str(ws), **FAST)
    const = run_tuning(
        dataset_path=[str(const_data)],
        max_steps=25,
        learning_rate=1e-2,
        experiment_name="exp-const",
        **common,
    )
    sample = run_tuning(
        dataset_path=[str(SAMPLE)],
        max_steps=2,
        learning_rate=5e-3,
        experiment_name="exp-sample",
        **common,
    )
    heldout = _write_jsonl(
        root / "heldout.jsonl",
        # 6 JSON references (two of them fenced, as the seed simulator logged them) and
        # 2 plain-text ones: json_valid counts over the 6 only.
        [{"prompt": f"Case {90 + i}: {p}", "output": CONST} for i, p in enumerate(prompts[30:34])]
        + [
            {"prompt": f"Case {95 + i}: {p}", "output": f"```json\n{CONST}\n```"}
            for i, p in enumerate(prompts[34:36])
        ]
        + [{"prompt": f"Case 99: {p}", "output": "wait and see"} for p in prompts[36:38]],
    )
    reward = root / "reward.py"
    reward.write_text(
        "import json\n\n"
        "def score(completion, record=None):\n"
        "    try:\n"
        "        return 1.0 if json.loads(completion) == {'a': 1} else 0.0\n"
        "    except ValueError:\n"
        "        return -0.5\n"
    )
    return {
        "ws": ws,
        "const": const,
        "sample": sample,
        "heldout": heldout,
        "reward": f"{reward}:score",
    }


@pytest.fixture(scope="module")
def report(trained):
    from simtune.evaluation import evaluate

    t = trained
    seen: list[tuple[str, int, int]] = []
    rep = evaluate(
        [t["const"].model_id, t["sample"].model_id, "base"],
        dataset_path=str(t["heldout"]),
        reward_fn=t["reward"],
        max_tokens=12,
        workspace=str(t["ws"]),
        progress=lambda *a: seen.append(a),
    )
    return rep, seen


@pytest.mark.slow
def test_dataset_eval_compares_models_and_computes_metrics(trained, report):
    from simtune.evaluation import dataset_metrics, exact_match

    rep, seen = report
    const, sample = trained["const"].model_id, trained["sample"].model_id
    assert rep.mode == "dataset" and rep.models == [const, sample, "base"]
    assert rep.specs["base"] == "base"
    m_const, m_base = rep.metrics[const], rep.metrics["base"]
    for m in rep.metrics.values():
        assert m["num_samples"] == 8 and m["json_records"] == 6
        assert {"exact_match", "json_valid", "mean_reward", "mean_chars", "mean_tokens"} <= set(m)
    # The constant-answer adapter says {"a": 1} to everything; the random base never does.
    assert m_const["exact_match"] >= 5 / 8 > m_base["exact_match"]
    assert m_const["json_valid"] >= 5 / 6 > (m_base["json_valid"] or 0.0)
    assert m_const["mean_reward"] > m_base["mean_reward"]
    # Metrics are what the per-sample rows say, and the rows are right.
    for name in rep.models:
        rows = rep.samples[name]
        assert rep.metrics[name] == dataset_metrics(rows)
        for r in rows:
            assert r["exact_match"] == exact_match(r["generated"], r["reference"])
            assert r["completion_tokens"] <= 12
    # the fenced logged answers count as JSON references (json_records == 6 above)
    assert sum(r["reference_is_json"] for r in rep.samples[const]) == 6
    assert rep.reward_source and rep.reward_source.endswith("reward.py:score")
    # progress: every model reported, ending at 8 of 8
    assert {s[0] for s in seen} == set(rep.models)
    assert all((name, 8, 8) in seen for name in rep.models)
    assert "samples" not in rep.to_dict() and rep.to_dict(samples=True)["samples"]


@pytest.mark.slow
def test_eval_runs_are_logged_in_the_training_experiments_and_nested(trained, report):
    import mlflow

    rep, _ = report
    const, sample = trained["const"], trained["sample"]
    client = mlflow.MlflowClient(rep.tracking_uri)
    runs = {name: client.get_run(run_id) for name, run_id in rep.runs.items()}
    assert set(runs) == set(rep.models)
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.info.run_name.startswith(f"eval-{name}-")
        assert run.data.tags["simtune.kind"] == "evaluation"
        assert run.data.tags["simtune.model"] == name
        assert run.data.tags["simtune.eval_group"] == rep.eval_group
        assert run.data.params["max_tokens"] == "12"
        assert run.data.params["dataset.files"] == "heldout.jsonl"
        assert run.data.params["reward_source"] == rep.reward_source
        assert run.data.metrics["eval/exact_match"] == pytest.approx(
            rep.metrics[name]["exact_match"]
        )
        assert run.data.metrics["eval/json_records"] == 6
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"eval_samples.json", "eval_metrics.json"} <= artifacts
    # each tuned model's evaluation sits in its training run's experiment, nested under it
    for result in (const, sample):
        run = runs[result.model_id]
        assert run.info.experiment_id == result.experiment_id
        assert run.data.tags["simtune.training_run_id"] == result.run_id
        assert run.data.tags["mlflow.parentRunId"] == result.run_id
        assert rep.training_runs[result.model_id] == result.run_id
        assert run.data.tags["simtune.registered_model"] == (
            f"{result.registered_model_name}/{result.registered_model_version}"
        )
    # the base has no training run: it joins the first tuned model's experiment
    base = runs["base"]
    assert base.info.experiment_id == const.experiment_id
    assert "mlflow.parentRunId" not in base.data.tags
    assert "simtune.training_run_id" not in base.data.tags
    table = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=rep.runs[const.model_id],
                artifact_path="eval_samples.json",
                tracking_uri=rep.tracking_uri,
            )
        ).read_text()
    )
    assert {"prompt", "reference", "generated", "reward"} <= set(table["columns"])
    assert len(table["data"]) == 8


@pytest.mark.slow
def test_cli_table_and_json(trained, capsys):
    from simtune.cli.main import main

    t = trained
    args = ["eval", "--model", t["const"].model_id, "--model", "base"]
    args += ["--dataset_path", str(t["heldout"]), "--reward_fn", t["reward"]]
    args += ["--max_tokens", "12", "--workspace", str(t["ws"]), "--experiment_name", "cli-eval"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert t["const"].model_id[:10] in out and "base" in out
    for label in ("mean_reward", "exact_match", "json_valid", "mean_tokens", "6 JSON refs"):
        assert label in out, out
    assert "MLflow evaluation runs" in out

    res = run_cli(
        "eval",
        "--model",
        t["sample"].model_id,
        "--model",
        "base",
        "--dataset-path",
        str(t["heldout"]),
        "--max-samples",
        "3",
        "--max-tokens",
        "8",
        "--workspace",
        str(t["ws"]),
        "--no-mlflow",
        "--json",
        timeout=240,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["models"] == [t["sample"].model_id, "base"]
    assert data["runs"] == {} and data["reward_source"] is None
    for m in data["metrics"].values():
        assert m["num_samples"] == 3 and "mean_reward" not in m


@pytest.mark.slow
def test_sim_mode_serves_models_and_plays_the_same_episodes(trained):
    import mlflow

    from simtune.evaluation import evaluate

    t = trained
    ws = t["ws"]
    rep = evaluate(
        [t["const"].model_id, "base"],
        sim="job_market",
        episodes=1,
        steps=1,
        seed=1000,
        sim_options={"seekers": 2, "employers": 1},
        max_tokens=10,
        workspace=str(ws),
    )
    assert rep.mode == "sim" and rep.models == [t["const"].model_id, "base"]
    for name in rep.models:
        m = rep.metrics[name]
        assert m["decisions"] >= 2, m
        assert 0.0 <= m["invalid_rate"] <= 1.0 and m["mean_reward"] is not None
        assert "mean_reward/JobSeeker" in m and "episode_return/JobSeeker" in m
        sim = rep.sims[name]
        assert (
            sim["policy"] == name and sim["seed"] == 1000 and sim["env_name"] == "job_market-eval"
        )
        run = mlflow.MlflowClient(rep.tracking_uri).get_run(rep.runs[name])
        assert run.info.status == "FINISHED"
        assert run.data.params["sim"] == "job_market" and run.data.params["seed"] == "1000"
        assert run.data.metrics["eval/invalid_rate"] == pytest.approx(m["invalid_rate"])
    # {"a": 1} is never a valid job-market answer: every decision of `const` is invalid
    assert rep.metrics[t["const"].model_id]["invalid_rate"] == 1.0
    # Recorded apart from the training data, and both models faced the same first
    # decisions (same seed: the same starting state whatever the policy).
    files = sorted((ws / "envs" / "job_market-eval" / "datasets").glob("decisions_*.jsonl"))
    assert len(files) == 2 and {rep.sims[n]["path"] for n in rep.models} == set(map(str, files))
    firsts = [json.loads(f.read_text().splitlines()[0]) for f in files]
    assert firsts[0]["messages"] == firsts[1]["messages"]
    assert not (ws / "envs" / "job_market").exists()


@pytest.mark.slow
def test_a_failing_evaluation_ends_its_run_failed(trained, tmp_path):
    import mlflow

    from simtune.evaluation import evaluate
    from simtune.rewards import RewardError

    t = trained
    boom = tmp_path / "boom.py"
    boom.write_text("def score(completion):\n    raise RuntimeError('boom')\n")
    with pytest.raises(RewardError, match="boom"):
        evaluate(
            [t["sample"].model_id],
            dataset_path=str(t["heldout"]),
            reward_fn=f"{boom}:score",
            max_samples=2,
            max_tokens=4,
            workspace=str(t["ws"]),
        )
    client = mlflow.MlflowClient(t["sample"].tracking_uri)
    failed = client.search_runs(
        [t["sample"].experiment_id],
        "tags.`simtune.kind` = 'evaluation' and attributes.status = 'FAILED'",
    )
    assert [r.data.tags["mlflow.parentRunId"] for r in failed] == [t["sample"].run_id]


@pytest.mark.slow
def test_judge_scores_are_mapped_like_ppo_rewards(trained):
    from simtune.evaluation import evaluate
    from simtune.testing.stub_llm import StubLLM

    t = trained
    with StubLLM(reply=lambda body: "Fine answer.\nScore: 4", model="judge") as judge:
        rep = evaluate(
            [t["const"].model_id],
            dataset_path=str(t["heldout"]),
            judge_url=judge.url,
            judge_model="judge",
            max_samples=2,
            max_tokens=8,
            workspace=str(t["ws"]),
            log_to_mlflow=False,
        )
        asked = [r["body"] for r in judge.requests if r["path"].endswith("/chat/completions")]
    assert rep.reward_source.startswith("judge:judge@") and rep.runs == {}
    assert rep.metrics[t["const"].model_id]["mean_reward"] == pytest.approx(0.5)  # (4 - 3) / 2
    assert len(asked) == 2 and CONST in asked[0]["messages"][-1]["content"]
