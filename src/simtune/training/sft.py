"""SFT recipe: imitate good decisions with a LoRA adapter and TRL's SFTTrainer.

Read top to bottom: decisions -> tokenized prompt/completion examples -> SFTTrainer
with a PEFT LoRA config (or the adapter being continued) -> adapter saved.

We tokenize ourselves (the same way TRL does for conversational prompt/completion
rows: chat template with a generation prompt, completion = the rest) because TRL only
truncates from the right, which would cut off the answer -- the only part the loss
sees -- whenever a simulation prompt is long. We cut long prompts from the left
instead, keeping the instruction that simulators put last.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simtune.config import TuningConfig
from simtune.decisions.schema import Decision
from simtune.errors import DataError
from simtune.openai.protocol import calls_text, template_messages

log = logging.getLogger(__name__)


@dataclass
class Examples:
    input_ids: list[list[int]]
    completion_mask: list[list[int]]
    truncated_prompts: int
    num_tokens: int
    num_completion_tokens: int


def chat_ids(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of `messages` (OpenAI's shape: tool calls as the wire has them) rendered
    by the chat template, with `tools` (the tool schemas) where given."""
    out = tokenizer.apply_chat_template(
        template_messages(messages),
        tools=tools or None,
        add_generation_prompt=generation_prompt,
        tokenize=True,
        return_dict=False,
    )
    return list(out)


def split_prompt_answer(
    tokenizer: Any,
    prompt: list[dict[str, Any]],
    answer: str | dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of chat-template(prompt + assistant answer), split into (prompt, answer)
    where the prompt rendered alone with a generation prompt diverges (TRL's rule):
    usually right after the generation prompt. `answer` is the text, or the assistant
    message (with its ``tool_calls``: `Decision.target_message`)."""
    message = answer if isinstance(answer, dict) else {"role": "assistant", "content": answer}
    p_ids = chat_ids(tokenizer, prompt, True, tools)
    full = chat_ids(tokenizer, [*prompt, message], False, tools)
    cut = 0
    for a, b in zip(p_ids, full, strict=False):
        if a != b:
            break
        cut += 1
    return full[:cut], full[cut:]


_PROBE = "simtune_probe_tool"
_WARNED: set[str] = set()


def tool_support(tokenizer: Any) -> tuple[bool, bool]:
    """(renders ``tools``, renders assistant ``tool_calls``): whether the chat template
    shows the model the tool schemas and the calls, found by rendering a probe (a
    template that ignores them, or fails on them, would train without them)."""
    template = getattr(tokenizer, "chat_template", None)
    cache = getattr(tokenizer, "_simtune_tool_support", None)
    if cache is not None and cache[0] == template:
        return cache[1]
    user = {"role": "user", "content": "x"}
    tool = {"type": "function", "function": {"name": _PROBE, "parameters": {"type": "object"}}}
    call = {"id": "c0", "type": "function", "function": {"name": _PROBE, "arguments": {}}}

    def renders(messages: list[dict[str, Any]], tools: Any) -> bool:
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        except Exception:  # a template that refuses the shape does not support it
            return False
        return isinstance(text, str) and _PROBE in text

    found = (
        renders([user], [tool]),
        renders([user, {"role": "assistant", "content": "", "tool_calls": [call]}], None),
    )
    try:
        tokenizer._simtune_tool_support = (template, found)
    except AttributeError:
        pass
    return found


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


def _calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant turn's tool calls as JSON text after its content (what tool-call
    answers were trained on before templates got them), for a template without them."""
    content = message.get("content") or ""
    text = calls_text(message["tool_calls"])
    rest = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**rest, "content": f"{content}\n{text}" if content else text}


def render_parts(
    d: Decision, tokenizer: Any, system_prompt: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]] | None]:
    """(prompt messages, answer message, tools) of a decision as this tokenizer's chat
    template can take them. With a template that ignores ``tools`` they are dropped
    (warned once: the model trains without seeing the schemas); with one that ignores
    ``tool_calls`` the calls become JSON text (warned once), so the answer is not lost."""
    prompt = d.chat_prompt(system_prompt)
    answer = d.target_message()
    tools = d.tools
    has_calls = "tool_calls" in answer or any(m.get("tool_calls") for m in prompt)
    if not tools and not has_calls:
        return prompt, answer, None
    shows_tools, shows_calls = tool_support(tokenizer)
    if tools and not shows_tools:
        _warn_once(
            "tools",
            "the chat template ignores 'tools': decisions' tool schemas are dropped from "
            "the training prompts (use a model whose template supports tools)",
        )
        tools = None
    if has_calls and not shows_calls:
        _warn_once(
            "tool_calls",
            "the chat template ignores assistant 'tool_calls': tool calls are trained on "
            "as JSON text (use a model whose template supports tools)",
        )
        prompt = [_calls_as_text(m) if m.get("tool_calls") else m for m in prompt]
        if "tool_calls" in answer:
            answer = _calls_as_text(answer)
    return prompt, answer, tools


