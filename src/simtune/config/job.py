"""What the job trains, on what, and where it is tracked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from simtune.config import checks
from simtune.config.fields import arg
from simtune.config.names import mlflow_name_problem, resolve_workspace

TUNING_MODES = ("sft", "ppo", "reward", "grpo", "dpo", "kto")


@dataclass
class JobArgs:
    """What the job trains, on what, and where it is tracked."""

    cli_group: ClassVar[str] = "job options"
    doc_section: ClassVar[str] = "job"

    tuning_mode: str = arg("sft", metavar="{" + ",".join(TUNING_MODES) + "}")
    """Training method: 'sft' imitates the logged (or refined) decisions; 'ppo' prefers
    decisions that earned reward; 'reward' trains a reward model on rated decisions;
    'grpo' samples --num_generations answers per prompt and prefers those a reward source
    scores above their group's mean; 'dpo' prefers the best over the worst scored answer
    of each prompt; 'kto' prefers answers scored above --desirable_threshold."""

    llm_path: str | None = None
    """Base model: a local Hugging Face model directory, a GGUF file (llama.cpp/Ollama;
    dequantized once into <workspace>/cache/models/<sha256>/, which adapters then name as
    their base), a hub id (needs network), a LoRA adapter directory (training continues
    from it), or a simtune model id from models/."""

    dataset_path: list[str] = arg([], metavar="PATH")
    """Decision files (.jsonl or JSON list) or directories (all decisions_*.json[l] in
    them, recursively); several may be given."""

    env: str | None = None
    """Simulation environment name: with no --dataset_path, train on its datasets folder
    <workspace>/envs/<env>/datasets (YuLan-OneSim's and simtune's layout)."""

    workspace: str | None = None
    """Workspace root holding models/, envs/ and the embedded MLflow store (default:
    $SIMTUNE_HOME, else the current directory)."""

    output_dir: str | None = None
    """Where the finished adapter goes (default: <workspace>/models/<model_id>)."""

    experiment_name: str = "llm_tuning"
    """MLflow experiment the run is logged to."""

    tracking_uri: str | None = None
    """MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the embedded
    sqlite:///<workspace>/mlflow.db)."""

    run_name: str | None = None
    """MLflow run name (default: the model id)."""

    registered_model_name: str | None = None
    """Name in the MLflow Model Registry (default: the experiment name: one registered
    model per experiment, each job a new version tagged with its simtune.tuning_mode)."""

    devices: str | None = None
    """CUDA devices to use, e.g. '0' or '0,1' (sets CUDA_VISIBLE_DEVICES); CPU is used
    when no GPU is present."""

    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code (off: only trust what you
    read)."""

    def problems(self) -> list[str]:
        """Every problem of these options (the dataset check runs after --env is
        resolved: `TuningConfig.validate`)."""
        out = [
            checks.one_of("--tuning_mode", self.tuning_mode, TUNING_MODES, "mode"),
            None
            if self.llm_path
            else "--llm_path is required (a model directory, adapter or model id)",
            None
            if self.dataset_path
            else "--dataset_path is required (one or more files or directories), or --env "
            "NAME for <workspace>/envs/NAME/datasets",
        ]
        if self.devices is not None:
            parts = [p.strip() for p in self.devices.split(",")]
            if not all(p.isdigit() for p in parts):
                out.append(
                    f"--devices: expected GPU indices like '0' or '0,1', got {self.devices!r}"
                )
        for name in ("experiment_name", "registered_model_name", "run_name"):
            out.append(mlflow_name_problem(getattr(self, name), f"--{name}"))
        if (
            self.registered_model_name is None
            and mlflow_name_problem(self.experiment_name, "--experiment_name") is None
            and any(c in self.experiment_name for c in "/:")
        ):  # a usable experiment name that cannot also be the registered model's
            out.append(
                f"--experiment_name {self.experiment_name!r} is also the default "
                "--registered_model_name, which may not contain '/' or ':'; give "
                "--registered_model_name"
            )
        return [p for p in out if p]

    def workspace_path(self) -> Path:
        return resolve_workspace(self.workspace)
