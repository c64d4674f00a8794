"""A YAML pasted from LLaMA-Factory or `trl sft --config` works (config/foreign.py).

The LLaMA-Factory file is the shape of its `examples/train_lora/llama3_lora_sft.yaml`; the
TRL one the shape of `trl sft --config` recipes. Every translated key logs one line naming
what it became; a key simtune cannot honour is refused with the file, the key and a hint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import SAMPLE, run_cli

from simtune.config import build_config
from simtune.errors import ConfigError

LLAMA_FACTORY = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: {dataset}
template: llama3
cutoff_len: 256
max_samples: 40
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: {out}
logging_steps: 1
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
max_steps: 2
"""

TRL_SFT = """\
model_name_or_path: {model}
dataset_name: {dataset}
use_peft: true
lora_r: 16
lora_alpha: 32
lora_target_modules: [q_proj, v_proj]
max_seq_length: 512
dtype: float32
learning_rate: 2.0e-4
per_device_train_batch_size: 4
gradient_checkpointing: true
completion_only_loss: true
output_dir: {out}
report_to: [wandb]
"""


def _write(tmp_path: Path, text: str, **fields: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text.format(**fields), encoding="utf-8")
    return path


def test_llama_factory_keys_become_simtune_options(tmp_path, caplog):
    yml = _write(tmp_path, LLAMA_FACTORY, model="m", dataset="a.jsonl,b.jsonl", out="out")
    with caplog.at_level(logging.INFO, logger="simtune.config.foreign"):
        cfg = build_config(str(yml))
    assert (cfg.llm_path, cfg.tuning_mode, cfg.lora_r, cfg.max_length) == ("m", "sft", 8, 256)
    assert cfg.dataset_path == ["a.jsonl", "b.jsonl"]
    assert cfg.lora_target_modules == ["all-linear"]
    assert cfg.trust_remote_code is True and cfg.learning_rate == 1e-4
    assert cfg.lr_scheduler_type == "cosine" and cfg.max_samples == 40
    said = caplog.text
    for line in (
        "'model_name_or_path' is simtune's --llm_path",
        "'lora_rank' is simtune's --lora_r",
        "'cutoff_len' is simtune's --max_length",
        "'stage' is simtune's --tuning_mode ('sft')",
        "'template' ignored",
        "'report_to' ignored",
        "'finetuning_type': 'lora' is what simtune does",
    ):
        assert line in said, line
    # one line per translated or dropped key, none for simtune's own names
    assert "learning_rate" not in said


def test_trl_keys_become_simtune_options(tmp_path, caplog):
    yml = _write(tmp_path, TRL_SFT, model="m", dataset="d.jsonl", out="out")
    with caplog.at_level(logging.INFO, logger="simtune.config.foreign"):
        cfg = build_config(str(yml))
    assert (cfg.llm_path, cfg.dataset_path, cfg.max_length) == ("m", ["d.jsonl"], 512)
    assert cfg.precision == "fp32" and cfg.lora_r == 16
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert "'dataset_name' is simtune's --dataset_path" in caplog.text
    assert "'dtype' is simtune's --precision ('fp32')" in caplog.text


def test_dataset_dir_is_joined_to_each_dataset(tmp_path):
    yml = _write(tmp_path, "model_name_or_path: m\ndataset_dir: data\ndataset: x.jsonl, y.jsonl\n")
    assert build_config(str(yml)).dataset_path == ["data/x.jsonl", "data/y.jsonl"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("finetuning_type: full\n", "finetuning_type: 'full': simtune trains LoRA adapters only"),
        ("stage: pt\n", "stage: stage 'pt' has no simtune mode"),
        ("use_peft: false\n", "use_peft: False: simtune trains LoRA adapters only"),
        ("completion_only_loss: false\n", "completion_only_loss: simtune always trains on"),
        ("val_size: 0.1\n", "'val_size' is not a simtune option: evaluate with `simtune eval`"),
        ("dtype: int8\n", "dtype: 'int8' is not a dtype simtune trains in"),
        ("llm_path: a\nmodel_name_or_path: b\n", "'llm_path' and 'model_name_or_path' both"),
        ("cutoff_len: 10\nmax_seq_length: 20\n", "'cutoff_len' and 'max_seq_length' both set"),
        ("lora_rnak: 8\n", "unknown option 'lora_rnak' (did you mean --lora_r?)"),
    ],
)
def test_keys_simtune_cannot_honour_are_refused_with_a_hint(tmp_path, text, needle):
    yml = _write(tmp_path, "dataset: d.jsonl\n" + text)
    with pytest.raises(ConfigError) as err:
        build_config(str(yml))
    assert str(yml) in str(err.value)
    assert needle in str(err.value)


def test_cli_flags_still_win_over_translated_keys(tmp_path):
    yml = _write(tmp_path, "model_name_or_path: m\ndataset: d.jsonl\ncutoff_len: 64\n")
    cfg = build_config(str(yml), {"max_length": 128})
    assert cfg.max_length == 128 and cfg.llm_path == "m"


@pytest.mark.slow
def test_a_llama_factory_yaml_trains_through_the_cli(tmp_path, tiny_model):
    """The pasted file, unchanged but for the paths, runs `simtune train` to a model."""
    ws = tmp_path / "ws"
    out = tmp_path / "adapter"
    yml = _write(tmp_path, LLAMA_FACTORY, model=tiny_model, dataset=SAMPLE, out=out)
    proc = run_cli("train", "--config", str(yml), "--workspace", str(ws), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'cutoff_len' is simtune's --max_length (256)" in proc.stderr
    result = json.loads(proc.stdout)
    assert Path(result["adapter_path"]) == out
    assert (out / "adapter_config.json").is_file()
    saved = json.loads((out / "simtune.json").read_text())["config"]
    assert saved["lora_r"] == 8 and saved["max_length"] == 256


def test_a_refused_key_through_the_cli_is_exit_2_and_writes_nothing(tmp_path):
    ws = tmp_path / "ws"
    yml = _write(tmp_path, "model_name_or_path: m\ndataset: d.jsonl\nfinetuning_type: freeze\n")
    proc = run_cli("train", "--config", str(yml), "--workspace", str(ws), cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("finetuning_type: 'freeze': simtune trains LoRA adapters only")
    )
    assert not ws.exists()
