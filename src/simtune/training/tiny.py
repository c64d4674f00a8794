"""A tiny random Llama-style model and a tokenizer trained on the spot (DESIGN.md §9).

Used by the tests, the demo and users' smoke tests (`simtune make-tiny-model DIR`):
it builds in about a second with no network, and every training path runs on it on
CPU. Its weights are random, so its text is gibberish; it exists to exercise the
machinery, not to be good.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

# ChatML-style template. The prompt rendered with add_generation_prompt=True is a
# strict prefix of prompt+answer, which is what completion-only loss relies on.
#
# Tools the way Qwen2.5/Hermes-style templates take them (transformers'
# `apply_chat_template(..., tools=...)`): the tool schemas, one JSON object a line
# between <tools> tags, open a system turn (merged with the conversation's own system
# message); an assistant turn's calls render as
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one after another after its
# text (`simtune.serving.engine.parse_tool_calls` reads them back); `tool` results are
# turns of their own role. Written without whitespace between tags, like the original,
# so a conversation without tools or tool calls renders byte for byte as it did before
# tool support (old tokenized caches and trained adapters see the same text).
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
CHAT_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    '{{ \'\n</tools>\nTo call a tool, answer <tool_call>{"name": NAME, "arguments": '
    "ARGUMENTS}</tool_call>.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined"
    " and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' }}"
    "{{ fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) }}"
    "{{ '}</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "You are an agent in a simulation. Decide what to do next and answer in JSON.",
    '{"action": "apply", "job_id": "J12", "reason": "the salary matches my skills"}',
    '{"action": "wait"} {"action": "buy", "quantity": 3} {"number": "1"} {"target_id": "10"}',
    "The quick brown fox jumps over the lazy dog. 0123456789 true false null",
    "system user assistant profile memory observation instruction reward rating",
]


def tokenizer_corpus(extra: Iterable[str] = ()) -> Iterable[str]:
    yield from _CORPUS * 4
    sample = resources.files("simtune") / "data" / "sample_decisions.jsonl"
    if sample.is_file():
        for line in sample.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            yield rec.get("prompt", "")
            yield rec.get("output", "")
    yield from extra


def build_tokenizer(vocab_size: int = 1024, corpus: Iterable[str] = ()):
    """Byte-level BPE trained in well under a second; any UTF-8 text encodes.

    `corpus` is extra text to train on besides the built-in snippets and the bundled
    sample: a model meant for one simulation (the demo's) tokenizes that simulation's
    prompts into far fewer tokens, which makes every CPU step faster."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        tokenizer_corpus(corpus),
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def make_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 1024,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    intermediate_size: int | None = None,
    initializer_range: float = 0.02,
    output_std: float | None = 0.25,
    corpus: Iterable[str] = (),
) -> Path:
    """Write a random LlamaForCausalLM (~0.2M params) + tokenizer to `out_dir`.

    The defaults are the test model; `intermediate_size` defaults to 2 x hidden,
    `initializer_range` is the std of the random weights, `output_std` that of the LM
    head (None: `initializer_range`) and `corpus` is extra tokenizer training text (see
    `build_tokenizer`).

    Why the LM head gets its own, larger std: with every weight at std 0.02 the logits
    have std ~0.16 (0.02 x the RMS-normed hidden state's norm of sqrt(64) = 8), so the
    next-token distribution is uniform to within 0.01 nats, and since LoRA cannot touch
    the final RMSNorm or the LM head it can shift any logit by at most ~1.3: no training
    signal -- a reward, a rating -- could move such a model's answers, and its entropy
    never left ln(V). At 0.25 the logits have std ~2 and the entropy ~4.5 nats, the
    peakedness of a pretrained model's next-token distribution, and the adapters can
    change what the model says."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size, corpus)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if output_std is not None:
        torch.nn.init.normal_(model.lm_head.weight, std=output_std)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=32,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    log.info("wrote tiny model (%d parameters) to %s", n, out)
    return out
