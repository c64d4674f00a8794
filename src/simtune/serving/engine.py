"""The batching engine: a base model with LoRA adapters attached by name, generating in
batches on one scheduler thread (continuous batching; see `simtune.serving.server` for
the design and the measured figures). It knows nothing of HTTP: what it refuses or
cannot finish is an `EngineError` saying what went wrong (`UnknownModel`,
`InvalidPrompt`, `PromptTooLong`, `EngineClosed`, `SchedulerFailed`); the server maps
those to HTTP statuses.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simtune.errors import ConfigError, ModelError, SimtuneError
from simtune.openai.protocol import ProtocolError, check_messages, template_messages
from simtune.serving.models import BASE_NAME, ServedModel, resolve_all
from simtune.util import first_line

log = logging.getLogger(__name__)


MAX_STOP = 4

_PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch

Prompt = str | list[dict[str, Any]] | list[int]

# Answer cap when neither the request, --max-new-tokens nor the model config's context
# length (max_position_embeddings) gives one.
UNKNOWN_CONTEXT_TOKENS = 4096


@dataclass
class Generation:
    text: str
    finish_reason: str
    """``"stop"`` (end of sequence or a stop string) or ``"length"`` (token limit)."""
    prompt_tokens: int
    completion_tokens: int


class EngineError(SimtuneError):
    """A request the engine refuses or cannot finish. `param` names the request field
    at fault (OpenAI's ``param``: ``model``, ``prompt``, ``messages[0].content``),
    `code` a machine-readable reason (OpenAI's ``code``) where there is one."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class UnknownModel(EngineError):
    """The request names a model that is not served."""


class InvalidPrompt(EngineError):
    """A prompt the engine cannot take: malformed messages, token ids outside the
    vocabulary, nothing to generate from, chat messages without a chat template."""


class PromptTooLong(InvalidPrompt):
    """A prompt that does not fit in the model's context."""


class EngineClosed(EngineError):
    """The engine was shut down before the request could be served."""


class SchedulerFailed(EngineError):
    """The scheduler thread died (a bug): requests still waiting get this."""


class Sink:
    """Where a request's output goes: `text` per streamed piece, then `done` or `error`.
    Called from the scheduler thread."""

    def text(self, delta: str) -> None:  # noqa: B027 (optional hook)
        pass

    def done(self, gen: Generation) -> None:
        raise NotImplementedError

    def error(self, exc: BaseException) -> None:
        raise NotImplementedError


class EngineRequest:
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
        sink: Sink,
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

    def __init__(self, rows: list[EngineRequest], cache: Any, mask: Any, next_ids: Any, pos: Any):
        self.rows, self.cache, self.mask = rows, cache, mask
        self.next_ids = next_ids  # [B] the token each row generated last, not yet in the cache
        self.positions = pos  # [B] that token's position id


class _Waiter(Sink):
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
        self._queue: queue.Queue[EngineRequest | None] = queue.Queue()
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
            raise ModelError(f"--model: cannot load base model {base}: {first_line(exc)}") from None
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
                        f"{first_line(exc)}"
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

    def encode(
        self, model: str, prompt: Prompt, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of a prompt: a string is raw text, a message list is rendered with the
        chat template (generation prompt added; `tools`, checked tool schemas, passed to
        it), a list of ints is used as is."""
        if model not in self.served:
            raise UnknownModel(
                f"the model {model!r} is not served here; served: {', '.join(self.names)}",
                param="model",
                code="model_not_found",
            )
        tok = self.tokenizer
        param = "messages" if isinstance(prompt, list) and not is_token_ids(prompt) else "prompt"
        with self._tok_lock:
            if isinstance(prompt, str):
                self._check_chars(prompt, param)
                ids = tok(prompt, add_special_tokens=True)["input_ids"]
            elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                ids = [int(t) for t in prompt]  # type: ignore[arg-type]
                if max(ids) >= len(tok) or min(ids) < 0:
                    raise InvalidPrompt("token id out of the vocabulary", param="prompt")
            else:
                if not getattr(tok, "chat_template", None):
                    raise InvalidPrompt(
                        "this model's tokenizer has no chat template; use /v1/completions",
                        param="messages",
                    )
                try:  # a chat template takes text: content parts joined, null as ""
                    messages = check_messages(prompt, flatten=True)
                except ProtocolError as exc:
                    raise InvalidPrompt(exc.message, param=exc.param, code=exc.code) from None
                self._check_chars("".join(m["content"] for m in messages), param)
                text = tok.apply_chat_template(
                    template_messages(messages),
                    tools=tools or None,
                    add_generation_prompt=True,
                    tokenize=False,
                )
                ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidPrompt("the prompt is empty", param="prompt")
        if self.context_length and len(ids) >= self.context_length:
            raise PromptTooLong(
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
            raise PromptTooLong(
                f"the prompt is {len(text)} characters: more than fit in the model's context "
                f"of {self.context_length} tokens",
                param=param,
                code="context_length_exceeded",
            )

    def submit(
        self,
        model: str,
        prompt: Prompt,
        sink: Sink,
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
    ) -> EngineRequest:
        """Queue one generation; `sink` receives its text pieces and result (from the
        scheduler thread). Raises an `EngineError` on a bad request."""
        if self._closed:
            raise EngineClosed("the engine is shut down", code="unavailable")
        ids = self.encode(model, prompt)
        caps = [c for c in (max_tokens, self.max_new_tokens) if c is not None]
        if self.context_length:
            caps.append(self.context_length - len(ids))
        limit = min(int(c) for c in caps) if caps else UNKNOWN_CONTEXT_TOKENS
        req = EngineRequest(
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
    def cancel(req: EngineRequest) -> None:
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
        tools: list[dict[str, Any]] | None = None,
    ) -> list[Generation]:
        """Generate one answer per prompt (batched with whatever else is running).
        Thread-safe. `max_tokens` is clipped to the engine's ``max_new_tokens``; `tools`
        (checked tool schemas) go to the chat template of message prompts, and
        `parse_tool_calls` reads calls out of the answers."""
        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = [self.encode(model, p, tools) for p in prompts]  # refuse before queueing any
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
                req.sink.error(EngineClosed("the engine is shut down", code="unavailable"))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- scheduler thread -----------------------------------------------------------

    def _take(self, n: int, wait: float) -> list[EngineRequest]:
        """Up to `n` waiting requests, waiting at most `wait` s for more to arrive."""
        out: list[EngineRequest] = []
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
                    self._fail([req], SchedulerFailed("the generation scheduler stopped"))

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
                        self._fail(batch.rows, EngineClosed("the engine is shut down"))
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
                    self._fail(batch.rows, EngineClosed("the engine is shut down"))
                    return
                current = batch
                batch = self._guarded(current.rows, lambda b=current: self._step(b))

    def _guarded(
        self, rows: list[EngineRequest], work: Callable[[], _Batch | None]
    ) -> _Batch | None:
        """Run prefill/step; on an error fail those rows (others keep going)."""
        try:
            return work()
        except Exception as exc:
            log.exception("generation failed for %d request(s)", len(rows))
            self._fail(rows, exc)
            return None

    @staticmethod
    def _fail(rows: list[EngineRequest], exc: BaseException) -> None:
        for r in rows:
            if not r.finished:
                r.finished = True
                try:
                    r.sink.error(exc)
                except Exception:  # a sink must never take the scheduler down
                    log.exception("request sink failed")

    def _forward(self, ids: Any, mask: Any, pos: Any, cache: Any, rows: list[EngineRequest]) -> Any:
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

    def _route(self, rows: list[EngineRequest]) -> None:
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

    def _prefill(self, reqs: list[EngineRequest]) -> _Batch | None:
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

    def _sample(self, logits: Any, rows: list[EngineRequest]) -> Any:
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

    def _accept(self, r: EngineRequest, tok: int) -> None:
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

    def _emit(self, r: EngineRequest, delta: str) -> None:
        try:
            r.sink.text(delta)
        except Exception:
            log.exception("request sink failed")
            r.cancelled = True

    def _finish(self, r: EngineRequest, reason: str) -> None:
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
            errors.append(f"{src}: {first_line(exc)}")
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


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tags_tool_calls(tokenizer: Any) -> bool:
    """Whether the chat template writes tool calls as ``<tool_call>{json}</tool_call>``
    (Qwen2.5, Hermes, SmolLM3 and the tiny model's template do): the convention
    `parse_tool_calls` reads. A template with another one (Llama 3.1's bare JSON,
    Mistral's ``[TOOL_CALLS]``) gets its answers back as text."""
    return TOOL_CALL_OPEN in (getattr(tokenizer, "chat_template", None) or "")


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]] | None:
    """A generated answer's tool calls: (the text outside the ``<tool_call>`` tags,
    stripped; the calls in OpenAI's shape, ``arguments`` as JSON text, a fresh ``id``
    each), or None when the answer is not a tool call -- no tags, an unclosed one, or a
    block that is not ``{"name": str, "arguments": object}`` (then the answer is text:
    half a call is not one)."""
    if TOOL_CALL_OPEN not in text:
        return None
    calls = []
    for block in _TOOL_CALL.findall(text):
        try:
            obj = json.loads(block)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args = obj.get("arguments", {})
        if isinstance(args, str):  # a model may write the wire's JSON text
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {
                    "name": obj["name"],
                    "arguments": json.dumps(args, ensure_ascii=False),
                },
            }
        )
    rest = _TOOL_CALL.sub("", text)
    if not calls or TOOL_CALL_OPEN in rest or TOOL_CALL_CLOSE in rest:
        return None
    return rest.strip(), calls


def is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )
