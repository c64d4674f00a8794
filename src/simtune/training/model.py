"""Find, check and load base models and LoRA adapters.

`resolve_model` only looks at files (no torch), so a bad `--llm_path` fails in
milliseconds, before any heavy import. Loading is safetensors-only and never runs a
repository's code unless the user passed `--trust_remote_code`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simtune.errors import ModelError

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

    @property
    def base_name(self) -> str:
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
            return ModelSpec(str(p.resolve()), True, None, fingerprint(p))
        raise ModelError(
            f"--llm_path: {llm_path} is not a model directory (no config.json or adapter_config.json)"
        )
    if p.exists():
        raise ModelError(f"--llm_path: {llm_path} is a file, not a model directory")
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
    if bp.is_dir():
        inner = resolve_model(str(bp))
        if inner.adapter:
            raise ModelError(f"--llm_path: adapter {adapter_dir} sits on another adapter ({base})")
        return ModelSpec(inner.base, True, str(adapter_dir.resolve()), inner.base_fingerprint)
    if base.startswith((".", "/", "~")) or not _HUB_ID.match(base):
        raise ModelError(f"--llm_path: base model of adapter {adapter_dir} is missing: {base}")
    return ModelSpec(base, False, str(adapter_dir.resolve()))


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
            f"--llm_path: cannot load a tokenizer from {source}: {_first_line(exc)}"
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
    bf16: bool = False,
    fp16: bool = False,
    trust_remote_code: bool = False,
) -> Any:
    """Base causal LM (+ the adapter to continue from). Safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.base,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            local_files_only=spec.base_is_local,
        )
    except Exception as exc:
        raise ModelError(f"--llm_path: cannot load model {spec.base}: {_first_line(exc)}") from None
    if spec.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter, is_trainable=trainable_adapter)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