def build_examples(
    decisions: list[Decision],
    tokenizer: Any,
    cfg: TuningConfig,
    *,
    cache_dir: Path | None = None,
    batch_size: int = 256,
) -> Examples:
    """Chat-template each decision into (input_ids, completion_mask), answer-preserving.

    Tokenizes in batches (a fast tokenizer encodes a batch on all cores, in Rust) and
    caches the result in `cache_dir` (default: ``<workspace>/cache/examples`` when a
    workspace is set, by `cfg.workspace` or $SIMTUNE_HOME; no cache otherwise), keyed by
    `examples_cache_key`: a second build of the same data with the same tokenizer,
    template and options reads the file instead of tokenizing."""
    if cache_dir is None and (cfg.workspace or os.environ.get("SIMTUNE_HOME")):
        cache_dir = cfg.workspace_path() / "cache" / "examples"
    cache: Path | None = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"{examples_cache_key(decisions, tokenizer, cfg)}.json"
        cached = _load_examples(cache)
        if cached is not None:
            log.info("tokenized examples: cache hit (%s)", cache)
            return cached
        log.info("tokenized examples: cache miss; tokenizing %d decision(s)", len(decisions))
    input_ids: list[list[int]] = []
    masks: list[list[int]] = []
    truncated = 0
    n_tok = n_comp = 0
    for lo in range(0, len(decisions), batch_size):
        batch = decisions[lo : lo + batch_size]
        p_batch, full_batch = _render_batch(batch, tokenizer, cfg.system_prompt)
        for d, p_ids, full in zip(batch, p_batch, full_batch, strict=True):
            cut = _common_prefix(p_ids, full)
            prompt_part, answer = full[:cut], full[cut:]
            if not answer:
                raise DataError(
                    "the chat template renders no answer tokens", path=d.source, field="output"
                )
            budget = cfg.max_length - len(answer)
            if budget < 1:
                # The answer alone overflows: keep its start and a token of prompt.
                answer = answer[: cfg.max_length - 1]
                budget = 1
            if len(prompt_part) > budget:
                truncated += 1
                prompt_part = prompt_part[len(prompt_part) - budget :]
            ids = prompt_part + answer
            input_ids.append(ids)
            masks.append([0] * len(prompt_part) + [1] * len(answer))
            n_tok += len(ids)
            n_comp += len(answer)
    if truncated:
        log.warning(
            "%d prompt(s) longer than --max_length %d were cut from the left",
            truncated,
            cfg.max_length,
        )
    examples = Examples(input_ids, masks, truncated, n_tok, n_comp)
    if cache is not None:
        _save_examples(cache, examples)
    return examples


def _render_batch(
    batch: list[Decision], tokenizer: Any, system_prompt: str | None
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids with the generation prompt, prompt + answer ids) of each decision.
    One template call per distinct tool list (``tools`` is one argument per call):
    decisions without tools -- the usual case -- are still one batch."""
    groups: dict[str, list[int]] = {}
    parts = [render_parts(d, tokenizer, system_prompt) for d in batch]
    for i, (_, _, tools) in enumerate(parts):
        key = "" if not tools else json.dumps(tools, sort_keys=True, ensure_ascii=False)
        groups.setdefault(key, []).append(i)
    p_out: list[list[int]] = [[] for _ in batch]
    full_out: list[list[int]] = [[] for _ in batch]
    for rows in groups.values():
        tools = parts[rows[0]][2]
        prompts = [parts[i][0] for i in rows]
        p_ids = batch_chat_ids(tokenizer, prompts, True, tools)
        full = batch_chat_ids(tokenizer, [[*parts[i][0], parts[i][1]] for i in rows], False, tools)
        for i, p, f in zip(rows, p_ids, full, strict=True):
            p_out[i], full_out[i] = p, f
    return p_out, full_out


def batch_chat_ids(
    tokenizer: Any,
    conversations: list[list[dict[str, Any]]],
    generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> list[list[int]]:
    """`chat_ids` of many conversations in one call (the same ids: transformers renders
    each and encodes the batch with the backend tokenizer)."""
    if not conversations:
        return []
    out = tokenizer.apply_chat_template(
        [template_messages(c) for c in conversations],
        tools=tools or None,
        add_generation_prompt=generation_prompt,
        tokenize=True,
        return_dict=False,
    )
    if hasattr(out, "keys"):  # a BatchEncoding on some versions
        out = out["input_ids"]
    return [list(ids) for ids in out]


def _common_prefix(a: list[int], b: list[int]) -> int:
    cut = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        cut += 1
    return cut


_CACHE_FORMAT = 2  # 2: tools and tool calls are part of the rendered text


def examples_cache_key(decisions: list[Decision], tokenizer: Any, cfg: TuningConfig) -> str:
    """sha256 of everything `build_examples`' output depends on: the tokenized text of
    each decision (its chat prompt with the system prompt, and its target: so selection,
    filters and folded events all count, not just the files), max_length, the tokenizer
    (its full serialization when fast, else its vocabulary and settings), its chat
    template, and the simtune version. Hashing costs ~1 s per GB of text."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    try:
        simtune_version = version("simtune")
    except PackageNotFoundError:
        simtune_version = "?"
    head = {
        "format": _CACHE_FORMAT,
        "simtune": simtune_version,
        "max_length": cfg.max_length,
        "system_prompt": cfg.system_prompt,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "tokenizer_class": type(tokenizer).__name__,
        "special_tokens": getattr(tokenizer, "special_tokens_map", None),
    }
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for d in decisions:
        h.update(b"\x1e")
        rendered = [d.chat_prompt(cfg.system_prompt), d.target_message(), d.tools]
        h.update(json.dumps(rendered, ensure_ascii=False).encode())
    return h.hexdigest()


