"""Serve a base model and its LoRA adapters as an OpenAI-compatible endpoint (DESIGN.md §7).

`simtune serve --model ID|NAME[@VERSION]|PATH ...` loads the base once, attaches every
adapter to it by name and answers ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions`` (streaming too) on loopback; the request's ``model`` picks the
adapter, ``"base"`` is the base model itself. From Python::

    engine = Engine.load(["sft-tiny-...", "ppo-tiny-..."], workspace=ws)
    engine.generate("base", ["Hello"], max_tokens=16)           # in-process
    with Server(engine) as server:                               # over HTTP
        client = openai.OpenAI(base_url=server.url, api_key="x")

Batching (transformers backend). One scheduler thread owns the model. It runs a decode
loop with a KV cache over a *batch of rows*; each row is one request, left-padded.
Between two decode steps it takes waiting requests (up to ``max_batch_size`` rows),
prefills them as a small batch of their own and merges their cache into the running one
(padding the shorter cache on the left), so a request arriving mid-generation joins at
the next token instead of waiting for the batch to drain ("iteration-level" or
continuous batching, like vLLM's scheduler but without paged memory). Finished and
abandoned rows (client gone) leave the batch at once, and cache columns that only
padding still uses are cut. Rows of different adapters share one batch: PEFT's mixed
batch inference (per-row adapter names, ``"__base__"`` for the base) applies each LoRA
only to its own rows; a batch of a single adapter (or only the base) instead switches
PEFT's active adapter, which is cheaper per step. Every generated token is handed to
its request as it is made, so streaming and batching work together.

Measured on the tiny model on 2 CPU cores (``bench/serve_throughput.py``): 8 concurrent
clients get ~4x the tokens/s of one client; mixed-adapter batches ~2.3x (PEFT's
per-row routing costs ~25% over a single-adapter batch there); no batching ~1x.

HTTP contract
-------------
- ``GET /health`` -> ``{"status": "ok", "models": [...]}`` (no key needed; with
  ``api_key`` set, the model names only for a request carrying the key).
- ``GET /v1/models``, ``GET /v1/models/{id}``: the served names (adapters first, then
  ``base``), OpenAI's list shape plus ``root`` (the base model) and ``parent``.
- ``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's chat template
  (generation prompt added); ``POST /v1/completions``: ``prompt`` a string, a list of
  strings (one choice each), token ids or lists of token ids.
  Honoured: ``max_tokens`` / ``max_completion_tokens`` (default: no cap but the model's
  context window, as in vLLM; ``--max-new-tokens`` sets a default and upper bound, a
  longer request is clipped and ends with ``finish_reason: "length"``), ``temperature`` (0 = greedy), ``top_p``, ``stop`` (up to
  4 strings, not included in the answer), ``stream`` and ``stream_options.include_usage``.
  ``usage`` counts prompt and completion tokens. ``n`` > 1, ``logprobs`` and ``echo``
  are refused (400); other OpenAI fields (penalties, seed, tools, ...) are ignored.
- Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
  a body that is not strict JSON (`simtune.jsontext`: NaN/Infinity, lone surrogates,
  nesting over ``REQUEST_MAX_DEPTH``), a body that is not an object, a missing/invalid
  field or message role, a prompt longer than the context (checked by its characters
  before tokenizing, then by tokens; tokenizing runs off the event loop), a request
  aiohttp's parser refuses -> 400; a
  ``model`` that is not served -> 404 (``code: "model_not_found"``); unknown path ->
  404; wrong method -> 405; body over 16 MiB -> 413; missing or wrong key when
  ``api_key`` is set -> 401 (``Authorization: Bearer KEY`` or ``X-Api-Key: KEY``); an
  error inside generation -> 500 (or an ``error`` event in a stream). The server keeps
  serving after any of them.
- A client that disconnects mid-answer (stream or not) frees its batch row at the next
  decode step; the other requests are not affected.

Deliberate simplifications
--------------------------
- One tokenizer for all served names: the base model's (the one the adapters were
  trained with); adapters that added tokens to their own tokenizer are not supported.
- No paged KV cache: a batch's cache is as long as its longest row (left padding), so
  very uneven prompt lengths waste memory; ``max_batch_size`` bounds it.
- Requests are admitted in arrival order, with no priorities and no preemption; a
  merged cache needs plain (non-sliding-window) layers, otherwise new requests wait
  for the running batch to finish (still batched, just not mid-flight).
- The vLLM backend launches vLLM's own OpenAI server (``python -m
  vllm.entrypoints.openai.api_server``) as a subprocess with the base and
  ``--lora-modules``; it is not exercised by the test suite (no GPU, no vllm there),
  and vLLM applies its own limits: ``--max-new-tokens`` is not passed on (vLLM bounds a
  request by the model's context), ``--max-batch-size`` becomes ``--max-num-seqs``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simtune.aio_http import (
    LoopThread,
    app_runner,
    check_api_key,
    error_body,
    error_response,
    parse_body,
)
from simtune.aio_http import Reject as _Reject
from simtune.config import resolve_workspace
from simtune.decisions.schema import role_problem
from simtune.errors import ConfigError, ModelError, SimtuneError

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000
BASE_NAME = "base"
BACKENDS = ("auto", "transformers", "vllm")
MAX_STOP = 4
MAX_BODY = 16 * 1024 * 1024
_PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
_VERSION = re.compile(r"^\d+$")

Prompt = str | list[dict[str, Any]] | list[int]


# Answer cap when neither the request, --max-new-tokens nor the model config's context
# length (max_position_embeddings) gives one.
UNKNOWN_CONTEXT_TOKENS = 4096

# --- what is served ----------------------------------------------------------------------


@dataclass
class ServedModel:
    """One thing `simtune serve --model` named, resolved to files."""

    name: str
    """The name clients put in ``"model"``."""
    adapter_dir: str | None
    """LoRA adapter directory; None for the base model itself."""
    base_model: str
    """Base model: absolute local directory or hub id."""
    training_run_id: str | None = None
    registered_name: str | None = None
    registered_version: str | None = None


@dataclass
class Generation:
    text: str
    finish_reason: str
    """``"stop"`` (end of sequence or a stop string) or ``"length"`` (token limit)."""
    prompt_tokens: int
    completion_tokens: int


class RequestError(SimtuneError):
    """A request the engine refuses; `status` is the HTTP status the server answers."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def resolve_served(
    spec: str, *, workspace: str | Path | None = None, tracking_uri: str | None = None
) -> ServedModel:
    """Resolve one ``--model`` value, cheapest source first: an MLflow ``models:/`` URI, a
    directory (adapter or base model), a local model id (``models/registry.json``), an
    MLflow registered model ``NAME``, ``NAME@VERSION`` or ``NAME@alias`` (its adapter is
    downloaded once into ``<workspace>/models/.mlflow-cache/``; versions never change)."""
    ws = resolve_workspace(workspace)
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("--model: empty model name")
    if spec == BASE_NAME:
        raise ConfigError(
            "--model base: the base model is always served as 'base'; name an adapter "
            "(model id, MLflow NAME[@VERSION] or directory) or a base model directory"
        )
    if spec.startswith("models:/"):
        rest = spec[len("models:/") :].strip("/")
        if "/" in rest:
            name, version = rest.rsplit("/", 1)
        else:
            name, _, version = rest.partition("@")
        found = _from_mlflow(name, version or None, ws, tracking_uri, spec)
        if found is None:
            raise ModelError(f"--model: no registered MLflow model {name!r} ({spec})")
        return found
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_path(path, spec, name=path.resolve().name, workspace=ws)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _from_path(path, spec, name=path.name, workspace=ws)  # served as 'base'
    if path.exists():
        raise ModelError(
            f"--model: {spec} is a file, not a model or adapter directory (nor a .gguf file)"
        )
    entry = _registry_entry(ws, spec)
    if entry is not None:
        return _from_registry(entry, spec)
    local = ws / "models" / spec
    if re.match(r"^[\w.-]+$", spec) and (local / "adapter_config.json").is_file():
        return _from_path(local, spec, name=spec)  # a model dir whose registry entry is gone
    if not spec.startswith((".", "/", "~")):
        name, _, version = spec.rpartition("@") if "@" in spec else (spec, "", "")
        found = _from_mlflow(name, version or None, ws, tracking_uri, spec)
        if found is not None:
            return found
    raise ModelError(
        f"--model: unknown model {spec!r}: not a model id in {ws / 'models' / 'registry.json'}, "
        "not a registered MLflow model, and not a model or adapter directory"
    )


def _from_path(
    path: Path, spec: str, *, name: str, workspace: Path | None = None, **extra: Any
) -> ServedModel:
    """`workspace` holds the dequantized copy of a GGUF base (`materialize_gguf`)."""
    from simtune.training.model import resolve_model

    cfg_file = path / "adapter_config.json"
    if cfg_file.is_file():
        try:
            task = json.loads(cfg_file.read_text()).get("task_type")
        except (OSError, json.JSONDecodeError):
            task = None  # resolve_model reports it
        if task == "SEQ_CLS":
            raise ModelError(f"--model: {spec} is a reward model (it scores, it does not generate)")
    try:
        found = resolve_model(str(path), workspace)
    except ModelError as exc:
        raise ModelError(str(exc).replace("--llm_path", "--model", 1)) from None
    if found.adapter is None:
        return ServedModel(BASE_NAME, None, found.base)
    meta: dict[str, Any] = {}
    try:
        meta = json.loads((path / "simtune.json").read_text()).get("mlflow") or {}
    except (OSError, json.JSONDecodeError):
        pass
    return ServedModel(
        name=name,
        adapter_dir=found.adapter,
        base_model=found.base,
        training_run_id=extra.get("run_id") or meta.get("run_id"),
        registered_name=extra.get("registered_name") or meta.get("registered_model_name"),
        registered_version=extra.get("registered_version")
        or (
            str(meta["registered_model_version"]) if meta.get("registered_model_version") else None
        ),
    )


def _registry_entry(ws: Path, spec: str) -> dict[str, Any] | None:
    from simtune.registry import Registry

    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$", spec) or ".." in spec:
        return None
    reg = Registry(ws)
    if not reg.path.is_file():
        return None
    for entry in reg.list():
        if entry.get("model_id") == spec:
            return entry
    return None


def _from_registry(entry: dict[str, Any], spec: str) -> ServedModel:
    if entry.get("tuning_mode") == "reward":
        raise ModelError(f"--model: {spec} is a reward model (it scores, it does not generate)")
    path = Path(entry.get("path", ""))
    if not path.is_dir():
        raise ModelError(f"--model: model {spec} is registered but its directory {path} is missing")
    ml = entry.get("mlflow") or {}
    return _from_path(
        path,
        spec,
        name=spec,
        run_id=ml.get("run_id"),
        registered_name=ml.get("registered_model_name"),
        registered_version=str(ml["registered_model_version"])
        if ml.get("registered_model_version")
        else None,
    )


def _from_mlflow(
    name: str, version: str | None, ws: Path, tracking_uri: str | None, spec: str
) -> ServedModel | None:
    """The adapter of a registered MLflow model version, or None when no such model."""
    from simtune.tracking import check_reachable, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(tracking_uri, ws)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return None  # no store yet: do not let MLflow create an empty one as a side effect
    check_reachable(uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        escaped = name.replace("\\", "\\\\").replace("'", "\\'")
        versions = client.search_model_versions(f"name = '{escaped}'")
    except MlflowException:
        return None
    if not versions:
        return None
    try:
        if version is None:
            mv = max(versions, key=lambda v: int(v.version))
        elif _VERSION.match(version):
            mv = client.get_model_version(name, version)
        else:
            mv = client.get_model_version_by_alias(name, version)
    except MlflowException:
        latest = max(int(v.version) for v in versions)
        raise ModelError(
            f"--model: MLflow model {name!r} has no version or alias {version!r} "
            f"(latest version: {latest})"
        ) from None
    ver = str(mv.version)
    # Beside the local models (and git-ignored with them); one folder per store, since two
    # tracking servers can both have a "NAME" version 1.
    cache = ws / "models" / ".mlflow-cache" / hashlib.sha1(uri.encode()).hexdigest()[:12]
    slug = re.sub(r"[^\w.-]+", "_", name).strip(".")[:80]  # never '..' or a separator
    target = cache / f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:8]}" / ver
    if not (target / "adapter_config.json").is_file():
        source = client.get_model_version_download_uri(name, ver).rstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=target.parent))
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/artifacts/adapter", dst_path=str(tmp), tracking_uri=uri
            )
            if target.exists():  # another process won the race; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(local, target)
        except MlflowException as exc:
            raise ModelError(
                f"--model: cannot download the adapter of {name} v{ver}: {str(exc)[:200]}"
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    served = _from_path(
        target,
        spec,
        name=f"{name}@{ver}",
        run_id=mv.run_id,
        registered_name=name,
        registered_version=ver,
    )
    return served


# --- the engine --------------------------------------------------------------------------


class _Sink:
    """Where a request's output goes: `text` per streamed piece, then `done` or `error`.
    Called from the scheduler thread."""

    def text(self, delta: str) -> None:  # noqa: B027 (optional hook)
        pass

    def done(self, gen: Generation) -> None:
        raise NotImplementedError

    def error(self, exc: BaseException) -> None:
        raise NotImplementedError


class _Request:
    __slots__ = (
        "adapter",
        "ids",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "sink",
        "cancelled",
        "generated",
        "text",
        "sent",
        "finished",
    )

    def __init__(
        self,
        adapter: str,
        ids: list[int],
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str],
        sink: _Sink,
    ) -> None:
        self.adapter, self.ids, self.max_tokens = adapter, ids, max_tokens
        self.temperature, self.top_p, self.stop, self.sink = temperature, top_p, stop, sink
        self.cancelled = False
        self.generated: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already handed to the sink
        self.finished = False


