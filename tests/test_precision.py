"""Precision: what `auto` picks on which hardware, how the flags fold in, what is refused;
and GGUF input that is not usable fails at once and leaves nothing in the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16 amx_int8\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"


def test_cpu_flags_that_mean_fast_bf16():
    from simtune.training.model import cpu_fast_bf16

    assert cpu_fast_bf16(AMX) == "amx_bf16"
    assert cpu_fast_bf16(AVX512_BF16) == "avx512_bf16"
    assert cpu_fast_bf16(PLAIN) is None
    assert cpu_fast_bf16("") is None


def test_auto_on_this_machine_follows_its_cpu_flags():
    """The auto-detection itself: bf16 exactly when /proc/cpuinfo has amx_bf16 or
    avx512_bf16 (CPU-only here: no CUDA device in tests)."""
    import torch

    from simtune.training.model import cpu_fast_bf16, resolve_precision

    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0].split()
    fast = next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)
    assert cpu_fast_bf16() == fast
    chosen = resolve_precision("auto", "cpu")
    assert chosen.name == ("bf16" if fast else "fp32")
    assert chosen.dtype == (torch.bfloat16 if fast else torch.float32)
    assert chosen.mixed_precision == ("bf16" if fast else "no")
    assert (fast or "no bf16") in chosen.reason
    # Inference on a CPU follows the same rule.
    assert resolve_precision("auto", "cpu", inference=True).name == chosen.name


def test_explicit_choices_and_refusals(monkeypatch):
    import simtune.training.model as m
    from simtune.errors import ConfigError

    monkeypatch.setattr(m, "cpu_fast_bf16", lambda cpuinfo=None: None)
    assert m.resolve_precision("auto", "cpu").name == "fp32"
    assert m.resolve_precision("bf16", "cpu").name == "bf16"  # asked for: slow but works
    assert m.resolve_precision("fp32", "cpu").reason == "requested"
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        m.resolve_precision("fp16", "cpu")


def test_flags_fold_into_the_requested_precision():
    from simtune.config import build_config

    base = {"llm_path": "m", "dataset_path": ["d"]}
    assert build_config(overrides=base).requested_precision() == "auto"
    assert build_config(overrides={**base, "bf16": True}).requested_precision() == "bf16"
    assert build_config(overrides={**base, "fp16": "true"}).requested_precision() == "fp16"
    assert build_config(overrides={**base, "precision": "fp32"}).requested_precision() == "fp32"
    # --bf16 with --precision bf16 (or auto) agrees.
    assert build_config(overrides={**base, "bf16": True, "precision": "bf16"}).bf16


def test_fp16_on_cpu_is_refused_before_anything_is_written(tmp_path, tiny_model):
    from conftest import SAMPLE

    ws = tmp_path / "ws"
    proc = run_cli(
        "train",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(SAMPLE),
        "--workspace",
        str(ws),
        "--fp16",
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not (ws / "models").exists() and not (ws / "mlflow.db").exists()


def test_a_file_that_is_not_gguf_is_refused_at_once(tmp_path):
    from simtune.errors import ModelError
    from simtune.training.model import resolve_model

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        resolve_model(str(fake), tmp_path / "ws")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelError, match=r"is a file, not a model directory \(nor a \.gguf"):
        resolve_model(str(other), tmp_path / "ws")
    assert not (tmp_path / "ws" / "cache").exists()


def test_a_broken_gguf_fails_with_one_line_and_leaves_no_cache_entry(tmp_path):
    """The header says GGUF but the rest is garbage: the loader's error, named by file,
    and no half-converted directory that a later job could take for a model."""
    from simtune.errors import ModelError
    from simtune.training.model import resolve_model

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    ws = tmp_path / "ws"
    with pytest.raises(ModelError) as info:
        resolve_model(str(broken), ws)
    msg = str(info.value)
    assert msg.startswith("--llm_path: cannot read GGUF file") and str(broken) in msg
    assert "\n" not in msg
    cache = ws / "cache" / "models"
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_train_serve_and_eval_document_precision_and_gguf():
    for cmd in (["train", "--help"], ["serve", "--help"], ["eval", "--help"]):
        proc = run_cli(*cmd)
        assert proc.returncode == 0
        text = " ".join(proc.stdout.split())
        assert "--precision" in text and "AVX512-BF16" in text, cmd
        assert "GGUF" in text or ".gguf" in text, cmd