def _load_examples(path: Path) -> Examples | None:
    """The cached examples, or None (missing, or unreadable: then rebuilt and rewritten)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ids, masks = data["input_ids"], data["completion_mask"]
        return Examples(
            ids,
            masks,
            int(data["truncated_prompts"]),
            sum(len(x) for x in ids),
            sum(sum(m) for m in masks),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring an unreadable examples cache %s: %s", path, exc)
        return None


def _save_examples(path: Path, examples: Examples) -> None:
    """JSON (not pickle: a cache file must never run code), written through a temporary
    file and a rename so a concurrent or killed job never leaves half a file."""

    data = {
        "input_ids": examples.input_ids,
        "completion_mask": examples.completion_mask,
        "truncated_prompts": examples.truncated_prompts,
    }
    try:
        from simtune.util import write_json_atomic

        write_json_atomic(path, data, compact=True, fsync=False)
    except OSError as exc:  # a cache is an optimisation: never fail the job over it
        log.warning("could not write the examples cache %s: %s", path, exc)


def lora_config(cfg: TuningConfig, task_type: str = "CAUSAL_LM", **extra: Any) -> Any:
    from peft import LoraConfig

    targets: Any = cfg.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        bias="none",
        **extra,
    )


def training_arguments(args_cls: type, cfg: TuningConfig, output_dir: Path, **extra: Any) -> Any:
    """`args_cls` (TrainingArguments or a TRL subclass) filled from our config: the one
    place that maps simtune options onto Hugging Face names across versions."""
    import dataclasses

    import torch

    from simtune.training.model import resolve_precision

    precision = resolve_precision(cfg.requested_precision())
    names = {f.name for f in dataclasses.fields(args_cls)}
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio) ...
    warmup = "warmup_ratio" if "warmup_ratio" in names else "warmup_steps"
    # ... and renamed gradient_checkpointing to activation_checkpointing.
    ckpt = (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )
    checkpointing: dict[str, Any] = {ckpt: cfg.gradient_checkpointing}
    if cfg.gradient_checkpointing:
        checkpointing[f"{ckpt}_kwargs"] = {"use_reentrant": False}
    return args_cls(
        **{warmup: cfg.warmup_ratio},
        **checkpointing,
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        # Two, not one: a job SIGKILLed while writing checkpoint N still has N - save_steps
        # complete (simtune's resume skips a checkpoint without trainer_state.json).
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision.name == "bf16",
        fp16=precision.name == "fp16",
        # The Trainer refuses bf16 on a CPU unless told it trains there.
        use_cpu=precision.device == "cpu",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        **({"deepspeed": cfg.deepspeed} if cfg.deepspeed else {}),
        # LoRA (and a reward head) use every trainable parameter in every forward;
        # DDP's search for unused ones would only cost a graph traversal per step.
        ddp_find_unused_parameters=False,
        **extra,
    )


def sft_args(cfg: TuningConfig, output_dir: Path) -> Any:
    """TRL SFTConfig from our config."""
    from trl import SFTConfig

    return training_arguments(
        SFTConfig,
        cfg,
        output_dir,
        padding_free=cfg.padding_free,
        max_length=cfg.max_length,
        completion_only_loss=True,
        remove_unused_columns=True,
        save_only_model=False,
    )


def train_sft(
    cfg: TuningConfig,
    examples: Examples,
    model: Any,
    tokenizer: Any,
    work_dir: Path,
    callbacks: list[Any],
    *,
    resume_from: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], Any]:
    """Run SFTTrainer; returns (summary metrics, the trained PEFT model).

    Checkpoints go to `work_dir/checkpoints/checkpoint-<step>` every `save_steps`.
    `resume_from` (a checkpoint dir) restores adapter, optimizer, scheduler, RNG and
    data position; `should_stop()` turning true makes the trainer save a checkpoint at
    the end of the current step and return early (see `StopOnRequest`)."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTTrainer

    from simtune.training.model import fp32_trainable, resolve_precision

    train = Dataset.from_dict(
        {"input_ids": examples.input_ids, "completion_mask": examples.completion_mask}
    )
    trainer = SFTTrainer(
        model=model,
        args=sft_args(cfg, work_dir / "checkpoints"),
        train_dataset=train,
        processing_class=tokenizer,
        # A model that already carries an adapter (continued training) keeps it.
        peft_config=None if isinstance(model, PeftModel) else lora_config(cfg),
        callbacks=[*callbacks, *([stop_callback(should_stop)] if should_stop else [])],
    )
    fp32_trainable(trainer.model)
    levers = speed_levers(trainer, resolve_precision(cfg.requested_precision()), examples)
    log.info("SFT speed levers: %s", ", ".join(f"{k} {v}" for k, v in levers.items()))
    _quiet_progress(trainer)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        # The trained model may run outside the Trainer's autocast from here on.
        set_lora_input_casting(trainer.model, True)
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics.update(train_loss=float(result.training_loss), global_step=float(result.global_step))
    return metrics, trainer.model


def stop_callback(should_stop: Callable[[], bool]) -> Any:
    """A TrainerCallback that, once `should_stop()` is true (a SIGTERM/Ctrl-C was
    caught), saves a full checkpoint at the end of the current optimizer step and ends
    training. Checking at step ends costs nothing; the price is that a stop waits for
    the step in flight (seconds), which is what makes the checkpoint consistent."""
    from transformers import TrainerCallback

    class StopOnRequest(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if should_stop():
                # The Trainer honours should_save even with save_strategy "no".
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopOnRequest()


def _quiet_progress(trainer: Any) -> None:
    """Keep the progress bar (stderr) but show loss on it instead of printing every log
    dict to stdout, which would interleave with `--json` output."""
    from transformers.trainer_callback import ProgressCallback

    class LossOnBar(ProgressCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any
        ) -> None:
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LossOnBar())


EAGER_ATTENTION_MAX_TOKENS = 256
"""On CPU, examples up to this long (90th percentile) train with eager attention: for
SmolLM2's 9 heads of 64 at 170 tokens, eager bf16 matmuls + fp32 softmax took half
the time of PyTorch's CPU flash-attention kernel forward + backward (34 vs 73 ms a
layer, batch 4); at 512 tokens flash was faster (276 vs 408 ms). See bench/README.md."""


def speed_levers(trainer: Any, precision: Any, examples: Examples) -> dict[str, str]:
    """Apply what measurably speeds up LoRA SFT here (bench/sft_vs_trl.py) without
    changing the maths; returns what was applied, for the log.

    - LM head on answer positions only (`answer_only_lm_head`), on every device.
    - On CPU, eager attention for short examples (`EAGER_ATTENTION_MAX_TOKENS`).
    - Under bf16/fp16 autocast, no fp32 copy of each LoRA input: PEFT casts a bf16
      activation to the fp32 adapter's dtype, then autocast casts it back to bf16 for
      the matmul -- two copies of every adapted layer's input for nothing."""
    levers = {"lm_head": "answer positions" if answer_only_lm_head(trainer) else "every position"}
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lengths = sorted(len(ids) for ids in examples.input_ids)
    p90 = lengths[int(0.9 * (len(lengths) - 1))] if lengths else 0
    if (
        precision.device == "cpu"
        and p90 <= EAGER_ATTENTION_MAX_TOKENS
        and hasattr(base, "set_attn_implementation")
        and getattr(base.config, "_attn_implementation", None) == "sdpa"
    ):
        try:
            base.set_attn_implementation("eager")
            levers["attention"] = f"eager (90% of examples <= {p90} tokens)"
        except (ValueError, ImportError) as exc:  # a model without an eager path
            log.info("keeping sdpa attention: %s", exc)
    if precision.name in ("bf16", "fp16"):
        n = set_lora_input_casting(model, False)
        levers["lora_input"] = f"kept in {precision.name} under autocast ({n} layers)"
    return levers


