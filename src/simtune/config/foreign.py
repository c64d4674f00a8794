"""Neighbours' YAML: the keys of a LLaMA-Factory or `trl sft --config` file, as simtune's.

A config pasted from LLaMA-Factory (`model_name_or_path`, `dataset`, `stage`,
`finetuning_type`, `lora_rank`, `cutoff_len`, ...) or from TRL's script configs
(`model_name_or_path`, `dataset_name`, `use_peft`, `dtype`, ...) is read as if it had been
written for simtune: every key that has a simtune meaning becomes that option, and one
log line says what it became. A key with no simtune meaning that changes nothing here
(`do_train`, `report_to`, `template`, ...) is dropped with a log line; a key that would
change what is trained in a way simtune cannot honour (`finetuning_type: full`,
`stage: pt`, `use_peft: false`) is refused with a hint, like any unknown option.

Keys that simtune shares with Hugging Face's TrainingArguments (`learning_rate`,
`num_train_epochs`, `per_device_train_batch_size`, `lora_alpha`, `max_length`, ...) need
no translation: they are simtune's names already.

Deliberate simplifications: LLaMA-Factory's `dataset` names entries of its
`dataset_info.json`; here each name is read as a path (joined to `dataset_dir` when that
is given), since simtune reads decision files, not registered datasets. Evaluation keys
(`val_size`, `eval_strategy`, ...) are refused: simtune evaluates with `simtune eval`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simtune.errors import ConfigError

log = logging.getLogger(__name__)


def _split(value: Any) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def _stage(value: Any) -> str:
    modes = {"sft": "sft", "ppo": "ppo", "rm": "reward", "dpo": "dpo", "kto": "kto"}
    mode = modes.get(str(value).strip().lower())
    if mode is None:
        raise ValueError(
            f"stage {value!r} has no simtune mode (sft, ppo, rm -> reward, dpo, kto; "
            "simtune does not pre-train)"
        )
    return mode


def _lora_only(what: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if str(value).strip().lower() not in what.split("|"):
            raise ValueError(f"{value!r}: simtune trains LoRA adapters only")

    return check


def _target(value: Any) -> list[str]:
    modules = _split(value)
    return ["all-linear"] if modules == ["all"] else modules


def _dtype(value: Any) -> str:
    precision = {
        "bfloat16": "bf16",
        "bf16": "bf16",
        "float16": "fp16",
        "fp16": "fp16",
        "half": "fp16",
        "float32": "fp32",
        "fp32": "fp32",
        "float": "fp32",
        "auto": "auto",
    }.get(str(value).strip().lower())
    if precision is None:
        raise ValueError(f"{value!r} is not a dtype simtune trains in (bfloat16, float16, float32)")
    return precision


def _completion_only(value: Any) -> None:
    if value is False or str(value).strip().lower() in ("false", "0", "no"):
        raise ValueError("simtune always trains on the answer only (completion-only loss)")


# foreign key -> (simtune option or None, value translation). A translation returning
# None (a check) means the key changes nothing in simtune once accepted.
ALIASES: dict[str, tuple[str | None, Callable[[Any], Any] | None]] = {
    # both LLaMA-Factory and TRL
    "model_name_or_path": ("llm_path", None),
    # LLaMA-Factory
    "dataset": ("dataset_path", _split),
    "stage": ("tuning_mode", _stage),
    "finetuning_type": (None, _lora_only("lora")),
    "lora_rank": ("lora_r", None),
    "lora_target": ("lora_target_modules", _target),
    "cutoff_len": ("max_length", None),
    "pref_beta": ("beta", None),
    # TRL script configs (ModelConfig / ScriptArguments / SFTConfig)
    "dataset_name": ("dataset_path", _split),
    "use_peft": (None, _lora_only("true|1|yes")),
    "max_seq_length": ("max_length", None),
    "dtype": ("precision", _dtype),
    "torch_dtype": ("precision", _dtype),
    "completion_only_loss": (None, _completion_only),
    "assistant_only_loss": (None, _completion_only),
}

# Keys that change nothing in simtune: dropped, with a log line saying why.
IGNORED: dict[str, str] = {
    "do_train": "simtune train always trains",
    "overwrite_output_dir": "simtune never overwrites: a new model gets a new directory",
    "overwrite_cache": "simtune's example cache is keyed by content",
    "plot_loss": "the loss curve is in MLflow",
    "report_to": "simtune always tracks in MLflow",
    "template": "simtune uses the tokenizer's own chat template",
    "preprocessing_num_workers": "simtune tokenizes in one pass",
    "dataloader_num_workers": "simtune's batches are built in memory",
    "ddp_timeout": "set by the launcher",
    "dataset_dir": "joined to each dataset path",
}

# Keys simtune cannot honour, with what to do instead (the refusal's hint).
REFUSED: dict[str, str] = {
    "val_size": "evaluate with `simtune eval`, or split first with `simtune data split`",
    "eval_strategy": "evaluate with `simtune eval`",
    "eval_steps": "evaluate with `simtune eval`",
    "per_device_eval_batch_size": "evaluate with `simtune eval`",
    "quantization_bit": "simtune trains LoRA on the unquantized base (GGUF is dequantized)",
    "load_in_4bit": "simtune trains LoRA on the unquantized base (GGUF is dequantized)",
    "packing": "see --padding_free",
    "dataset_text_field": "simtune trains on chat decisions (prompt/messages + output)",
    "flash_attn": "the attention kernel is chosen by simtune",
    "attn_implementation": "the attention kernel is chosen by simtune",
}


def translate(data: dict[str, Any], source: str, known: set[str]) -> dict[str, Any]:
    """`data` (one YAML file's mapping) with foreign keys turned into simtune options.
    Raises ConfigError naming the file and key for a value simtune cannot honour, or
    when a foreign key and the simtune option it means are both given."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    dataset_dir = data.get("dataset_dir", data.get("dataset-dir"))
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")  # kebab-case keys, as build_config reads them
        if key in known:
            target, new = key, value
        elif key in IGNORED:
            log.info("%s: %r ignored (%s)", source, key, IGNORED[key])
            continue
        elif key in REFUSED:
            raise ConfigError(f"{source}: {key!r} is not a simtune option: {REFUSED[key]}")
        elif key in ALIASES:
            target, convert = ALIASES[key]
            try:
                new = convert(value) if convert is not None else value
            except ValueError as exc:
                raise ConfigError(f"{source}: {key}: {exc}") from None
            if target is None:
                log.info("%s: %r: %r is what simtune does; nothing to set", source, key, value)
                continue
            if target == "dataset_path" and dataset_dir:
                new = [str(Path(str(dataset_dir)) / p) for p in new]
            log.info("%s: %r is simtune's --%s (%r)", source, key, target, new)
        else:
            out[str(raw_key)] = value  # unknown: build_config refuses it with its hint
            continue
        if target in out:
            raise ConfigError(
                f"{source}: {origin[target]!r} and {key!r} both set --{target}; keep one"
            )
        out[target], origin[target] = new, key
    return out
