"""Against a real `mlflow server` on 127.0.0.1: the CLI job, its run, metrics and registered model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SAMPLE, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_cli_train_against_mlflow_server(mlflow_server, tiny_model, workspace, tmp_path):
    import mlflow
    import yaml

    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "llm_path": str(tiny_model),
                "dataset-path": [str(SAMPLE)],
                "max_steps": 99,
                "learning_rate": 5e-3,
                "experiment_name": "from-yaml",
                "lora_r": 4,
            }
        )
    )
    # Seed flag names and kebab twins, and flags overriding the YAML file.
    proc = run_cli(
        "train",
        "--config",
        str(config),
        "--tuning_mode",
        "sft",
        "--tracking_uri",
        mlflow_server,
        "--experiment-name",
        "server-test",
        "--max-steps",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--devices",
        "0",
        "--workspace",
        str(workspace),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["tracking_uri"] == mlflow_server

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "server-test"
    assert run.data.params["lora_r"] == "4" and run.data.params["max_steps"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        1,
        2,
        3,
        4,
    ]
    assert "adapter" in {a.path for a in client.list_artifacts(run.info.run_id)}

    name = result["registered_model_name"]
    assert name == "server-test"  # one registered model per experiment
    versions = client.search_model_versions(f"name='{name}'")
    assert [v.version for v in versions] == [result["registered_model_version"]]
    assert versions[0].run_id == result["run_id"]

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{result['registered_model_version']}")
    assert len(model.predict(["hello"], params={"max_new_tokens": 4})) == 1
    # The local registry and model dir are written too.
    entries = json.loads((workspace / "models" / "registry.json").read_text())["models"]
    assert entries[0]["mlflow"]["tracking_uri"] == mlflow_server
    assert Path(entries[0]["path"], "adapter_model.safetensors").is_file()
