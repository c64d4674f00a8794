"""Reward sources for online PPO, score normalisation and the reward-model recipe.

Everything is real: reward functions are imported from files, the judge is a real
HTTP server on 127.0.0.1, and the reward model is trained on the tiny model, saved,
and loaded back through RewardModelScorer and the MLflow pyfunc class.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import free_port

from simtune.decisions.schema import Decision
from simtune.errors import ConfigError, DataError, SimtuneError
from simtune.rewards import (
    FunctionReward,
    JudgeReward,
    RewardSource,
    check_judge,
    check_reward_model,
    load_reward_fn,
    make_reward_source,
    normalise_scores,
    parse_judge_score,
)

PROMPTS = [[{"role": "user", "content": "Pick an action."}]]

# --- --reward_fn -------------------------------------------------------------------------


@pytest.fixture
def reward_file(tmp_path: Path) -> Path:
    f = tmp_path / "my_rewards.py"
    f.write_text(
        "def length(prompt, completion, record):\n"
        "    return float(len(completion)) + (0.5 if record is not None else 0.0)\n"
        "def echo_prompt(prompt, completion, **kw):\n"
        "    return float(len(prompt))\n"
        "def only_completion(completion):\n"
        "    return 1.0 if 'good' in completion else -1.0\n"
        "def boom(prompt, completion, record):\n"
        "    if completion == 'x':\n"
        "        raise ValueError('bad sample')\n"
        "    return 1.0\n"
        "def high(prompt, completion, record):\n"
        "    return 'high'\n"
        "def nan(prompt, completion, record):\n"
        "    return float('nan')\n"
        "def true(prompt, completion, record):\n"
        "    return True\n"
        "NOT_CALLABLE = 3\n"
    )
    return f


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no_colon_here", "expected 'module:function'"),
        (":fn", "expected 'module:function'"),
        ("json:", "expected 'module:function'"),
        ("simtune_no_such_module_xyz:fn", "no module named 'simtune_no_such_module_xyz'"),
        ("json:no_such_function", "has no attribute 'no_such_function'"),
        ("math:pi", "is not callable (it is a float)"),
        ("/no/such/dir/rewards.py:fn", "no such file"),
    ],
)
def test_load_reward_fn_errors_name_the_flag_and_the_problem(spec, needle):
    with pytest.raises(ConfigError) as err:
        load_reward_fn(spec)
    assert str(err.value).startswith("--reward_fn: ")
    assert needle in str(err.value)


def test_load_reward_fn_from_a_file_and_a_module(reward_file, tmp_path, monkeypatch):
    fn = load_reward_fn(f"{reward_file}:length")
    assert fn(prompt="p", completion="abc", record=None) == 3.0
    with pytest.raises(ConfigError, match="--reward_fn: .* is not callable"):
        load_reward_fn(f"{reward_file}:NOT_CALLABLE")

    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_fn("my_rewards:only_completion")(completion="good") == 1.0

    broken = tmp_path / "broken.py"
    broken.write_text("import simtune_missing_dependency_xyz\n")
    with pytest.raises(ConfigError, match="--reward_fn: importing .*broken.py failed"):
        load_reward_fn(f"{broken}:fn")
    with pytest.raises(ConfigError, match="importing 'broken' failed: ModuleNotFoundError"):
        load_reward_fn("broken:fn")


def test_function_reward_passes_prompt_completion_record(reward_file):
    record = Decision(decision_id="d1", output="logged", prompt="Pick an action.")
    prompts = [
        [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": "Pick an action."},
        ],
        [{"role": "assistant", "content": "ab"}],
    ]
    src = FunctionReward(load_reward_fn(f"{reward_file}:length"), "my:length")
    assert isinstance(src, RewardSource)
    assert src.score(prompts, ["abc", "de"], [record, record]) == [3.5, 2.5]
    # The prompt is the last user message; without one, the whole prompt's text.
    echo = FunctionReward(load_reward_fn(f"{reward_file}:echo_prompt"))
    assert echo.score(prompts, ["", ""], [record, record]) == [15.0, 2.0]
    # Undeclared keywords are not passed.
    only = FunctionReward(load_reward_fn(f"{reward_file}:only_completion"))
    assert only.score(PROMPTS * 2, ["good", "bad"], []) == [1.0, -1.0]
    assert src.stats() == {"calls": 2.0, "failures": 0.0}


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("boom", "--reward_fn f:boom raised ValueError: bad sample on sample 1"),
        ("high", "returned 'high' (a str) on sample 0"),
        ("nan", "returned nan (a float) on sample 0"),
        ("true", "returned True (a bool) on sample 0"),
    ],
)
def test_function_reward_errors_name_the_problem(reward_file, name, needle):
    src = FunctionReward(load_reward_fn(f"{reward_file}:{name}"), f"f:{name}")
    with pytest.raises(SimtuneError) as err:
        src.score(PROMPTS * 2, ["ok", "x"], [])
    assert needle in str(err.value)
    assert src.stats()["failures"] == 1.0


def test_function_reward_accepts_numpy_and_torch_scalars():
    import numpy as np
    import torch

    assert FunctionReward(lambda **kw: np.float32(0.5)).score(PROMPTS, ["a"], []) == [0.5]
    assert FunctionReward(lambda **kw: torch.tensor(2.0)).score(PROMPTS, ["a"], []) == [2.0]


# --- normalisation -----------------------------------------------------------------------


def test_normalise_scores():
    z = normalise_scores([1.0, 2.0, 3.0], "zscore")
    assert z == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert sum(z) == pytest.approx(0.0) and sum(v * v for v in z) / 3 == pytest.approx(1.0)
    assert normalise_scores([1.0, 2.0, 3.0]) == z  # zscore is the default
    assert normalise_scores([4.0, 4.0, 4.0], "zscore") == [0.0, 0.0, 0.0]
    assert normalise_scores([0.0, 5.0, 10.0], "minmax") == pytest.approx([-1.0, 0.0, 1.0])
    assert normalise_scores([7, 7], "minmax") == [0.0, 0.0]
    assert normalise_scores([1, 5, 2], "none") == [1.0, 5.0, 2.0]
    assert normalise_scores([], "zscore") == []
    assert normalise_scores([3.0], "zscore") == [0.0]
    with pytest.raises(ConfigError, match="unknown score normalisation 'rank'"):
        normalise_scores([1.0], "rank")


# --- LLM judge ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("Reasonable choice.\nScore: 5", 5),
        ("score 1", 1),
        ("SCORE: **4**/5", 4),
        ("Score: 10\nscore: 2", 2),
        ("3", 3),
        (" 4. ", 4),
        ("I cannot rate this.", None),
        ("Score: 7", None),
        ("6", None),
    ],
)
def test_parse_judge_score(text, score):
    assert parse_judge_score(text) == score


class Judge:
    """A real OpenAI-compatible chat endpoint: the answer to a completion is looked up
    in `replies`; completions listed in `fail_first` get one HTTP 500 first."""

    def __init__(self) -> None:
        self.replies = {"great": "Sound decision.\nScore: 5", "poor": "score 1", "odd": "hmm"}
        self.fail_first = {"flaky"}
        self.always_fail = False
        self.requests: list[dict] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "judge"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body["_auth"] = self.headers.get("Authorization")
                judge.requests.append(body)
                text = body["messages"][-1]["content"]
                answer = text.split("[AGENT ANSWER]\n", 1)[1].split("\n", 1)[0]
                if judge.always_fail or answer in judge.fail_first:
                    judge.fail_first.discard(answer)
                    self._send(500, {"error": "overloaded"})
                    return
                reply = judge.replies.get(answer, "Score: 3")
                self._send(
                    200,
                    {
                        "id": "c1",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": reply},
                                "finish_reason": "stop",
                            }
                        ],
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge():
    j = Judge()
    yield j
    j.close()


def test_judge_scores_parses_and_counts(judge):
    check_judge(judge.url, timeout=5)
    src = JudgeReward(judge.url, "judge-model", api_key="sk-test", timeout=5, backoff=0.01)
    assert isinstance(src, RewardSource)
    scores = src.score(PROMPTS * 4, ["great", "poor", "odd", "meh"], [])
    assert scores == [1.0, -1.0, 0.0, 0.0]
    assert src.stats() == {"calls": 4.0, "retries": 0.0, "unparsable": 1.0, "failures": 0.0}
    req = judge.requests[0]
    assert req["model"] == "judge-model" and req["_auth"] == "Bearer sk-test"
    assert "Pick an action." in req["messages"][-1]["content"]
    assert "Score: N" in req["messages"][-1]["content"]


def test_judge_retries_server_errors_then_gives_up(judge):
    src = JudgeReward(judge.url, "judge", timeout=5, max_retries=2, backoff=0.01)
    assert src.score(PROMPTS, ["flaky"], []) == [0.0]  # "Score: 3" after one HTTP 500
    assert src.stats()["retries"] == 1.0 and src.stats()["failures"] == 1.0
    assert len(judge.requests) == 2

    judge.always_fail = True
    with pytest.raises(SimtuneError, match=r"--judge_url: cannot reach judge at .*HTTP 500"):
        src.score(PROMPTS, ["great"], [])
    assert src.stats()["retries"] == 3.0  # 1 before + 2 more


def test_judge_unreachable_fails_fast():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    with pytest.raises(SimtuneError, match=r"^--judge_url: cannot reach judge at http://127"):
        check_judge(url, timeout=2)
    src = JudgeReward(url, "judge", timeout=2, max_retries=1, backoff=0.01)
    with pytest.raises(SimtuneError, match=r"^--judge_url: cannot reach judge"):
        src.score(PROMPTS, ["great"], [])
    assert src.stats()["failures"] == 2.0
    with pytest.raises(ConfigError, match="--judge_url: expected an http"):
        check_judge("localhost:8000", timeout=1)


def test_make_reward_source_picks_and_checks(reward_file, judge, tmp_path):
    def cfg(**kw):
        opts = dict(reward_fn=None, reward_model=None, judge_url=None, judge_model=None)
        return SimpleNamespace(
            **{**opts, **kw}, trust_remote_code=False, workspace_path=lambda: tmp_path
        )

    assert isinstance(make_reward_source(cfg(reward_fn=f"{reward_file}:length")), FunctionReward)
    src = make_reward_source(cfg(judge_url=judge.url, judge_model="j"))
    assert isinstance(src, JudgeReward) and src.model == "j"
    with pytest.raises(ConfigError, match="--reward_model: .* is not a sequence-classification"):
        make_reward_source(cfg(reward_model=str(tmp_path)))


# --- reward model ------------------------------------------------------------------------

GOOD, BAD = '{"action": "apply"}', '{"action": "wait"}'
RM_PROMPTS = ["What do you do next?", "Pick an action.", "Decide now.", "Your move?"]


def rm_decisions() -> list[Decision]:
    out = []
    for i, p in enumerate(RM_PROMPTS):
        out.append(Decision(decision_id=f"g{i}", prompt=p, output=GOOD, reward=1.0))
        out.append(Decision(decision_id=f"b{i}", prompt=p, output=BAD, reward=0.0))
    out.append(Decision(decision_id="unscored", prompt="Hi", output=GOOD))
    return out


def rm_config(tiny_model: Path, **kw):
    from simtune.config import build_config

    opts = dict(
        llm_path=str(tiny_model),
        dataset_path=["unused.jsonl"],
        max_steps=15,
        learning_rate=5e-3,
        per_device_train_batch_size=8,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        lora_dropout=0.0,
        seed=0,
    )
    return build_config(overrides={**opts, **kw})


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from simtune.training.model import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(str(tiny_model)))


@pytest.fixture(scope="module")
def reward_adapter(tiny_model, tokenizer, tmp_path_factory):
    """Train on the tiny model, save as training/run.py does; returns (dir, metrics, in-memory model)."""
    from simtune.training.model import resolve_model
    from simtune.training.reward_model import train_reward_model

    work = tmp_path_factory.mktemp("rm")
    metrics, model = train_reward_model(
        # fp32: the checks below compare scores to 1e-4, finer than a bf16 base rounds.
        rm_config(tiny_model, precision="fp32"),
        rm_decisions(),
        resolve_model(str(tiny_model)),
        tokenizer,
        work,
        [],
    )
    out = work / "adapter"
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out, metrics, model


def test_build_reward_examples(tiny_model, tokenizer):
    from simtune.training.reward_model import build_reward_examples

    cfg = rm_config(tiny_model)
    decisions = rm_decisions() + [
        Decision(decision_id="r1", prompt="Rate me", output=GOOD, rating=5.0),
        Decision(decision_id="r2", prompt="Rate me", output=BAD, rating=1.0),
    ]
    ids, labels = build_reward_examples(decisions, tokenizer, cfg)
    assert len(ids) == len(labels) == 10  # the unscored decision is dropped
    # rewards and ratings are normalised separately: 1/0 rewards and 5/1 ratings -> +-1
    assert labels == pytest.approx([1.0, -1.0] * 5)
    text = tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>user\nWhat do you do next?")
    assert GOOD in text and text.endswith("<|im_end|>\n")

    short, _ = build_reward_examples(decisions, tokenizer, rm_config(tiny_model, max_length=8))
    assert all(len(s) == 8 and s == full[-8:] for s, full in zip(short, ids, strict=True))

    with pytest.raises(DataError, match="has a reward or rating"):
        build_reward_examples(decisions[-3:-2], tokenizer, cfg)
    same = [Decision(decision_id=f"s{i}", prompt="p", output="o", reward=1.0) for i in range(3)]
    with pytest.raises(DataError, match="same score"):
        build_reward_examples(same, tokenizer, cfg)


def test_reward_training_refuses_a_causal_adapter(tiny_model, tokenizer, tmp_path):
    from simtune.training.reward_model import load_reward_base

    (tmp_path / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    spec = SimpleNamespace(base=str(tiny_model), base_is_local=True, adapter=str(tmp_path))
    with pytest.raises(ConfigError, match="--llm_path: .* CAUSAL_LM adapter"):
        load_reward_base(spec, tokenizer, rm_config(tiny_model))


def test_check_reward_model_rejects_what_is_not_one(tiny_model, tmp_path):
    for path in (tiny_model, tmp_path, tmp_path / "missing"):
        with pytest.raises(ConfigError) as err:
            check_reward_model(str(path))
        assert str(err.value).startswith(f"--reward_model: {path} is not a sequence-classification")
    causal = tmp_path / "causal-adapter"
    causal.mkdir()
    (causal / "adapter_config.json").write_text(
        json.dumps({"task_type": "CAUSAL_LM", "base_model_name_or_path": str(tiny_model)})
    )
    with pytest.raises(ConfigError, match="task_type 'CAUSAL_LM'"):
        check_reward_model(str(causal))


@pytest.mark.slow
def test_trained_reward_model_ranks_good_above_bad(reward_adapter, tiny_model):
    import torch

    from simtune.rewards import RewardModelScorer

    adapter, metrics, model = reward_adapter
    assert metrics["global_step"] == 15 and metrics["num_examples"] == 8
    assert math.isfinite(metrics["train_loss"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["base_model_name_or_path"] == str(tiny_model)
    check_reward_model(str(adapter))

    scorer = RewardModelScorer(str(adapter), batch_size=3)
    assert isinstance(scorer, RewardSource)
    prompts = [[{"role": "user", "content": p}] for p in RM_PROMPTS]
    good = scorer.score(prompts, [GOOD] * 4, [])
    bad = scorer.score(prompts, [BAD] * 4, [])
    assert all(g > b + 0.5 for g, b in zip(good, bad, strict=True)), (good, bad)
    assert scorer.stats()["samples"] == 8.0

    # The trained score head came back from disk (not a fresh random one).
    from simtune.rewards import reward_input_ids

    ids, _ = reward_input_ids(scorer.tokenizer, prompts[0], GOOD, 1024)
    with torch.no_grad():
        expected = model.eval()(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert good[0] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_pyfunc_reward_branch_predicts_floats(reward_adapter, tiny_model):
    import pandas as pd

    from simtune.rewards import RewardModelScorer
    from simtune.tracking.pyfunc import AdapterModel

    adapter, _, _ = reward_adapter
    context = SimpleNamespace(
        artifacts={"adapter": str(adapter)},
        model_config={
            "base_model": str(tiny_model),
            "base_model_is_local": True,
            "task": "reward",
        },
    )
    pyfunc = AdapterModel()
    pyfunc.load_context(context)
    rows = [{"prompt": p, "completion": c} for p in RM_PROMPTS[:2] for c in (GOOD, BAD)]
    from_df = pyfunc.predict(context, pd.DataFrame(rows))
    assert isinstance(from_df, list) and all(isinstance(v, float) for v in from_df)
    assert from_df[0] > from_df[1] and from_df[2] > from_df[3]
    assert pyfunc.predict(context, rows) == pytest.approx(from_df, abs=1e-5)
    columns = {"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}
    assert pyfunc.predict(context, columns) == pytest.approx(from_df, abs=1e-5)
    chat = {"prompt": [{"role": "user", "content": RM_PROMPTS[0]}], "completion": GOOD}
    assert pyfunc.predict(context, chat) == pytest.approx(from_df[:1], abs=1e-5)
    # Same numbers as the scorer PPO uses.
    scorer = RewardModelScorer(str(adapter))
    expected = scorer.score([r["prompt"] for r in rows], [r["completion"] for r in rows], [])
    assert from_df == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_full_sequence_classification_checkpoint_scores_the_same(reward_adapter, tmp_path):
    import copy

    from simtune.rewards import RewardModelScorer

    adapter, _, model = reward_adapter
    full = tmp_path / "merged"
    copy.deepcopy(model).merge_and_unload().save_pretrained(str(full), safe_serialization=True)
    (full / "adapter_config.json").unlink(missing_ok=True)
    for f in adapter.glob("*"):
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            (full / f.name).write_bytes(f.read_bytes())
    check_reward_model(str(full))
    prompts = [[{"role": "user", "content": p}] for p in RM_PROMPTS]
    a = RewardModelScorer(str(adapter)).score(prompts, [GOOD] * 4, [])
    b = RewardModelScorer(str(full)).score(prompts, [GOOD] * 4, [])
    assert b == pytest.approx(a, abs=1e-4)


@pytest.mark.slow
def test_online_ppo_scored_by_a_judge_endpoint(judge, tiny_model, tmp_path):
    import mlflow

    from simtune import run_tuning

    data = tmp_path / "decisions_j.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"Decide {i}", "output": "x"}) for i in range(4)) + "\n"
    )
    result = run_tuning(
        tuning_mode="ppo",
        rollout="online",
        llm_path=str(tiny_model),
        dataset_path=[str(data)],
        workspace=str(tmp_path / "ws"),
        judge_url=judge.url,
        judge_model="judge",
        max_steps=2,
        max_new_tokens=4,
        per_device_train_batch_size=4,
        ppo_epochs=1,
    )
    assert len(judge.requests) == 8  # 2 rollouts x 4 sampled answers, each judged once
    assert all(r["model"] == "judge" for r in judge.requests)
    client = mlflow.MlflowClient(result.tracking_uri)
    # unknown answers get "Score: 3" from this judge, i.e. a neutral 0.0
    assert [m.value for m in client.get_metric_history(result.run_id, "ppo/score_mean")] == [
        0.0,
        0.0,
    ]
    assert client.get_run(result.run_id).data.metrics["reward_source/calls"] >= 8