class _Batch:
    """The rows being decoded together and their shared, left-padded KV cache."""

    __slots__ = ("rows", "cache", "mask", "next_ids", "positions")

    def __init__(self, rows: list[_Request], cache: Any, mask: Any, next_ids: Any, pos: Any):
        self.rows, self.cache, self.mask = rows, cache, mask
        self.next_ids = next_ids  # [B] the token each row generated last, not yet in the cache
        self.positions = pos  # [B] that token's position id


class _Waiter(_Sink):
    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: Generation | None = None
        self.exc: BaseException | None = None

    def done(self, gen: Generation) -> None:
        self.result = gen
        self.event.set()

    def error(self, exc: BaseException) -> None:
        self.exc = exc
        self.event.set()


class Engine:
    """A base model with LoRA adapters attached by name, generating in batches on one
    scheduler thread (see the module docstring). Build with `Engine.load`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        served: dict[str, ServedModel],
        peft_names: dict[str, str],
        *,
        device: str,
        max_batch_size: int = 8,
        max_new_tokens: int | None = None,
        batch_wait_s: float = 0.002,
    ) -> None:
        import torch

        self.model, self.tokenizer = model, tokenizer
        self.served = served
        self.names = list(served)
        self._peft = peft_names  # served name -> PEFT adapter name ("__base__" for the base)
        self._mixed = any(v != _PEFT_BASE for v in peft_names.values())
        # PEFT's current routing: an adapter name, "__base__" (adapter layers off) or None
        # (mixed batches via adapter_names). PeftModel.from_pretrained leaves "a0" active.
        self._active: str | None = getattr(model, "active_adapter", None) if self._mixed else None
        self._row_names: list[str] | None = None  # per-row adapters of a mixed batch
        if self._mixed:
            self._install_row_hooks()
        self.device = device
        self.max_batch_size = max(1, int(max_batch_size))
        # None (the default, as in vLLM): no cap but the context window.
        self.max_new_tokens = None if max_new_tokens is None else max(1, int(max_new_tokens))
        self.batch_wait_s = batch_wait_s
        cfg = getattr(model, "config", None)
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self._eos = {int(t) for t in eos if t is not None}
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        import inspect

        params = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        self._torch = torch
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to share
        # The most characters one token can stand for: a text over 2 x context x this many
        # characters cannot fit, refused before spending seconds tokenizing it.
        try:
            vocab = tokenizer.get_vocab()
            self._max_token_chars = max((len(t) for t in vocab), default=1) or 1
        except Exception:  # a tokenizer without a vocabulary listing: no cheap bound
            self._max_token_chars = None
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._closed = False
        # Counters for tests and benchmarks: decode steps, rows summed over steps (mean batch
        # = rows / steps), largest batch, mid-flight joins, abandoned rows dropped, forwards
        # that mixed several adapters in one batch.
        self.stats = dict.fromkeys(
            ("steps", "rows", "max_rows", "merges", "cancelled", "mixed_forwards"), 0
        )
        self._thread = threading.Thread(target=self._run, name="simtune-engine", daemon=True)
        self._thread.start()

    # --- construction ---------------------------------------------------------------

    @classmethod
    def load(
        cls,
        models: Sequence[str],
        *,
        workspace: str | Path | None = None,
        tracking_uri: str | None = None,
        backend: str = "auto",
        device: str | None = None,
        precision: str = "auto",
        max_batch_size: int = 8,
        max_new_tokens: int | None = None,
        trust_remote_code: bool = False,
    ) -> Engine:
        """Resolve `models` (`resolve_served`), load their shared base once and attach
        each adapter. In-process generation is always the transformers backend
        (``backend`` "auto" or "transformers"); vLLM runs only as `simtune serve`'s
        subprocess. `precision` is resolved by `resolve_precision(..., inference=True)`
        for the device: 'auto' is bf16 on a CUDA GPU with bf16 or a CPU with
        AMX/AVX512-BF16, fp16 on other GPUs, fp32 elsewhere."""
        if backend not in ("auto", "transformers"):
            raise ConfigError(
                f"--backend {backend}: Engine runs in-process with transformers; vLLM is only "
                "available through `simtune serve --backend vllm`"
            )
        served = resolve_all(models, workspace=workspace, tracking_uri=tracking_uri)
        return cls._load_resolved(
            served,
            device=device,
            precision=precision,
            max_batch_size=max_batch_size,
            max_new_tokens=max_new_tokens,
            trust_remote_code=trust_remote_code,
        )

    @classmethod
    def _load_resolved(
        cls,
        served: dict[str, ServedModel],
        *,
        device: str | None,
        max_batch_size: int,
        max_new_tokens: int | None,
        trust_remote_code: bool,
        precision: str = "auto",
    ) -> Engine:
        import torch
        from transformers import AutoModelForCausalLM

        from simtune.training.model import resolve_precision

        base = served[BASE_NAME].base_model
        local = Path(base).is_dir()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available")
        chosen = resolve_precision(precision, device, inference=True)
        dtype = chosen.dtype
        tokenizer = _load_tokenizer(served, trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                base,
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                local_files_only=local,
            )
        except Exception as exc:  # many exception types; all mean "cannot load"
            raise ModelError(
                f"--model: cannot load base model {base}: {_first_line(exc)}"
            ) from None
        peft_names = {BASE_NAME: _PEFT_BASE}
        adapters = [s for s in served.values() if s.adapter_dir]
        if adapters:
            from peft import PeftModel

            for i, s in enumerate(adapters):
                # PEFT keeps adapters in a ModuleDict: names may not contain '.', so served
                # names (dots, '@') map to a0, a1, ...
                pname = f"a{i}"
                try:
                    if i == 0:
                        model = PeftModel.from_pretrained(model, s.adapter_dir, adapter_name=pname)
                    else:
                        model.load_adapter(s.adapter_dir, adapter_name=pname)
                except Exception as exc:
                    raise ModelError(
                        f"--model {s.name}: cannot attach adapter {s.adapter_dir}: "
                        f"{_first_line(exc)}"
                    ) from None
                peft_names[s.name] = pname
        model.to(device)
        model.eval()
        log.info(
            "loaded %s on %s in %s (%s) with %d adapter(s): %s",
            base,
            device,
            chosen.name,
            chosen.reason,
            len(adapters),
            ", ".join(s.name for s in adapters) or "none",
        )
        return cls(
            model,
            tokenizer,
            served,
            peft_names,
            device=device,
            max_batch_size=max_batch_size,
            max_new_tokens=max_new_tokens,
        )

    def add_aliases(self, aliases: dict[str, str]) -> None:
        """Serve each alias (``--served-model-name``) as the served model it names."""
        for alias, target in aliases.items():
            self.served[alias] = self.served[target]
            self._peft[alias] = self._peft[target]
            self.names.append(alias)

    # --- requests -------------------------------------------------------------------

    def encode(self, model: str, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a string is raw text, a message list is rendered with the
        chat template (generation prompt added), a list of ints is used as is."""
        if model not in self.served:
            raise RequestError(
                404,
                f"the model {model!r} is not served here; served: {', '.join(self.names)}",
                param="model",
                code="model_not_found",
            )
        tok = self.tokenizer
        param = "messages" if isinstance(prompt, list) and not _is_ids(prompt) else "prompt"
        with self._tok_lock:
            if isinstance(prompt, str):
                self._check_chars(prompt, param)
                ids = tok(prompt, add_special_tokens=True)["input_ids"]
            elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                ids = [int(t) for t in prompt]  # type: ignore[arg-type]
                if max(ids) >= len(tok) or min(ids) < 0:
                    raise RequestError(400, "token id out of the vocabulary", param="prompt")
            else:
                if not getattr(tok, "chat_template", None):
                    raise RequestError(
                        400,
                        "this model's tokenizer has no chat template; use /v1/completions",
                        param="messages",
                    )
                messages = _plain_messages(prompt)
                self._check_chars("".join(m["content"] for m in messages), param)
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RequestError(400, "the prompt is empty", param="prompt")
        if self.context_length and len(ids) >= self.context_length:
            raise RequestError(
                400,
                f"the prompt is {len(ids)} tokens; the model's context is "
                f"{self.context_length} tokens",
                param=param,
                code="context_length_exceeded",
            )
        return list(ids)

    def _check_chars(self, text: str, param: str) -> None:
        """Refuse, without tokenizing, a text too long in characters to fit the context."""
        if not self.context_length or self._max_token_chars is None:
            return
        limit = 2 * self.context_length * self._max_token_chars
        if len(text) > limit:
            raise RequestError(
                400,
                f"the prompt is {len(text)} characters: more than fit in the model's context "
                f"of {self.context_length} tokens",
                param=param,
                code="context_length_exceeded",
            )

    def submit(
        self,
        model: str,
        prompt: Prompt,
        sink: _Sink,
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
    ) -> _Request:
        """Queue one generation; `sink` receives its text pieces and result (from the
        scheduler thread). Raises `RequestError` on a bad request."""
        if self._closed:
            raise RequestError(503, "the engine is shut down", code="unavailable")
        ids = self.encode(model, prompt)
        caps = [c for c in (max_tokens, self.max_new_tokens) if c is not None]
        if self.context_length:
            caps.append(self.context_length - len(ids))
        limit = min(int(c) for c in caps) if caps else UNKNOWN_CONTEXT_TOKENS
        req = _Request(
            self._peft[model],
            ids,
            max(1, limit),
            float(temperature),
            float(top_p),
            [s for s in (stop or ()) if s],
            sink,
        )
        self._queue.put(req)
        return req

    @staticmethod
    def cancel(req: _Request) -> None:
        """Abandon a request: its row leaves the batch at the next decode step."""
        req.cancelled = True

    def generate(
        self,
        model: str,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
    ) -> list[Generation]:
        """Generate one answer per prompt (batched with whatever else is running).
        Thread-safe. `max_tokens` is clipped to the engine's ``max_new_tokens``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = [self.encode(model, p) for p in prompts]  # refuse before queueing any
        waiters = []
        for p in encoded:
            w = _Waiter()
            self.submit(
                model, p, w, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop
            )
            waiters.append(w)
        out = []
        for w in waiters:
            w.event.wait()
            if w.exc is not None:
                raise w.exc
            assert w.result is not None
            out.append(w.result)
        return out

    def close(self) -> None:
        """Stop the scheduler; requests still waiting get an error."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=60)
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                req.sink.error(RequestError(503, "the engine is shut down", code="unavailable"))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- scheduler thread -----------------------------------------------------------

    def _take(self, n: int, wait: float) -> list[_Request]:
        """Up to `n` waiting requests, waiting at most `wait` s for more to arrive."""
        out: list[_Request] = []
        deadline = time.monotonic() + wait
        while len(out) < n:
            try:
                timeout = deadline - time.monotonic()
                req = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if req is None:
                self._closed = True
                break
            if not req.cancelled:
                out.append(req)
        return out

    def _run(self) -> None:
        try:
            self._schedule()
        except BaseException:  # a bug: nobody may wait forever for an answer
            log.exception("the generation scheduler stopped")
            self._closed = True
            while True:
                try:
                    req = self._queue.get_nowait()
                except queue.Empty:
                    break
                if req is not None:
                    self._fail([req], RequestError(500, "the generation scheduler stopped"))

    def _schedule(self) -> None:
        torch = self._torch
        batch: _Batch | None = None
        with torch.inference_mode():
            while True:
                if batch is None:
                    if self._closed:
                        return
                    first = self._queue.get()
                    if first is None:
                        return
                    if first.cancelled:
                        continue
                    # A short window so requests sent together start together (one prefill).
                    joiners = [first, *self._take(self.max_batch_size - 1, self.batch_wait_s)]
                    batch = self._guarded(joiners, lambda j=joiners: self._prefill(j))
                    if self._closed and batch is not None:
                        self._fail(batch.rows, RequestError(503, "the engine is shut down"))
                        return
                    continue
                free = self.max_batch_size - len(batch.rows)
                if free > 0 and not self._queue.empty() and _mergeable(batch.cache):
                    joiners = self._take(free, 0.0)
                    new = self._guarded(joiners, lambda j=joiners: self._prefill(j))
                    if new is not None:
                        both = batch.rows + new.rows
                        batch = self._guarded(both, lambda a=batch, b=new: self._merge(a, b))
                        if batch is None:
                            continue
                        self.stats["merges"] += 1
                if self._closed:
                    self._fail(batch.rows, RequestError(503, "the engine is shut down"))
                    return
                current = batch
                batch = self._guarded(current.rows, lambda b=current: self._step(b))

    def _guarded(self, rows: list[_Request], work: Callable[[], _Batch | None]) -> _Batch | None:
        """Run prefill/step; on an error fail those rows (others keep going)."""
        try:
            return work()
        except Exception as exc:
            log.exception("generation failed for %d request(s)", len(rows))
            self._fail(rows, exc)
            return None

    @staticmethod
    def _fail(rows: list[_Request], exc: BaseException) -> None:
        for r in rows:
            if not r.finished:
                r.finished = True
                try:
                    r.sink.error(exc)
                except Exception:  # a sink must never take the scheduler down
                    log.exception("request sink failed")

    def _forward(self, ids: Any, mask: Any, pos: Any, cache: Any, rows: list[_Request]) -> Any:
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": pos,
            "use_cache": True,
            self._cache_kw: cache,
        }
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1  # the prefill needs only the last position's logits
        if self._mixed:
            self._route(rows)
        out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[:, -1, :], new_cache

    def _route(self, rows: list[_Request]) -> None:
        """Pick the adapter(s) for this forward. A batch of one adapter (or only the base)
        switches PEFT's active adapter once, then runs plain forwards. A mixed batch hands
        each LoRA layer the per-row adapter names (PEFT's mixed-batch inference): through
        hooks installed once at load (`_install_row_hooks`), not through
        ``model(adapter_names=...)``, which registers and removes a hook on every LoRA
        layer on every forward (~40% of a decode step on the tiny model)."""
        names = {r.adapter for r in rows}
        want = names.pop() if len(names) == 1 else None  # None: mixed
        self._row_names = None if want is not None else [r.adapter for r in rows]
        self.stats["mixed_forwards"] += want is None
        if want == self._active:
            return
        inner = self.model.base_model
        if want == _PEFT_BASE:
            inner.disable_adapter_layers()
        else:
            if self._active == _PEFT_BASE:
                inner.enable_adapter_layers()
            if want is not None:
                self.model.set_adapter(want)
        self._active = want

    def _install_row_hooks(self) -> None:
        from peft.tuners.lora import LoraLayer

        try:
            from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save
        except ImportError:  # older PEFT
            AuxiliaryTrainingWrapper = LoraLayer  # noqa: N806

        def inject(module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
            if self._row_names is not None:
                kwargs["adapter_names"] = self._row_names
            return args, kwargs

        for module in self.model.modules():
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                module.register_forward_pre_hook(inject, with_kwargs=True)

    def _prefill(self, reqs: list[_Request]) -> _Batch | None:
        torch = self._torch
        reqs = [r for r in reqs if not r.cancelled]
        if not reqs:
            return None
        width = max(len(r.ids) for r in reqs)
        ids = torch.full((len(reqs), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.ids) :] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, width - len(r.ids) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        logits, cache = self._forward(ids, mask, pos, None, reqs)
        tokens = self._sample(logits, reqs)
        lengths = torch.tensor([len(r.ids) for r in reqs], device=self.device)
        batch = _Batch(reqs, cache, mask, tokens, lengths)
        return self._advance(batch)

    def _step(self, batch: _Batch) -> _Batch | None:
        torch = self._torch
        ones = torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=batch.mask.device)
        mask = torch.cat([batch.mask, ones], dim=1)
        logits, cache = self._forward(
            batch.next_ids[:, None], mask, batch.positions[:, None], batch.cache, batch.rows
        )
        batch.cache, batch.mask = cache, mask
        batch.next_ids = self._sample(logits, batch.rows)
        batch.positions = batch.positions + 1
        self.stats["steps"] += 1
        self.stats["rows"] += len(batch.rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(batch.rows))
        return self._advance(batch)

    def _advance(self, batch: _Batch) -> _Batch | None:
        """Hand each row its new token, then drop finished and abandoned rows."""
        for r, tok in zip(batch.rows, batch.next_ids.tolist(), strict=True):
            if not r.cancelled:
                self._accept(r, int(tok))
        keep = [i for i, r in enumerate(batch.rows) if not (r.finished or r.cancelled)]
        self.stats["cancelled"] += sum(r.cancelled and not r.finished for r in batch.rows)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            idx = self._torch.tensor(keep, device=self.device)
            batch.cache.batch_select_indices(idx)
            batch.rows = [batch.rows[i] for i in keep]
            batch.mask, batch.next_ids = batch.mask[idx], batch.next_ids[idx]
            batch.positions = batch.positions[idx]
            if _mergeable(batch.cache):
                # Columns that only padding still uses cost attention time: cut them.
                used = batch.mask.any(0).nonzero()
                first = int(used[0]) if len(used) else 0
                if first > 0:
                    batch.mask = batch.mask[:, first:]
                    for layer in batch.cache.layers:
                        layer.keys = layer.keys[..., first:, :]
                        layer.values = layer.values[..., first:, :]
        return batch

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        """One batch from two: the shorter cache is padded on the left (masked out)."""
        torch = self._torch
        ta, tb = a.mask.shape[1], b.mask.shape[1]
        width = max(ta, tb)

        def pad(t: Any, n: int) -> Any:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[-2 if t.dim() == 4 else -1] = n
            zeros = torch.zeros(shape, dtype=t.dtype, device=t.device)
            return torch.cat([zeros, t], dim=-2 if t.dim() == 4 else -1)

        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            la.keys = torch.cat([pad(la.keys, width - ta), pad(lb.keys, width - tb)], dim=0)
            la.values = torch.cat([pad(la.values, width - ta), pad(lb.values, width - tb)], dim=0)
        a.mask = torch.cat([pad(a.mask, width - ta), pad(b.mask, width - tb)], dim=0)
        a.rows = a.rows + b.rows
        a.next_ids = torch.cat([a.next_ids, b.next_ids])
        a.positions = torch.cat([a.positions, b.positions])
        return a

    def _sample(self, logits: Any, rows: list[_Request]) -> Any:
        torch = self._torch
        out = logits.argmax(-1)
        hot = [i for i, r in enumerate(rows) if r.temperature > 0]
        if not hot:
            return out
        idx = torch.tensor(hot, device=logits.device)
        temps = torch.tensor([rows[i].temperature for i in hot], device=logits.device)
        probs = torch.softmax(logits[idx].float() / temps[:, None], dim=-1)
        top_p = torch.tensor([rows[i].top_p for i in hot], device=logits.device)
        if bool((top_p < 1).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always the top token).
            drop = (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(1, order, sorted_p)
        out[idx] = torch.multinomial(probs, 1).squeeze(1)
        return out

    def _accept(self, r: _Request, tok: int) -> None:
        if tok in self._eos:
            self._finish(r, "stop")
            return
        r.generated.append(tok)
        with self._tok_lock:
            text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
        if r.stop:
            start = max(0, len(r.text) - max(len(s) for s in r.stop))
            hits = [i for i in (text.find(s, start) for s in r.stop) if i >= 0]
            if hits:
                r.text = text[: min(hits)]
                self._finish(r, "stop")
                return
        r.text = text
        if len(r.generated) >= r.max_tokens:
            self._finish(r, "length")
            return
        # Hold back an unfinished UTF-8 character and anything a stop string may start.
        safe = len(text.rstrip("\ufffd"))
        if r.stop:
            safe = min(safe, len(text) - max(len(s) for s in r.stop) + 1)
        if safe > r.sent:
            delta, r.sent = text[r.sent : safe], safe
            self._emit(r, delta)

    def _emit(self, r: _Request, delta: str) -> None:
        try:
            r.sink.text(delta)
        except Exception:
            log.exception("request sink failed")
            r.cancelled = True

    def _finish(self, r: _Request, reason: str) -> None:
        r.finished = True
        if len(r.text) > r.sent:
            self._emit(r, r.text[r.sent :])
            r.sent = len(r.text)
        gen = Generation(r.text, reason, len(r.ids), len(r.generated))
        try:
            r.sink.done(gen)
        except Exception:
            log.exception("request sink failed")


def _mergeable(cache: Any) -> bool:
    """A cache whose layers are plain growing key/value tensors (can be padded/merged)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    return all(
        type(layer).__name__ == "DynamicLayer" and getattr(layer, "keys", None) is not None
        for layer in layers
    )


def _plain_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages for a chat template: string content (text parts joined, null -> "")."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(
                400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]"
            )
        if why := role_problem(m["role"]):
            raise RequestError(400, f"messages[{i}].role: {why}", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(parts) != len(content) or not all(isinstance(t, str) for t in parts):
                raise RequestError(
                    400,
                    f"messages[{i}].content parts must be objects with a string 'text'",
                    param=f"messages[{i}].content",
                )
            content = "".join(parts)  # type: ignore[arg-type]
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise RequestError(
                400,
                f"messages[{i}].content must be a string, a list of parts or null",
                param=f"messages[{i}].content",
            )
        out.append({**m, "content": content})
    return out


def resolve_all(
    models: Sequence[str], *, workspace: str | Path | None = None, tracking_uri: str | None = None
) -> dict[str, ServedModel]:
    """Resolve every ``--model``; check they share one base. Returns served name ->
    model, adapters first and the base last (under ``"base"``)."""
    if isinstance(models, str):
        models = [models]
    if not models:
        raise ConfigError("--model: name at least one model to serve")
    out: dict[str, ServedModel] = {}
    base: ServedModel | None = None
    first_spec = ""
    for spec in models:
        s = resolve_served(spec, workspace=workspace, tracking_uri=tracking_uri)
        if base is None:
            base, first_spec = ServedModel(BASE_NAME, None, s.base_model), spec
        elif not _same_base(s.base_model, base.base_model):
            raise ModelError(
                f"--model {spec}: its base model {s.base_model} differs from {base.base_model} "
                f"(of --model {first_spec}); all served adapters must share one base"
            )
        if s.adapter_dir is None:
            continue  # the base itself: always served as "base"
        if s.name in out or s.name == BASE_NAME:
            raise ConfigError(f"--model {spec}: the name {s.name!r} is served twice")
        out[s.name] = s
    assert base is not None
    out[BASE_NAME] = base
    return out


def alias_map(
    served: dict[str, ServedModel],
    models: Sequence[str],
    names: Sequence[str],
    workspace: str | Path | None = None,
    tracking_uri: str | None = None,
) -> dict[str, str]:
    """``--served-model-name`` NAMEs -> the served name of the first ``--model`` they
    stand for (``"base"`` when that is the base model itself)."""
    if not names:
        return {}
    first = resolve_served(models[0], workspace=workspace, tracking_uri=tracking_uri)
    target = first.name if first.adapter_dir else BASE_NAME
    out: dict[str, str] = {}
    for name in names:
        if not name or len(name) > 256 or any(c.isspace() or not c.isprintable() for c in name):
            raise ConfigError(
                f"--served-model-name {name!r}: 1-256 printable characters, no spaces"
            )
        if name in served or name in out:
            raise ConfigError(f"--served-model-name {name}: the name is served twice")
        out[name] = target
    return out


def _same_base(a: str, b: str) -> bool:
    if Path(a).is_dir() and Path(b).is_dir():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _load_tokenizer(served: dict[str, ServedModel], trust_remote_code: bool) -> Any:
    """The base's tokenizer (what the adapters were trained with); an adapter's saved
    tokenizer when the base has none, and an adapter's chat template when the base's
    tokenizer lacks one."""
    from transformers import AutoTokenizer

    base = served[BASE_NAME].base_model
    sources = [base] + [
        s.adapter_dir
        for s in served.values()
        if s.adapter_dir and (Path(s.adapter_dir) / "tokenizer_config.json").is_file()
    ]
    tok = None
    errors = []
    for src in sources:
        try:
            candidate = AutoTokenizer.from_pretrained(
                src, trust_remote_code=trust_remote_code, local_files_only=Path(src).is_dir()
            )
        except Exception as exc:
            errors.append(f"{src}: {_first_line(exc)}")
            continue
        if tok is None:
            tok = candidate
        if getattr(tok, "chat_template", None):
            break
        if getattr(candidate, "chat_template", None):
            tok.chat_template = candidate.chat_template
            break
    if tok is None:
        raise ModelError(f"--model: cannot load a tokenizer ({'; '.join(errors)})")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out, so reusing EOS is safe
    return tok


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --- the HTTP server ---------------------------------------------------------------------


def _reject_from(exc: RequestError) -> _Reject:
    kind = "server_error" if exc.status >= 500 else "invalid_request_error"
    return _Reject(exc.status, exc.message, param=exc.param, code=exc.code, type_=kind)


class _AsyncSink(_Sink):
    """Forwards the scheduler's callbacks into an asyncio queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.stream = stream

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server stopped
            pass

    def text(self, delta: str) -> None:
        if self.stream:
            self._put(("text", delta))

    def done(self, gen: Generation) -> None:
        self._put(("done", gen))

    def error(self, exc: BaseException) -> None:
        self._put(("error", exc))


@dataclass
class _Params:
    model: str
    prompts: list[Prompt]
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool
    include_usage: bool


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _Reject(400, f"'{key}' must be a number in [{lo:g}, {hi:g}]", param=key)
    return float(value)


def _parse(body: Any, chat: bool) -> _Params:
    if not isinstance(body, dict):
        raise _Reject(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Reject(
            400, "'model' is required (a string)", param="model", code="missing_required_parameter"
        )
    prompts: list[Prompt]
    if chat:
        messages = body.get("messages")
        if messages is None:
            raise _Reject(
                400, "'messages' is required", param="messages", code="missing_required_parameter"
            )
        if not isinstance(messages, list) or not messages:
            raise _Reject(400, "'messages' must be a non-empty list of messages", param="messages")
        try:
            prompts = [_plain_messages(messages)]
        except RequestError as exc:
            raise _reject_from(exc) from None
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise _Reject(
                400, "'prompt' is required", param="prompt", code="missing_required_parameter"
            )
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif isinstance(prompt, list) and prompt and all(_is_ids(p) for p in prompt):
            prompts = [list(p) for p in prompt]
        elif _is_ids(prompt):
            prompts = [list(prompt)]
        else:
            raise _Reject(
                400,
                "'prompt' must be a string, a list of strings, token ids or lists of token ids",
                param="prompt",
            )
        if body.get("echo"):
            raise _Reject(400, "'echo' is not supported", param="echo")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise _Reject(400, "only n=1 is supported", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _Reject(400, "'logprobs' is not supported", param="logprobs")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise _Reject(400, f"'{key}' must be a positive integer", param=key)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _Reject(400, f"'stop' must be a string or a list of up to {MAX_STOP}", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _Reject(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _Reject(400, "'stream_options' must be an object", param="stream_options")
    if stream and len(prompts) > 1:
        raise _Reject(400, "streaming takes one prompt per request", param="prompt")
    return _Params(
        model=model,
        prompts=prompts,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),  # OpenAI's default
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=stops,
        stream=bool(stream),
        include_usage=bool(options.get("include_usage")),
    )


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


class Server:
    """The OpenAI-compatible HTTP front of an `Engine` (contract: module docstring).

    ``start()`` serves in a background thread (``port=0`` picks a free port; see `url`);
    ``serve_forever()`` serves in this thread until SIGINT/SIGTERM. The engine is the
    caller's: `stop` does not close it.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        shutdown_timeout: float = 5.0,
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {port}")
        self.engine = engine
        self.host, self.port = host, int(port)
        self.api_key = api_key or None
        self._key = self.api_key.encode() if self.api_key else None
        self.shutdown_timeout = shutdown_timeout
        self._runner: Any = None
        # A thread of its own, or the foreground until a signal (shared with the proxy).
        self._lifecycle = LoopThread(
            self._startup,
            self._shutdown,
            name="simtune-serve",
            join_timeout=self.shutdown_timeout + 30,
        )
        self._created = int(time.time())

    @property
    def url(self) -> str:
        """The ``/v1`` base URL clients use."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    # --- lifecycle ----------------------------------------------------------------------

    async def _startup(self) -> None:
        from aiohttp import web

        from simtune.decisions.proxy import is_loopback

        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = app_runner(
            app, access_log=None, handle_signals=False, shutdown_timeout=self.shutdown_timeout
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(
                f"--host/--port: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if not is_loopback(self.host):
            log.warning(
                "listening on %s, not loopback: anyone who can reach this address can use the "
                "model%s",
                self.host,
                "" if self.api_key else " (set --api-key to require a key)",
            )
        log.info("serving %s at %s", ", ".join(self.engine.names), self.url)

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> Server:
        """Serve in a background thread; returns once listening (`port` is then set)."""
        self._lifecycle.start()
        return self

    def stop(self) -> None:
        """Stop serving (requests in flight get `shutdown_timeout` to finish)."""
        self._lifecycle.stop()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT or SIGTERM, then shut down cleanly."""
        self._lifecycle.run_until_signal("stopping")

    # --- requests -----------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        try:
            path = request.path.rstrip("/")
            if path == "/health":
                return web.json_response(self._health(request))
            if not path.startswith("/v1/"):
                raise _Reject(404, f"unknown path {request.path!r}", code="not_found")
            self._check_key(request)
            endpoint = path[4:]
            if endpoint in ("chat/completions", "completions"):
                if request.method != "POST":
                    raise _Reject(405, f"{path} takes POST, not {request.method}", code="method")
                return await self._completion(request, endpoint == "chat/completions")
            if endpoint == "models" or endpoint.startswith("models/"):
                if request.method != "GET":
                    raise _Reject(405, f"{path} takes GET, not {request.method}", code="method")
                return self._models(endpoint[len("models/") :] if "/" in endpoint else None)
            raise _Reject(404, f"unknown path {request.path!r}", code="not_found")
        except _Reject as exc:
            return error_response(exc)
        except RequestError as exc:
            return error_response(_reject_from(exc))
        except ConnectionError as exc:  # the client hung up (mid-body, say): not a bug
            log.info("client hung up during %s %s (%s)", request.method, request.path, exc)
            return error_response(_Reject(400, "the client hung up", code="client_gone"))
        except Exception:  # a bug: the client still gets an OpenAI-style answer
            log.exception("server error on %s %s", request.method, request.path)
            return error_response(
                _Reject(500, "internal error in simtune serve", type_="server_error")
            )

    def _check_key(self, request: web.Request) -> None:
        check_api_key(
            request.headers,
            self._key,
            "missing or wrong API key (send Authorization: Bearer KEY)",
        )

    def _health(self, request: web.Request) -> dict[str, Any]:
        """``{"status": "ok"}`` for anyone; the served names only with the key (when set)."""
        try:
            self._check_key(request)
        except _Reject:
            return {"status": "ok"}
        return {"status": "ok", "models": self.engine.names}

    def _model_card(self, name: str) -> dict[str, Any]:
        s = self.engine.served[name]
        return {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "simtune",
            "root": s.base_model,
            "parent": None if s.adapter_dir is None else BASE_NAME,
        }

    def _models(self, one: str | None) -> web.Response:
        from aiohttp import web

        if one is None:
            data = [self._model_card(n) for n in self.engine.names]
            return web.json_response({"object": "list", "data": data})
        if one not in self.engine.served:
            raise _Reject(
                404, f"the model {one!r} is not served here", param="model", code="model_not_found"
            )
        return web.json_response(self._model_card(one))

    async def _completion(self, request: web.Request, chat: bool) -> web.StreamResponse:
        from aiohttp import web

        if request.content_length is not None and request.content_length > MAX_BODY:
            raise _Reject(413, "request body over 16 MiB", code="request_too_large")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _Reject(413, "request body over 16 MiB", code="request_too_large") from None
        p = _parse(parse_body(raw), chat)
        if p.model not in self.engine.served:
            raise _Reject(
                404,
                f"the model {p.model!r} is not served here; served: {', '.join(self.engine.names)}",
                param="model",
                code="model_not_found",
            )
        loop = asyncio.get_running_loop()
        sinks = [_AsyncSink(loop, p.stream) for _ in p.prompts]
        # Tokenize (and refuse a bad prompt) before queueing any; submit takes the ids.
        # Off the event loop: a long prompt takes seconds, and other clients are waiting.
        encoded = await loop.run_in_executor(
            None, lambda: [self.engine.encode(p.model, prompt) for prompt in p.prompts]
        )
        reqs = [
            self.engine.submit(
                p.model,
                prompt,
                sink,
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                stop=p.stop,
            )
            for prompt, sink in zip(encoded, sinks, strict=True)
        ]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if p.stream:
            return await self._stream(request, chat, p, rid, reqs[0], sinks[0])
        results: list[Generation] = []
        try:
            for sink in sinks:
                while True:
                    try:
                        kind, value = await asyncio.wait_for(sink.queue.get(), timeout=0.5)
                    except TimeoutError:
                        if request.transport is None or request.transport.is_closing():
                            raise ConnectionResetError from None  # client gone: free the rows
                        continue
                    if kind == "error":
                        raise value
                    if kind == "done":
                        results.append(value)
                        break
        except ConnectionResetError:
            for r in reqs:
                self.engine.cancel(r)
            log.debug("client disconnected before its answer; request abandoned")
            return web.Response(status=499)
        except RequestError as exc:
            for r in reqs:
                self.engine.cancel(r)
            raise _reject_from(exc) from None
        except BaseException:
            for r in reqs:
                self.engine.cancel(r)
            raise
        choices = []
        for i, g in enumerate(results):
            choice: dict[str, Any] = {
                "index": i,
                "finish_reason": g.finish_reason,
                "logprobs": None,
            }
            if chat:
                choice["message"] = {"role": "assistant", "content": g.text}
            else:
                choice["text"] = g.text
            choices.append(choice)
        prompt_tokens = sum(g.prompt_tokens for g in results)
        completion_tokens = sum(g.completion_tokens for g in results)
        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": p.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    async def _stream(
        self,
        request: web.Request,
        chat: bool,
        p: _Params,
        rid: str,
        req: _Request,
        sink: _AsyncSink,
    ) -> web.StreamResponse:
        from aiohttp import web

        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            choice.update(finish_reason=finish, logprobs=None)
            payload = {"id": rid, "object": obj, "created": created, "model": p.model}
            payload["choices"] = [choice]
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await resp.prepare(request)
            if chat:
                await resp.write(chunk("", None, first=True))
            while True:
                kind, value = await sink.queue.get()
                if kind == "text":
                    await resp.write(chunk(value, None))
                    continue
                if kind == "error":
                    exc = value
                    err = (
                        error_body(exc.message, type_="invalid_request_error", code=exc.code)
                        if isinstance(exc, RequestError)
                        else error_body("generation failed in simtune serve", type_="server_error")
                    )
                    await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                    break
                gen: Generation = value
                await resp.write(chunk(None if chat else "", gen.finish_reason))
                if p.include_usage:
                    usage = {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": p.model,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": gen.prompt_tokens,
                            "completion_tokens": gen.completion_tokens,
                            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
                        },
                    }
                    await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
                break
            await resp.write_eof()
        except ConnectionError:
            # The client hung up: free its batch row; everyone else carries on.
            self.engine.cancel(req)
            log.debug("client disconnected mid-stream; request abandoned")
        except asyncio.CancelledError:  # server shutting down
            self.engine.cancel(req)
            raise
        return resp


# --- `simtune serve` --------------------------------------------------------------------


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def choose_backend(backend: str) -> str:
    """``auto`` -> ``vllm`` when vllm is importable and a CUDA GPU is present."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "vllm":
        if not vllm_installed():
            raise ConfigError(
                "--backend vllm: vllm is not installed (pip install vllm; it needs a CUDA GPU); "
                "use --backend transformers"
            )
        return "vllm"
    if backend == "auto" and vllm_installed():
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The only ``--max-lora-rank`` values vLLM accepts."""


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank` (adapters of lower rank load fine)."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ConfigError(
        f"--backend vllm: an adapter has LoRA rank {rank}; vLLM serves ranks up to "
        f"{VLLM_LORA_RANKS[-1]} (use --backend transformers)"
    )


def vllm_env(api_key: str | None, device: str | None, base: dict[str, str]) -> dict[str, str]:
    """The environment of vLLM's server: the API key goes here (``VLLM_API_KEY``, which
    vLLM reads), never on the command line where ``ps`` shows it to every user."""
    env = dict(base)
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if device and device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    return env


def vllm_command(
    served: dict[str, ServedModel],
    *,
    host: str,
    port: int,
    max_batch_size: int,
    trust_remote_code: bool = False,
) -> list[str]:
    """The argument list (no shell) of vLLM's OpenAI server for base + adapters (the API
    key is passed in the environment: `vllm_env`)."""
    base = served[BASE_NAME].base_model
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base]
    cmd += ["--served-model-name", BASE_NAME, "--host", host, "--port", str(port)]
    cmd += ["--max-num-seqs", str(max_batch_size)]
    adapters = [s for s in served.values() if s.adapter_dir]
    if adapters:
        ranks = []
        for s in adapters:
            try:
                cfg = json.loads((Path(str(s.adapter_dir)) / "adapter_config.json").read_text())
                ranks.append(int(cfg.get("r") or 16))
            except (OSError, ValueError, TypeError):
                ranks.append(16)
        cmd += ["--enable-lora", "--max-loras", str(len(adapters))]
        cmd += ["--max-lora-rank", str(vllm_lora_rank(max(ranks)))]
        cmd += ["--lora-modules", *(f"{s.name}={s.adapter_dir}" for s in adapters)]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def check_port_free(host: str, port: int) -> None:
    """Fail in milliseconds, before a model is loaded, when the port is taken."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"--host/--port: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None


def serve(
    models: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    backend: str = "auto",
    workspace: str | Path | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    max_batch_size: int = 8,
    max_new_tokens: int | None = None,
    trust_remote_code: bool = False,
    served_model_names: Sequence[str] = (),
) -> None:
    """`simtune serve`: resolve, check the port, load, serve until SIGINT/SIGTERM.
    `served_model_names` (``--served-model-name``, as in vLLM) are more names for the
    first ``--model``."""
    if max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    chosen = choose_backend(backend)
    served = resolve_all(models, workspace=workspace, tracking_uri=tracking_uri)
    aliases = alias_map(served, models, served_model_names, workspace, tracking_uri)
    check_port_free(host, port)
    if chosen == "vllm":
        cmd = vllm_command(
            served,
            host=host,
            port=port,
            max_batch_size=max_batch_size,
            trust_remote_code=trust_remote_code,
        )
        for alias, target in aliases.items():
            if target == BASE_NAME:
                cmd.insert(cmd.index("--served-model-name") + 2, alias)
            else:
                cmd += ["--lora-modules", f"{alias}={served[target].adapter_dir}"]
        _run_vllm(cmd, vllm_env(api_key, device, dict(os.environ)))
        return
    engine = Engine._load_resolved(
        served,
        device=device,
        precision=precision,
        max_batch_size=max_batch_size,
        max_new_tokens=max_new_tokens,
        trust_remote_code=trust_remote_code,
    )
    engine.add_aliases(aliases)
    try:
        Server(engine, host=host, port=port, api_key=api_key).serve_forever()
    finally:
        engine.close()


def _run_vllm(cmd: list[str], env: dict[str, str]) -> None:
    """Run vLLM's server in the foreground; SIGINT/SIGTERM are passed on to it."""
    log.info("starting vLLM: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)  # noqa: S603 (argument list, no shell)

    def forward(signum: int, frame: Any) -> None:
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if code not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise SimtuneError(f"--backend vllm: vLLM exited with status {code} (see its log above)")
