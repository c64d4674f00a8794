"""SFT on the tiny model: what trains, what stays frozen, what lands in MLflow and the registry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import SAMPLE, run_cli

pytestmark = pytest.mark.slow

FAST = dict(
    max_steps=12,
    learning_rate=5e-3,
    per_device_train_batch_size=8,
    warmup_ratio=0.0,
    lr_scheduler_type="constant",
    logging_steps=1,
    seed=0,
    lora_dropout=0.0,
)


def train(workspace: Path, model: Path | str, data: list[Path] | None = None, **kw):
    from simtune import run_tuning

    opts = {
        **FAST,
        "llm_path": str(model),
        "dataset_path": [str(p) for p in (data or [SAMPLE])],
        "workspace": str(workspace),
        **kw,
    }
    return run_tuning(**opts)


PROGRESS: list[int] = []
"""Steps `run_tuning(progress=...)` reported for the `trained` job."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    ws = tmp_path_factory.mktemp("ws-trained")
    return ws, train(ws, tiny_model, progress=PROGRESS.append)


def _examples(tiny_model: Path, **cfg_kw):
    from simtune.config import build_config
    from simtune.decisions import read_dataset
    from simtune.training.model import load_tokenizer, resolve_model
    from simtune.training.sft import build_examples

    cfg = build_config(
        overrides={"llm_path": str(tiny_model), "dataset_path": [str(SAMPLE)], **FAST, **cfg_kw}
    )
    spec = resolve_model(str(tiny_model))
    tok = load_tokenizer(spec)
    ds = read_dataset([str(SAMPLE)])
    return cfg, spec, tok, build_examples(ds.decisions, tok, cfg)


def test_lora_params_change_and_base_params_do_not(tiny_model, tmp_path):
    from simtune.training.model import load_model
    from simtune.training.sft import train_sft

    cfg, spec, tok, ex = _examples(tiny_model, max_steps=5)
    model = load_model(spec, trainable_adapter=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, trained = train_sft(cfg, ex, model, tok, tmp_path, [])
    after = {
        n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p.detach()
        for n, p in trained.named_parameters()
        if "lora_" not in n
    }
    lora = {n: p.detach() for n, p in trained.named_parameters() if "lora_" in n}

    assert lora, "no LoRA parameters were created"
    assert all(p.requires_grad for n, p in trained.named_parameters() if "lora_" in n)
    changed = [n for n, p in lora.items() if "lora_B" in n and p.abs().sum() > 0]
    assert len(changed) == sum("lora_B" in n for n in lora), "some LoRA B matrices stayed at zero"
    assert set(after) == set(before)
    for name, p in before.items():
        assert after[name].equal(p), f"frozen base parameter {name} changed"


def test_completion_only_labels_and_left_truncation(tiny_model):
    cfg, _, tok, ex = _examples(tiny_model, max_length=24)
    assert ex.truncated_prompts > 0
    for ids, mask in zip(ex.input_ids, ex.completion_mask, strict=True):
        assert len(ids) <= 24 and len(ids) == len(mask)
        n_answer = sum(mask)
        assert (
            n_answer > 0 and mask[-n_answer:] == [1] * n_answer
        )  # the answer survives, at the end
        assert tok.decode(ids[-n_answer:]).endswith("<|im_end|>\n")


def test_batch_size_times_accumulation_invariant(tiny_model, tmp_path):
    """TRL's invariant: 8 x 1 and 1 x 8 take the same optimizer step. In fp32: bf16
    rounds the padded (8 x 1) and unpadded (1 x 8) batches differently, and Adam's first
    step is lr x sign(gradient), so a near-zero gradient flips a weight by 2 x lr.
    1e-5 (0.2% of that first step): the LM head scores the gathered answer rows of the
    batch, and a matmul over 8 x 1 rows sums in another order than over 1 x 8 (measured:
    one weight of 1024 off by 1.1e-6)."""
    import torch

    from simtune.training.model import load_model
    from simtune.training.sft import train_sft

    results = []
    for bs, acc in ((8, 1), (1, 8)):
        cfg, spec, tok, ex = _examples(
            tiny_model,
            max_steps=1,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=acc,
            max_samples=8,
            precision="fp32",
        )
        ex.input_ids, ex.completion_mask = ex.input_ids[:8], ex.completion_mask[:8]
        torch.manual_seed(0)
        metrics, model = train_sft(
            cfg, ex, load_model(spec, trainable_adapter=True), tok, tmp_path / f"{bs}x{acc}", []
        )
        results.append(
            (
                metrics["train_loss"],
                {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
            )
        )
    (loss_a, wa), (loss_b, wb) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


def test_run_tuning_trains_tracks_and_registers(trained):
    import mlflow

    ws, result = trained
    assert "MLFLOW_TRACKING_URI" not in os.environ, "run_tuning leaked its tracking URI"
    adapter = Path(result.adapter_path)
    assert adapter.parent == ws / "models" and adapter.name == result.model_id
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "simtune.json",
    ):
        assert (adapter / name).is_file(), name
    meta = json.loads((adapter / "simtune.json").read_text())
    assert meta["config"]["learning_rate"] == FAST["learning_rate"]
    assert meta["base_model"]["fingerprint"].startswith("sha256:")
    assert meta["dataset"]["files"][0]["sha256"] and meta["dataset"]["num_used"] == 48
    assert meta["mlflow"]["run_id"] == result.run_id
    assert meta["mlflow"]["registered_model_version"] == result.registered_model_version
    assert not list((ws / "models").glob(".staging-*")), "staging directory left behind"

    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == str(FAST["learning_rate"])
    assert run.data.params["lora_r"] == "16"
    assert run.data.metrics["dataset/num_used"] == 48
    history = client.get_metric_history(result.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 13))
    # The progress callback saw every logged step, in order.
    assert sorted(set(PROGRESS)) == list(range(1, 13)) and PROGRESS == sorted(PROGRESS)
    losses = [m.value for m in history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, f"loss did not go down: {losses}"
    for name in ("train/learning_rate", "train/grad_norm", "train/mean_token_accuracy"):
        assert len(client.get_metric_history(result.run_id, name)) == 12, name
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"adapter", "dataset_stats.json"} <= artifacts
    adapter_artifacts = {a.path for a in client.list_artifacts(result.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/simtune.json"} <= adapter_artifacts

    entry = json.loads((ws / "models" / "registry.json").read_text())["models"]
    assert [e["model_id"] for e in entry] == [result.model_id]
    assert Path(entry[0]["path"]).is_dir()
    assert entry[0]["mlflow"]["run_id"] == result.run_id


def test_registered_model_loads_generates_and_holds_no_base_weights(trained, tiny_model):
    import mlflow

    _, result = trained
    mlflow.set_tracking_uri(result.tracking_uri)
    version = mlflow.MlflowClient().get_model_version(
        result.registered_model_name, result.registered_model_version
    )
    assert version.tags["simtune.model_id"] == result.model_id
    local = Path(mlflow.artifacts.download_artifacts(version.source))
    files = [f for f in local.rglob("*") if f.is_file()]
    assert not any(f.name == "model.safetensors" for f in files), "base weights were copied"
    base_bytes = (tiny_model / "model.safetensors").stat().st_size
    adapter_bytes = (Path(result.adapter_path) / "adapter_model.safetensors").stat().st_size
    assert sum(f.stat().st_size for f in files) < adapter_bytes + base_bytes / 2

    model = mlflow.pyfunc.load_model(result.model_uri)
    out = model.predict(
        ["How many jobs do you apply to?", "Whom do you interview?"], params={"max_new_tokens": 8}
    )
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(s, str) for s in out)
    assert any(s for s in out), "generated nothing"


def test_continue_training_from_adapter(trained, tmp_path):
    from safetensors.torch import load_file

    ws, first = trained
    second = train(ws, first.adapter_path, max_steps=3)
    meta = json.loads((Path(second.adapter_path) / "simtune.json").read_text())
    assert meta["continued_from_adapter"] == first.adapter_path
    assert (
        meta["base_model"]["path"]
        == json.loads((Path(first.adapter_path) / "simtune.json").read_text())["base_model"]["path"]
    )
    w1 = load_file(str(Path(first.adapter_path) / "adapter_model.safetensors"))
    w2 = load_file(str(Path(second.adapter_path) / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    assert any(not w1[k].equal(w2[k]) for k in w1), "continued training changed nothing"
    # It started from the first adapter, not from scratch: B matrices stay close to it.
    diffs = [(w2[k] - w1[k]).norm() / w1[k].norm() for k in w1 if "lora_B" in k]
    assert max(diffs) < 1.0
    # a model id from the registry works as --llm_path too
    third = train(ws, first.model_id, max_steps=1)
    assert (
        json.loads((Path(third.adapter_path) / "simtune.json").read_text())[
            "continued_from_adapter"
        ]
        == first.adapter_path
    )


def test_seed_fixture_files_train_as_they_are(onesim, tiny_model, workspace):
    result = train(
        workspace,
        tiny_model,
        data=[onesim / "processed_data.json", onesim / "original_data.json"],
        max_steps=2,
        max_length=512,
    )
    assert result.dataset["num_used"] == 11
    assert result.dataset["with_feedback_target"] == 2  # refined_output used as the target
    assert result.dataset["truncated_prompts"] > 0  # long prompts cut from the left, answer kept
    assert Path(result.adapter_path, "adapter_model.safetensors").is_file()


def test_models_cli_lists_shows_and_deletes(tiny_model, workspace):
    result = train(workspace, tiny_model, max_steps=1)
    listed = run_cli("models", "--workspace", str(workspace), "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [e["model_id"] for e in json.loads(listed.stdout)] == [result.model_id]
    shown = run_cli("models", "--workspace", str(workspace), "show", result.model_id)
    assert json.loads(shown.stdout)["simtune.json"]["mlflow"]["run_id"] == result.run_id
    bad = run_cli("models", "--workspace", str(workspace), "show", "../etc")
    assert bad.returncode == 2 and "invalid model id" in bad.stderr
    deleted = run_cli("models", "--workspace", str(workspace), "delete", result.model_id)
    assert deleted.returncode == 0, deleted.stderr
    assert not Path(result.adapter_path).exists()
    assert json.loads((workspace / "models" / "registry.json").read_text())["models"] == []
