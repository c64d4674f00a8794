"""A YuLan-OneSim user's folders, calls and files work unchanged (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from onesim_files import db_export, simulate, ui_save

from simtune.decisions.reader import read_dataset, scan_dataset, select


def _rated_env(tmp_path: Path) -> tuple[Path, list[dict]]:
    env = tmp_path / "envs" / "job_market"
    made = simulate(env, steps=3, agents=2)  # 3 files: 2 + 4 + 6 copies of 6 decisions
    ratings = {
        d["decision_id"]: (
            1 + i,
            f"reason {i}",
            None if i % 2 else '```json\n{"target_id": "9"}\n```',
        )
        for i, d in enumerate(made[:5])
    }
    ui_save(env / "datasets", made, ratings)
    return env, made


def test_repeated_exports_merge_later_fields(tmp_path: Path) -> None:
    env, made = _rated_env(tmp_path)
    ds = read_dataset([str(env / "datasets")])
    assert len(ds.decisions) == 6
    assert ds.duplicate_ids == 2 + 4 + 6  # every copy after the first, merged
    by_id = {d.decision_id: d for d in ds.decisions}
    for i, raw in enumerate(made):
        d = by_id[raw["decision_id"]]
        assert d.env_name == "job_market"
        if i < 5:
            assert d.rating == 1 + i and d.metadata["rating_source"] == "llm"
            assert d.reason == f"reason {i}"
        else:
            assert d.rating is None
    # a streaming pass (what `data stats` uses) gives the same merged records
    streamed = []
    scan = scan_dataset([str(env / "datasets")], streamed.append, full=True)
    assert scan.decisions == 6 and scan.duplicate_ids == 12
    assert {d.decision_id: d.rating for d in streamed} == {k: v.rating for k, v in by_id.items()}


def test_human_rating_not_replaced_by_later_llm_rating(tmp_path: Path) -> None:
    env = tmp_path / "envs" / "e"
    made = simulate(env, steps=1, agents=1)
    did = made[0]["decision_id"]
    db = db_export(env / "datasets" / "decisions_20250314_000000.json", made, {did: 5})
    ui_save(env / "datasets", made, {did: (1, "judge says bad", None)})
    ds = read_dataset([str(db.parent)])
    (d,) = ds.decisions
    assert (d.rating, d.metadata["rating_source"]) == (5.0, "human")
    assert d.reason == "judge says bad"  # other later fields still win


def test_data_stats_and_min_rating_on_onesim_folder(tmp_path: Path) -> None:
    env, _ = _rated_env(tmp_path)
    r = run_cli("data", "stats", str(env / "datasets"))
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "job_market" in out
    assert "ratings by human 0, by LLM 5" in out
    assert "12 repeated id(s) merged" in out
    r = run_cli(
        "data",
        "export",
        str(env / "datasets"),
        "--min-rating",
        "3",
        "-o",
        str(tmp_path / "o.jsonl"),
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert sorted(x["rating"] for x in rows) == [3, 4, 5]


def test_fenced_answers_are_kept_verbatim_unless_unfence_outputs(tmp_path: Path) -> None:
    env = tmp_path / "envs" / "e"
    made = simulate(env, steps=1, agents=1)
    fenced = made[0]["output"]
    assert fenced.startswith("```json\n")
    (d,) = read_dataset([str(env / "datasets")]).decisions
    assert d.output == fenced  # read verbatim
    assert select(read_dataset([str(env)]).decisions).decisions[0].target == fenced
    r = run_cli("train", "--help")
    assert "--unfence_outputs" in r.stdout
    sel = select(read_dataset([str(env)]).decisions, unfence_outputs=True)
    assert sel.decisions[0].target == '{\n    "target_id": "1"\n}'


@pytest.mark.slow  # trains the tiny model (~30-40 s on 2 shared cores)
def test_onesim_run_tuning_call_positional_with_mlruns(
    tmp_path: Path, tiny_model: Path, monkeypatch
) -> None:
    """OneSim's `run_tuning(tuning_mode, llm_path, dataset_path=None, experiment_name,
    tracking_uri="./mlruns", devices)` positionally, on its env's datasets folder."""
    import mlflow

    from simtune import run_tuning

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    _rated_env(tmp_path)  # tmp_path/envs/job_market/datasets
    result = run_tuning(
        "sft",
        str(tiny_model),
        None,
        "llm_tuning",
        "./mlruns",
        "0",
        env="job_market",
        workspace=str(tmp_path),
        max_steps=1,
        min_rating=3,
    )
    assert (tmp_path / "mlruns").is_dir()
    client = mlflow.MlflowClient(tracking_uri="./mlruns")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "llm_tuning"
    # 3 of the 6 merged decisions carry a judge's rating >= 3
    assert result.dataset["num_used"] == 3
    # the registry entry carries OneSim's ModelMetadata fields next to simtune's
    reg = json.loads((tmp_path / "models" / "registry.json").read_text())
    (entry,) = reg["models"]
    assert entry["model_id"] == entry["model_name"] == result.model_id
    assert entry["model_type"] == "fine_tuned" and entry["path"] == result.adapter_path
    assert entry["fine_tuning_params"]["tuning_mode"] == "sft" and entry["tags"] == [
        "simtune",
        "sft",
    ]


def test_registry_keeps_and_lists_entries_onesim_wrote(tmp_path: Path) -> None:
    from simtune.tracking.registry import Registry

    models = tmp_path / "models"
    models.mkdir()
    base = models / "Qwen2.5-14B-Instruct"
    # OneSim's ModelMetadata (src/backend/models/model_library.py), in its older
    # one-list-per-type layout, which its own loader still reads.
    theirs = {
        "model_id": "qwen-14b",
        "model_name": "Qwen2.5-14B-Instruct",
        "model_type": "base",
        "path": str(base),
        "created_at": "2025-03-14T17:16:13",
        "description": "downloaded in OneSim",
        "size": "14B",
        "tags": [],
    }
    (models / "registry.json").write_text(json.dumps({"base_models": [theirs]}, indent=4))
    reg = Registry(tmp_path)
    assert reg.get("qwen-14b")["size"] == "14B"
    reg.add({"model_id": "sft-x-1", "tuning_mode": "sft", "base_model": str(base), "path": "p"})
    data = json.loads((models / "registry.json").read_text())
    assert [m["model_id"] for m in data["models"]] == ["qwen-14b", "sft-x-1"]  # theirs kept
    assert data["models"][0] == theirs
    ours = data["models"][1]
    assert ours["model_type"] == "fine_tuned" and ours["base_model_id"] == "qwen-14b"
    assert ours["model_name"] == "sft-x-1" and ours["tuning_mode"] == "sft"

    # A bare list, or an id -> entry mapping, from other writers is read too.
    (models / "registry.json").write_text(json.dumps([theirs]))
    assert Registry(tmp_path).get("qwen-14b")["model_name"] == "Qwen2.5-14B-Instruct"


def test_file_store_refused_clearly_when_user_disallows_it(
    tmp_path: Path, tiny_model: Path, monkeypatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    env, _ = _rated_env(tmp_path)
    r = run_cli(
        "train",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(env),
        "--tracking_uri",
        "./mlruns",
        "--workspace",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert "MLFLOW_ALLOW_FILE_STORE=false" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "models").exists()


@pytest.mark.slow  # ~60 s on 2 shared cores: two answers up to the 2048-token window
def test_serve_answers_onesim_model_names_without_max_tokens(
    tiny_model: Path, tmp_path: Path
) -> None:
    """config/model_config.json names the model ("Qwen2.5-14B-Instruct" or vLLM's LoRA
    name "lora") and sends no max_tokens."""
    import os
    import signal
    import subprocess
    import sys

    import openai
    from conftest import free_port, wait_http
    from transformers import AutoConfig

    port = free_port()
    exe = Path(sys.executable).with_name("simtune")
    proc = subprocess.Popen(
        [str(exe), "serve", "--model", str(tiny_model), "--workspace", str(tmp_path)]
        + ["--port", str(port), "--served-model-name", "Qwen2.5-14B-Instruct", "lora"]
        + ["--device", "cpu", "--precision", "fp32"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["base", "Qwen2.5-14B-Instruct", "lora"]
        msgs = [{"role": "user", "content": "Decide."}]
        context = AutoConfig.from_pretrained(tiny_model).max_position_embeddings
        for name in ("Qwen2.5-14B-Instruct", "lora"):
            r = c.chat.completions.create(model=name, messages=msgs, temperature=0)
            assert r.model == name
            used = r.usage.prompt_tokens + r.usage.completion_tokens
            # no cap but the context: more than the old 512 default would allow on a
            # model whose window is larger, and never past the window
            assert r.choices[0].finish_reason == "stop" or used == context
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="other", messages=msgs)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]


def _onesim_reply(body: dict) -> str:
    """A model answering OneSim's three kinds of call: decisions as a ```json block
    (generate_reaction), plans and memory summaries as plain text."""
    system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
    if "plan" in system:
        return "1. look for jobs 2. apply"
    if "memory" in system:
        return "Summary: applied to two jobs."
    return '```json\n{"target_id": "3"}\n```'


ONESIM_CALLS = [
    ("You are a job seeker. Respond with a ```json block.", "Decide what to do."),
    ("You make a plan for the agent.", "Plan your day."),
    ("You summarise the agent's memory.", "Summarise."),
]


def test_proxy_rules_label_and_skip_onesim_non_decision_calls(workspace: Path) -> None:
    import openai

    from simtune.collect.proxy import RecordingProxy
    from simtune.collect.rules import CallRules
    from simtune.testing.stub_llm import StubLLM

    rules = CallRules.parse(
        skip=["system=summarise the agent's memory"],
        label=["plan=system=make a plan", "decision=output=^```json"],
    )
    with (
        StubLLM(reply=_onesim_reply) as llm,
        RecordingProxy(llm.url, "job_market", port=0, workspace=workspace, rules=rules) as px,
    ):
        client = openai.OpenAI(base_url=px.url, api_key="x", max_retries=0)
        for system, user in ONESIM_CALLS:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            r = client.chat.completions.create(model="lora", messages=msgs)
            assert r.choices[0].message.content  # every call is answered, recorded or not
        path = px.path
        assert px.skipped == 1
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["metadata"]["call"] for r in recs] == ["decision", "plan"]
    # only decisions: --require-output
    only = CallRules.parse(require_output="```json")
    assert [
        only.classify(None, None, _onesim_reply({"messages": [{"role": "system", "content": s}]}))[
            0
        ]
        for s, _ in ONESIM_CALLS
    ] == [True, False, False]


def test_recorder_rules_skip_calls_of_a_wrapped_client(workspace: Path) -> None:
    import openai

    from simtune.collect.recorder import Recorder
    from simtune.collect.rules import CallRules
    from simtune.testing.stub_llm import StubLLM

    rec = Recorder(
        "job_market", workspace=workspace, rules=CallRules.parse(require_output="```json")
    )
    with StubLLM(reply=_onesim_reply) as llm:
        client = rec.wrap(openai.OpenAI(base_url=llm.url, api_key="x", max_retries=0))
        for system, user in ONESIM_CALLS:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            client.chat.completions.create(model="lora", messages=msgs)
    recs = [json.loads(x) for x in rec.path.read_text().splitlines()]
    assert [r["output"] for r in recs] == ['```json\n{"target_id": "3"}\n```']


def test_bad_rule_is_one_line_exit_2(tmp_path: Path) -> None:
    r = run_cli(
        "collect",
        "proxy",
        "--upstream",
        "http://127.0.0.1:9",
        "--env",
        "e",
        "--skip-calls",
        "system=(",
        "--workspace",
        str(tmp_path),
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("simtune: error: --skip-calls 'system=(':")


@pytest.mark.slow  # trains the tiny model (~30-40 s on 2 shared cores)
def test_device_map_auto_sft_and_its_refusals(tmp_path: Path, tiny_model: Path) -> None:
    from simtune import run_tuning
    from simtune.errors import ConfigError

    env, _ = _rated_env(tmp_path)
    common = {"llm_path": str(tiny_model), "dataset_path": [str(env)], "workspace": str(tmp_path)}
    with pytest.raises(ConfigError, match="--device_map auto: SFT only"):
        run_tuning(tuning_mode="ppo", device_map="auto", **common)
    with pytest.raises(ConfigError, match="cannot be combined"):
        run_tuning(device_map="auto", nproc=2, **common)
    result = run_tuning(device_map="auto", max_steps=1, **common)  # CPU here: one shard
    assert Path(result.adapter_path, "adapter_config.json").is_file()


@pytest.mark.slow  # trains the tiny model (~30-40 s on 2 shared cores)
def test_offline_ppo_finds_the_ratings_of_a_onesim_folder(tmp_path: Path, tiny_model: Path) -> None:
    from simtune import run_tuning

    _rated_env(tmp_path)
    result = run_tuning(
        "ppo",
        str(tiny_model),
        env="job_market",
        workspace=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
    )
    assert result.dataset["with_rating"] == 5  # the UI save's judge ratings survived the merge
