"""`TuningConfig`: one `simtune train` job, composed of the per-concern args classes.

It stays ONE flat dataclass (`cfg.lora_r`, `simtune.json`, MLflow params and YAML keys
are the fields' names); the concerns are its bases, whose order is the order of the
fields, of the `--help` groups and of docs/options.md. Each base checks its own fields
(`problems()`); `validate()` adds the checks that span concerns and reports every
problem at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simtune.config.checks import raise_problems
from simtune.config.data import DataArgs
from simtune.config.fields import coerce
from simtune.config.job import JobArgs
from simtune.config.launch import LaunchArgs
from simtune.config.lora import LoraArgs
from simtune.config.optim import OptimArgs
from simtune.config.ppo import PPOArgs
from simtune.config.preference import PreferenceArgs
from simtune.errors import ConfigError


@dataclass
class TuningConfig(PreferenceArgs, PPOArgs, LoraArgs, OptimArgs, DataArgs, LaunchArgs, JobArgs):
    """Everything one `simtune train` job needs; every field is a CLI flag and a YAML key."""

    def validate(self) -> TuningConfig:
        """Check values without touching the disk's models or importing torch; raise one
        ConfigError naming every problem."""
        problems: list[str] = []
        if not self.dataset_path and self.env:
            from simtune.util import check_name

            try:
                name = check_name(self.env, "--env")
            except ConfigError as exc:
                problems.append(str(exc))
            else:
                self.dataset_path = [str(self.workspace_path() / "envs" / name / "datasets")]
        for part in (JobArgs, LaunchArgs, DataArgs, OptimArgs, LoraArgs, PPOArgs, PreferenceArgs):
            problems += part.problems(self)
        problems += self.combined_problems()
        raise_problems(problems)
        return self

    def combined_problems(self) -> list[str]:
        """The checks of options that only make sense together."""
        out: list[str] = []
        online = (self.tuning_mode == "ppo" and self.rollout == "online") or (
            self.tuning_mode == "grpo"
        )
        if online:
            sources = self.reward_sources()
            needs = "--rollout online" if self.tuning_mode == "ppo" else "--tuning_mode grpo"
            if len(sources) != 1:
                out.append(
                    f"{needs} needs exactly one reward source: --reward_fn, "
                    "--reward_model or --judge_url (got "
                    f"{', '.join('--' + s for s in sources) or 'none'})"
                )
            if self.judge_url and not self.judge_model:
                out.append("--judge_model is required with --judge_url")
        out += self.preference_problems()
        if self.device_map == "auto":
            if self.tuning_mode != "sft":
                out.append(
                    "--device_map auto: SFT only; for PPO or a reward model larger than one "
                    "GPU use FSDP through --accelerate_config"
                )
            if self.distributed() or self.deepspeed:
                out.append(
                    "--device_map auto shards one process's model over the GPUs; it cannot "
                    "be combined with --nproc/--devices (several)/--nnodes/--accelerate_config/--deepspeed"
                )
        devices = self.devices.split(",") if self.devices else []
        if self.nproc is not None and len(devices) > 1 and self.nproc != len(devices):
            out.append(
                f"--nproc {self.nproc} does not match --devices {self.devices!r} "
                f"({len(devices)} devices: one process each)"
            )
        if self.deepspeed and self.tuning_mode == "ppo":
            out.append(
                "--deepspeed applies to SFT and reward-model training; for PPO put the "
                "DeepSpeed settings in an --accelerate_config file"
            )
        return out

    def preference_problems(self) -> list[str]:
        """GRPO's batch shape and KTO's batch size, which TRL would only refuse after
        the model is loaded."""
        out: list[str] = []
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if (
            self.tuning_mode == "grpo"
            and isinstance(batch, int)
            and isinstance(self.num_generations, int)
            and self.num_generations >= 2
            and (batch * self.processes()) % self.num_generations
        ):
            out.append(
                f"--num_generations {self.num_generations}: the batch "
                f"(--per_device_train_batch_size {self.per_device_train_batch_size} x "
                f"--gradient_accumulation_steps {self.gradient_accumulation_steps} x "
                f"{self.processes()} process(es) = {batch * self.processes()}) must be a "
                "multiple of it: each prompt's answers are compared within one batch"
            )
        if self.tuning_mode == "kto" and self.per_device_train_batch_size == 1:
            out.append(
                "--per_device_train_batch_size: KTO needs at least 2 (its KL estimate pairs "
                "each answer with another prompt of the same micro-batch)"
            )
        return out

    def processes(self) -> int:
        """Processes on this node: --nproc, else one per --devices entry, else 1."""
        if self.nproc is not None:
            return self.nproc
        return len(self.devices.split(",")) if self.devices else 1

    def distributed(self) -> bool:
        """Whether this job runs as several processes (launched by simtune)."""
        return self.processes() > 1 or self.nnodes > 1 or self.accelerate_config is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_yaml(path: str) -> dict[str, Any]:
    import yaml  # small; only needed with --config

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return data


def build_config(
    yaml_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    base: TuningConfig | None = None,
) -> TuningConfig:
    """Defaults < YAML file < overrides (CLI flags or run_tuning keywords), then validate."""
    cfg = dataclasses.replace(base) if base is not None else TuningConfig()
    known = {f.name for f in dataclasses.fields(TuningConfig)}
    layers: list[tuple[str, dict[str, Any]]] = []
    if yaml_path:
        from simtune.config.foreign import translate

        # LLaMA-Factory's and TRL's keys are read as simtune's (config/foreign.py).
        layers.append((yaml_path, translate(load_yaml(yaml_path), yaml_path, known)))
    if overrides:
        layers.append(("", overrides))
    for source, layer in layers:
        for raw_key, value in layer.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                where = f"{source}: " if source else ""
                hint = _closest(key, known)
                raise ConfigError(f"{where}unknown option {raw_key!r}{hint}")
            setattr(cfg, key, coerce(key, value, source=source, cls=TuningConfig))
    return cfg.validate()


def _closest(key: str, known: set[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean --{match[0]}?)" if match else ""
