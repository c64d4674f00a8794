"""Find, check and load base models and LoRA adapters; pick the precision they run in.

`resolve_model` only looks at files (no torch), so a bad `--llm_path` fails in
milliseconds, before any heavy import -- except for a GGUF file seen for the first time,
which it dequantizes once into ``<workspace>/cache/models/<sha256>/`` (`materialize_gguf`;
the header is checked first, so a bad file still fails at once). Loading is
safetensors-only and never runs a repository's code unless the user passed
`--trust_remote_code`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from simtune.errors import ModelError
from simtune.util import first_line

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FINGERPRINT_CHUNK = 1 << 20


@dataclass
class ModelSpec:
    """What `--llm_path` named: a base model, optionally with an adapter to continue."""

    base: str
    """Absolute local directory of the base model, or a hub id."""
    base_is_local: bool
    adapter: str | None = None
    """LoRA adapter directory training continues from (the seed's check_load_adapter)."""
    base_fingerprint: str | None = None
    gguf: dict[str, str] | None = None
    """The GGUF file the base was dequantized from: {"path": ..., "sha256": ...}."""

    @property
    def base_name(self) -> str:
        if self.gguf:  # the cache dir is named by a hash; the file's name says more
            return Path(self.gguf["path"]).stem
        return Path(self.base.rstrip("/")).name or self.base


def resolve_model(llm_path: str, workspace: Path | None = None) -> ModelSpec:
    p = Path(llm_path).expanduser()
    if not p.exists() and workspace is not None and _HUB_ID.match(llm_path) and "/" not in llm_path:
        candidate = workspace / "models" / llm_path  # a simtune model id
        if (candidate / "adapter_config.json").is_file():
            p = candidate
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return _adapter_spec(p)
        if (p / "config.json").is_file():
            _check_weights(p)
            return ModelSpec(str(p.resolve()), True, None, fingerprint(p), gguf=_gguf_source(p))
        raise ModelError(
            f"--llm_path: {llm_path} is not a model directory (no config.json or adapter_config.json)"
        )
    if p.is_file() and (p.suffix.lower() == ".gguf" or is_gguf(p)):
        return gguf_spec(p, workspace)
    if p.exists():
        raise ModelError(
            f"--llm_path: {llm_path} is a file, not a model directory (nor a .gguf file)"
        )
    looks_local = (
        llm_path.startswith((".", "/", "~")) or llm_path.count("/") > 1 or "\\" in llm_path
    )
    if looks_local or not _HUB_ID.match(llm_path):
        raise ModelError(f"--llm_path: no such model directory: {llm_path}")
    return ModelSpec(llm_path, False)


def _adapter_spec(adapter_dir: Path) -> ModelSpec:
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"--llm_path: {adapter_dir}/adapter_config.json is unreadable: {exc}"
        ) from None
    if not any((adapter_dir / n).is_file() for n in ("adapter_model.safetensors",)):
        raise ModelError(f"--llm_path: {adapter_dir} has no adapter_model.safetensors")
    base = cfg.get("base_model_name_or_path")
    # simtune.json records the absolute base path even when the adapter config has a
    # relative one (PEFT stores whatever string the model was loaded from).
    meta = adapter_dir / "simtune.json"
    if meta.is_file():
        try:
            base = json.loads(meta.read_text()).get("base_model", {}).get("path") or base
        except json.JSONDecodeError:
            pass
    if not base:
        raise ModelError(f"--llm_path: adapter {adapter_dir} does not name its base model")
    bp = Path(base).expanduser()
    gguf = _recorded_gguf(meta)
    if gguf is not None and not bp.is_dir():
        # The dequantized cache was removed (or the adapter moved to another machine):
        # rebuild it from the GGUF file the adapter was trained on, if that is still there.
        inner = gguf_spec(gguf, bp.parent.parent.parent if bp.parent.name == "models" else None)
        return replace(inner, adapter=str(adapter_dir.resolve()))
    if bp.is_dir():
        inner = resolve_model(str(bp))
        if inner.adapter:
            raise ModelError(f"--llm_path: adapter {adapter_dir} sits on another adapter ({base})")
        return replace(inner, adapter=str(adapter_dir.resolve()))
    if base.startswith((".", "/", "~")) or not _HUB_ID.match(base):
        raise ModelError(f"--llm_path: base model of adapter {adapter_dir} is missing: {base}")
    return ModelSpec(base, False, str(adapter_dir.resolve()))


def _gguf_source(model_dir: Path) -> dict[str, str] | None:
    """{"path", "sha256"} of the GGUF file a dequantized cache dir was made from."""
    try:
        data = json.loads((model_dir / GGUF_MARKER).read_text())
        return {"path": str(data["source"]), "sha256": str(data["sha256"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _recorded_gguf(meta: Path) -> Path | None:
    """The GGUF file an adapter's simtune.json names as its base's source, if it exists."""
    try:
        gguf = json.loads(meta.read_text()).get("base_model", {}).get("gguf") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    path = Path(gguf.get("path") or "")
    return path if gguf.get("path") and path.is_file() else None


def _check_weights(model_dir: Path) -> None:
    if (
        any(model_dir.glob("*.safetensors"))
        or (model_dir / "model.safetensors.index.json").is_file()
    ):
        return
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ModelError(
            f"--llm_path: {model_dir} has only pickle weights (.bin/.pt); simtune loads safetensors "
            "only (convert with `model.save_pretrained(dir, safe_serialization=True)`)"
        )
    raise ModelError(f"--llm_path: {model_dir} holds no model weights (*.safetensors)")


def fingerprint(model_dir: Path) -> str:
    """Content fingerprint of a model directory, cheap even for 100 GB checkpoints.

    Hashes config/tokenizer files whole and each weight file's size plus its first and
    last MiB: enough to tell two checkpoints apart, without reading every byte."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if not f.is_file():
            continue
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with f.open("rb") as fh:
            if size <= 2 * _FINGERPRINT_CHUNK:
                h.update(fh.read())
            else:
                h.update(fh.read(_FINGERPRINT_CHUNK))
                fh.seek(-_FINGERPRINT_CHUNK, 2)
                h.update(fh.read())
    return "sha256:" + h.hexdigest()


# --- GGUF -----------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
GGUF_MARKER = "simtune_gguf.json"
"""Written last into a dequantized model dir: its presence means the dir is complete."""


def is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_spec(path: Path, workspace: Path | None) -> ModelSpec:
    """The ModelSpec of a GGUF file: its dequantized copy in the workspace's cache."""
    if not is_gguf(path):
        raise ModelError(f"--llm_path: {path} is not a GGUF file (it does not start with 'GGUF')")
    out, digest = materialize_gguf(path, workspace)
    return ModelSpec(
        str(out),
        True,
        None,
        fingerprint(out),
        gguf={"path": str(path.resolve()), "sha256": digest},
    )


def file_sha256(path: Path) -> str:
    """sha256 of a whole file (~1 s per GB here): the GGUF cache key."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_FINGERPRINT_CHUNK * 8), b""):
            h.update(block)
    return h.hexdigest()


def gguf_cache_root(workspace: Path | None) -> Path:
    from simtune.config import resolve_workspace

    return resolve_workspace(workspace) / "cache" / "models"


def materialize_gguf(path: Path, workspace: Path | None = None) -> tuple[Path, str]:
    """(``<workspace>/cache/models/<sha256[:32]>``, sha256) of a GGUF file, dequantized
    there once into an ordinary Hugging Face model dir (fp32 safetensors, config,
    tokenizer with its chat template) that every later job, server and adapter uses as
    its base. Keyed by the file's content, so a renamed or copied file reuses it and a
    changed one gets its own.

    Built in a staging dir and renamed into place with `GGUF_MARKER` written last,
    under a file lock, so that concurrent jobs convert once and a killed conversion
    leaves nothing that looks usable. Costs what transformers' GGUF loader costs (~25 s
    and ~1.5 GB of memory for a 135M model on 2 cores; scales with the parameters)."""
    from filelock import FileLock

    root = gguf_cache_root(workspace)
    digest = file_sha256(path)
    out = root / digest[:32]
    if (out / GGUF_MARKER).is_file():
        log.info("GGUF %s: using its dequantized copy %s", path.name, out)
        return out, digest
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{digest[:32]}.lock")):
        if (out / GGUF_MARKER).is_file():  # another job converted it while we waited
            return out, digest
        shutil.rmtree(out, ignore_errors=True)  # a dir without the marker is unfinished
        staging = root / f".staging-{digest[:32]}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _dequantize(path, staging)
            (staging / GGUF_MARKER).write_text(
                json.dumps({"source": str(path.resolve()), "sha256": digest}, indent=2)
            )
            os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("GGUF %s: dequantized into %s", path.name, out)
    return out, digest


def _dequantize(path: Path, out: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            f"--llm_path: reading {path.name} needs the `gguf` package (pip install gguf)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size_mb = path.stat().st_size / 2**20
    log.info(
        "GGUF %s (%.0f MB): dequantizing once into the workspace cache (tokenizer, then "
        "tensors; progress on stderr)",
        path.name,
        size_mb,
    )
    where, name = str(path.parent.resolve()), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types; all mean "not usable"
        raise ModelError(f"--llm_path: cannot read GGUF file {path}: {first_line(exc)}") from None
    # The loader marks the model as quantized (config.quantization_config with
    # quant_method "gguf", model.hf_quantizer); the weights are plain fp32 now, and
    # with the marker a reload would look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False)):
        if hasattr(model, attr):
            setattr(model, attr, value)
    out.mkdir(parents=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def load_tokenizer(spec: ModelSpec, *, trust_remote_code: bool = False) -> Any:
    """The adapter's tokenizer when it saved one (it may add tokens), else the base's."""
    from transformers import AutoTokenizer

    source = (
        spec.adapter
        if spec.adapter and (Path(spec.adapter) / "tokenizer_config.json").is_file()
        else spec.base
    )
    try:
        tok = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=spec.base_is_local
        )
    except Exception as exc:  # transformers raises many types here; all mean "not usable"
        raise ModelError(
            f"--llm_path: cannot load a tokenizer from {source}: {first_line(exc)}"
        ) from None
    if tok.pad_token is None:
        # Padding positions are masked out of the loss, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ModelError(
            f"--llm_path: the tokenizer of {source} has no chat template; use an instruct/chat model "
            "or add one to its tokenizer_config.json"
        )
    return tok


def load_model(
    spec: ModelSpec,
    *,
    trainable_adapter: bool,
    precision: Precision | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> Any:
    """Base causal LM (+ the adapter to continue from). Safetensors only. `device_map`
    ('auto', --device_map) shards it over the visible GPUs through accelerate.

    The base weights are loaded in `precision`'s dtype (default fp32); LoRA weights stay
    fp32 whatever it is (PEFT upcasts adapters of a bf16/fp16 base), so the optimizer
    state is fp32 too."""
    from transformers import AutoModelForCausalLM

    dtype = (precision or Precision("fp32", "cpu", "")).dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.base,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            local_files_only=spec.base_is_local,
            **({"device_map": device_map} if device_map else {}),
        )
    except Exception as exc:
        raise ModelError(f"--llm_path: cannot load model {spec.base}: {first_line(exc)}") from None
    if spec.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter, is_trainable=trainable_adapter)
    return model


# --- precision ------------------------------------------------------------------------

_FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of CPUs with bf16 matrix instructions (Intel AMX: Sapphire Rapids
and later; AVX512-BF16: Cooper Lake, AMD Zen 4 and later). On such a CPU a bf16 matmul
ran 2.5-3x faster than fp32 in bench/sft_vs_trl.py; without them torch emulates bf16
and it is slower than fp32."""


@dataclass(frozen=True)
class Precision:
    """What `resolve_precision` chose: the dtype of the base weights and the autocast
    dtype of the matmuls ('bf16', 'fp16' or 'fp32'), for which device, and why."""

    name: str
    device: str
    """'cuda' or 'cpu'."""
    reason: str

    @property
    def dtype(self) -> Any:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name, torch.float32)

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for it: 'bf16', 'fp16' or 'no'."""
        return self.name if self.name in ("bf16", "fp16") else "no"

    def to_dict(self) -> dict[str, str]:
        return {"used": self.name, "device": self.device, "reason": self.reason}


def fp32_trainable(model: Any) -> int:
    """Cast every trainable parameter that is not fp32 to fp32 (returns how many): a
    bf16/fp16 base keeps its frozen weights, while what the optimizer updates -- LoRA
    matrices, a reward model's score head (PEFT's modules_to_save copies it in the
    base's dtype) -- and so its AdamW state stay fp32. Autocast runs the matmuls in the
    low precision either way. Call before the optimizer is built."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def cpu_fast_bf16(cpuinfo: str | None = None) -> str | None:
    """The first bf16 matrix-instruction flag this CPU reports (`cpuinfo`: the text of
    /proc/cpuinfo, read when not given), or None -- also where /proc/cpuinfo does not
    exist (macOS, Windows: fp32 there unless asked)."""
    text = cpuinfo
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return next((f for f in _FAST_BF16_CPU_FLAGS if f in flags), None)


def resolve_precision(
    precision: str = "auto", device: str | None = None, *, inference: bool = False
) -> Precision:
    """The one rule every consumer (SFT, reward model, PPO, serve, eval) applies.

    `precision` is 'auto', 'bf16', 'fp16' or 'fp32' (`TuningConfig.requested_precision()`
    folds the --bf16/--fp16 flags in); `device` is 'cuda...' or 'cpu' (default: CUDA when
    available). 'auto' picks bf16 where the hardware does it fast -- a CUDA GPU with bf16
    support, or a CPU with AMX/AVX512-BF16 (`cpu_fast_bf16`) -- and fp32 elsewhere; with
    `inference=True` a CUDA GPU without bf16 gets fp16 instead (no gradients, so no
    loss-scaling concern). An explicit choice is kept, except that fp16 on CPU raises
    (CPUs have no fast fp16 matmuls, and the Trainer cannot scale fp16 losses there)
    and bf16 on a CUDA GPU without bf16 support raises."""
    import torch

    from simtune.errors import ConfigError

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    gpu_bf16 = kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "auto":
        if kind == "cuda":
            if gpu_bf16:
                return Precision("bf16", kind, "auto: the CUDA GPU supports bf16")
            if inference:
                return Precision("fp16", kind, "auto: the CUDA GPU has no bf16; fp16 for inference")
            return Precision("fp32", kind, "auto: the CUDA GPU has no bf16")
        flag = cpu_fast_bf16()
        if flag:
            return Precision("bf16", kind, f"auto: the CPU has {flag}")
        return Precision("fp32", kind, "auto: the CPU has no bf16 matrix instructions")
    if precision == "fp16" and kind == "cpu":
        raise ConfigError("--fp16 / --precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if precision == "bf16" and kind == "cuda" and not gpu_bf16:
        raise ConfigError("--bf16 / --precision bf16: this CUDA GPU does not support bf16")
    if precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"--precision: unknown value {precision!r}")
    return Precision(precision, kind, "requested")