def set_lora_input_casting(model: Any, enabled: bool) -> int:
    """PEFT's cast of each LoRA layer's input to the adapter's dtype, on or off (off is
    only valid under autocast, which casts for the matmul anyway); returns the layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = enabled
    return len(layers)


_ANSWER_CHUNK = 1024
"""Answer positions scored per LM-head tile: bounds the fp32 logits to 1024 x vocab
(200 MB for a 49k vocabulary) however long the answers of a batch are."""


def answer_only_lm_head(trainer: Any) -> bool:
    """Make the trainer's LM head project only the positions the loss is on.

    TRL's SFTTrainer calls ``model(..., labels=..., fused_lm_head=True)`` and reads
    per-token log-probs, entropy and top-1 hits (`FusedCausalLMOutput`). Off Triton
    (every CPU) TRL's fused head scores *every* position, in fp32: with a 49k vocabulary
    and answers of ~6% of the tokens (the job market's), that head is ~20% of the
    forward FLOPs spent on prompt positions whose predictions nothing uses, and the
    same again in the backward. This replaces that head, on the base model, by one that
    gathers the answer positions first (hidden states whose next-token label is not
    -100), then projects them in fp32 tiles (autocast off: bf16-rounded logits bias the
    log-softmax) -- the same numbers at answer positions, zeros elsewhere, as TRL's.

    The loss, its normalisation (num_items_in_batch), the metrics and DDP are TRL's own
    code, untouched. Returns False (and changes nothing) where the contract is not
    there to keep: a TRL without the fused head, or a model whose logits are scaled or
    soft-capped (Gemma 2, Cohere, Granite...) or that routes experts (MoE aux loss)."""
    import types

    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:
        return False
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    patched = base.__dict__.get("forward")  # TRL's instance-level fused forward
    text_config = base.config.get_text_config()
    scaled = any(
        getattr(text_config, name, None) is not None
        for name in (
            "final_logit_softcapping",
            "logit_scale",
            "output_multiplier",
            "logits_scaling",
        )
    ) or getattr(text_config, "lm_head_multiplier", None) not in (None, 1, 1.0)
    if patched is None or scaled or getattr(text_config, "output_router_logits", False):
        return False
    backbone_attr = getattr(base, "base_model_prefix", "model")

    def forward(
        self: Any,
        *args: Any,
        fused_lm_head: bool = False,
        labels: Any = None,
        shift_labels: Any = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head:  # generation, evaluation: TRL's (= the model's own) path
            return patched(
                *args,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        mask = targets != -100
        head = self.get_output_embeddings()
        log_probs, entropy, is_top1 = _score_positions(
            hidden[mask], head.weight, getattr(head, "bias", None), targets[mask]
        )
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            # masked_scatter keeps an all-prompt micro-batch connected to the graph.
            log_probs=log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs),
            entropy=entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
            is_top1=is_top1.new_zeros(mask.shape).masked_scatter(mask, is_top1),
            label_mask=mask,
        )

    base.forward = types.MethodType(forward, base)
    return True


def _score_positions(hidden: Any, weight: Any, bias: Any, targets: Any) -> tuple[Any, Any, Any]:
    """(log p(target), entropy, target is the argmax) per row of `hidden` (n x d), with the
    logits computed in fp32 in tiles of `_ANSWER_CHUNK` rows. With more than one tile each
    is recomputed in the backward (activation checkpointing) instead of keeping n x vocab
    fp32 logits; answers that fit one tile (the usual case) are not recomputed."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def tile(h: Any, t: Any) -> tuple[Any, Any, Any]:
        with torch.autocast(h.device.type, enabled=False):
            logits = h.float() @ weight.float().t()
            if bias is not None:
                logits = logits + bias.float()
            logp = torch.log_softmax(logits, dim=-1)
            picked = logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            with torch.no_grad():
                entropy = -(logp.exp() * logp).sum(-1)
                top1 = (logits.argmax(-1) == t).to(logits.dtype)
        return picked, entropy, top1

    n = hidden.shape[0]
    if n <= _ANSWER_CHUNK:
        return tile(hidden, targets)
    parts = [
        checkpoint(
            tile, hidden[i : i + _ANSWER_CHUNK], targets[i : i + _ANSWER_CHUNK], use_reentrant=False
        )
        for i in range(0, n, _ANSWER_CHUNK)
    ]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]
