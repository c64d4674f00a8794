"""PPO's rollout rules on the tiny model: rollouts sample exactly what is scored.

Each test here would have caught one of the silent bugs of the first PPO: transformers'
default top_k=50 (and the model's own generation_config) leaking into sampling, log-probs
taken without the sampling temperature, answers running past a second stop id, padding
changing log-probs, a reference that was not what it claimed, dropout in a forward pass.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from simtune.config import build_config
from simtune.training.model import load_model, load_tokenizer, resolve_model
from simtune.training.ppo import (
    REFERENCE_ADAPTER,
    PPOInputs,
    Sampling,
    _pad,
    _PolicyAndValue,
    add_reference_adapter,
    build_samples,
    compute_advantages,
    generate_trajectory,
    generation_config,
    load_generation_config,
    make_policy,
    sample_responses,
    stop_token_ids,
)
from simtune.training.ppo_math import warp_logits

PROMPTS = [
    "You are a job seeker skilled in welding. Apply or wait?",
    "Skill: cooking. Savings 3. Answer in JSON.",
    "Hi",
    "You are a trader. The price rose twice. Buy, sell or hold? Answer as JSON please.",
]


def _cfg(model_dir: Path, **kw):
    return build_config(
        overrides={
            "llm_path": str(model_dir),
            "dataset_path": ["x"],
            "tuning_mode": "ppo",
            "lora_dropout": 0.0,
            **kw,
        }
    )


def _perturb(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Give every LoRA B (zero at init) random values: a policy that differs from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _queries(tok) -> list[list[int]]:
    return [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False
            )
        )
        for p in PROMPTS
    ]


@pytest.fixture
def chatty_model(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny model with a generation_config like a chat model's: top_k, a repetition
    penalty, min_p, a low temperature, and several stop ids (the second one a common token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "chatty"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    # The token the base model likes most after the first prompt: sampled often.
    ids = torch.tensor([_queries(tok)[0]])
    with torch.no_grad():
        common = int(model(input_ids=ids).logits[0, -1].argmax())
    model.generation_config = GenerationConfig(
        do_sample=True,
        top_k=5,
        top_p=0.5,
        min_p=0.2,
        temperature=0.3,
        repetition_penalty=1.8,
        no_repeat_ngram_size=2,
        eos_token_id=[tok.eos_token_id, common],
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "common_token.json").write_text(json.dumps(common))
    return out


def _policy_module(model_dir: Path, cfg, reference: bool = False):
    spec = resolve_model(str(model_dir))
    tok = load_tokenizer(spec)
    policy = make_policy(load_model(spec, trainable_adapter=True), cfg)
    ref = add_reference_adapter(policy, spec.adapter) if reference else None
    module = _PolicyAndValue.build(policy, spec.adapter, ref)
    module.eval()
    return spec, tok, policy, module


def test_stop_ids_are_every_eos_of_the_model_and_the_template_end(chatty_model):
    spec = resolve_model(str(chatty_model))
    tok = load_tokenizer(spec)
    common = json.loads((chatty_model / "common_token.json").read_text())
    ids = stop_token_ids(tok, load_generation_config(spec))
    assert ids[0] == tok.eos_token_id and common in ids
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids  # the template's end of turn


@pytest.mark.parametrize(
    "sampling",
    [Sampling(0.7, 0, 1.0), Sampling(1.0, 0, 1.0), Sampling(0.8, 7, 1.0), Sampling(1.3, 0, 0.6)],
    ids=["T0.7", "T1", "T0.8-top_k7", "T1.3-top_p0.6"],
)
def test_sampled_tokens_logprob_equals_the_scoring_path(chatty_model, sampling):
    """generate()'s processed scores (what it sampled from) give the same log-prob of every
    sampled token as the teacher-forced scoring pass, and with top_k/top_p off their
    support is the whole vocabulary: the model's top_k=5, top_p, min_p, repetition
    penalty and temperature did not leak in, and transformers' default top_k=50 neither."""
    cfg = _cfg(chatty_model)
    spec, tok, policy, module = _policy_module(chatty_model, cfg)
    _perturb(module)
    stop_ids = stop_token_ids(tok, load_generation_config(spec))
    gen = generation_config(sampling, 12, stop_ids, tok.pad_token_id)
    queries = _queries(tok) * 3
    saved = policy.get_base_model().generation_config
    torch.manual_seed(0)
    answers, out = sample_responses(
        policy,
        queries,
        gen,
        stop_ids,
        "cpu",
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert policy.get_base_model().generation_config is saved  # restored after the call
    processed = torch.stack(out.scores, dim=1).log_softmax(-1)  # (B, new, V)
    finite = torch.isfinite(processed).sum(-1)
    vocab = processed.shape[-1]
    if sampling.top_k == 0 and sampling.top_p == 1.0:
        assert bool((finite == vocab).all()), "sampling support is not the whole vocabulary"
    if sampling.top_k:
        assert int(finite.max()) <= sampling.top_k
    q_ids, q_mask = _pad(queries, tok.pad_token_id, left=True)
    r_ids, r_mask = _pad(answers, tok.pad_token_id)
    with torch.no_grad():
        logp, _, _ = module(q_ids, q_mask, r_ids, r_mask, sampling)
    for i, ans in enumerate(answers):
        sampled = processed[i, torch.arange(len(ans)), torch.tensor(ans)]
        assert torch.allclose(logp[i, : len(ans)], sampled, atol=2e-4), (i, ans)


def test_answers_end_at_the_first_of_any_stop_id(chatty_model):
    cfg = _cfg(chatty_model)
    spec, tok, policy, module = _policy_module(chatty_model, cfg)
    stop_ids = stop_token_ids(tok, load_generation_config(spec))
    common = json.loads((chatty_model / "common_token.json").read_text())
    gen = generation_config(Sampling(0.7, 0, 1.0), 16, stop_ids, tok.pad_token_id)
    torch.manual_seed(1)
    answers, _ = sample_responses(policy, _queries(tok) * 6, gen, stop_ids, "cpu")
    ended = [a[-1] for a in answers if a[-1] in stop_ids]
    assert common in ended, "no answer ended at the model's second stop id"
    for a in answers:
        assert not any(t in stop_ids for t in a[:-1]), a  # nothing after a stop id
        assert len(a) <= 16


def test_warp_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(6, 50, generator=g) * 3
    ties = torch.randint(-3, 3, (6, 50), generator=g).float()  # many equal logits
    for logits in (smooth, ties):
        for t, k, p in ((1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.9), (1.0, 1, 1.0)):
            want = TemperatureLogitsWarper(t)(None, logits.clone())
            if k:
                want = TopKLogitsWarper(k)(None, want)
            if p < 1:
                want = TopPLogitsWarper(p)(None, want)
            got = warp_logits(logits, t, k, p)
            assert torch.equal(torch.isinf(got), torch.isinf(want)), (t, k, p)
            assert torch.allclose(got[torch.isfinite(got)], want[torch.isfinite(want)])


def test_padded_batch_equals_unpadded_rows_with_ragged_lengths(tiny_model):
    """Left-padded queries + right-padded answers (and trimmed micro-batches) give the
    log-probs, values and entropy of each row scored alone without any padding."""
    cfg = _cfg(tiny_model)
    _, tok, _, module = _policy_module(tiny_model, cfg)
    _perturb(module)
    torch.nn.init.normal_(module.v_head.weight, std=0.5)
    queries = _queries(tok)
    g = torch.Generator().manual_seed(3)
    answers = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (1, 7, 3, 12)]
    sampling = Sampling(0.8, 0, 1.0)
    q_ids, q_mask = _pad(queries, tok.pad_token_id, left=True)
    r_ids, r_mask = _pad(answers, tok.pad_token_id)
    with torch.no_grad():
        logp, values, ent = module(q_ids, q_mask, r_ids, r_mask, sampling, with_entropy=True)
        for i, (q, a) in enumerate(zip(queries, answers, strict=True)):
            one = [torch.tensor([x]) for x in (q, [1] * len(q), a, [1] * len(a))]
            lp1, v1, e1 = module(*one, sampling, with_entropy=True)
            n = len(a)
            assert torch.allclose(logp[i, :n], lp1[0], atol=1e-5)
            assert torch.allclose(values[i, :n], v1[0], atol=1e-5)
            assert torch.allclose(ent[i, :n], e1[0], atol=1e-5)
            # a plain forward of the unpadded sequence, nothing of ours in between
            ids = torch.tensor([q + a])
            plain = module.policy(input_ids=ids).logits[0, len(q) - 1 : -1].float() / 0.8
            ref = plain.log_softmax(-1)[torch.arange(n), torch.tensor(a)]
            assert torch.allclose(logp[i, :n], ref, atol=1e-5)


def _save_perturbed_adapter(tiny_model: Path, out: Path) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from simtune.training.sft import lora_config

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model), lora_config(_cfg(tiny_model))
    )
    _perturb(model, seed=5, std=0.4)
    model.save_pretrained(out, safe_serialization=True)
    return out


def test_reference_init_is_the_frozen_starting_adapter_and_base_is_the_base(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _save_perturbed_adapter(tiny_model, tmp_path / "adapter")
    tok = load_tokenizer(resolve_model(str(tiny_model)))
    queries = _queries(tok)
    answers = [[7, 8, 9], [10, 11], [12], [13, 14, 15, 16]]
    q_ids, q_mask = _pad(queries, tok.pad_token_id, left=True)
    r_ids, r_mask = _pad(answers, tok.pad_token_id)
    sampling = Sampling()

    def fresh(with_adapter: bool):
        m = AutoModelForCausalLM.from_pretrained(tiny_model)
        if with_adapter:
            m = PeftModel.from_pretrained(m, adapter)
        m.eval()
        wrapped = make_policy(m, _cfg(tiny_model)) if not with_adapter else m
        mod = _PolicyAndValue.build(wrapped, None)
        with torch.no_grad():
            return mod(q_ids, q_mask, r_ids, r_mask, sampling, with_values=False)[0]

    base_logp, adapter_logp = fresh(False), fresh(True)
    mask = r_mask.bool()
    assert (base_logp - adapter_logp)[mask].abs().max() > 1e-2  # the adapter matters

    for reference, expected in (("init", adapter_logp), ("base", base_logp)):
        cfg = _cfg(adapter, ppo_reference=reference)
        _, _, policy, module = _policy_module(adapter, cfg, reference=reference == "init")
        _perturb(module, seed=9)  # a policy that has moved away from where it started
        with torch.no_grad():
            ref = module(q_ids, q_mask, r_ids, r_mask, sampling, reference=True)[0]
            pol = module(q_ids, q_mask, r_ids, r_mask, sampling)[0]
        assert torch.allclose(ref[mask], expected[mask], atol=1e-5), reference
        assert (pol - ref)[mask].abs().max() > 1e-2, reference
        # the trainable adapter is trainable again, the reference frozen
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable and all(".default." in n or "v_head" in n for n in trainable)
        if reference == "init":
            assert REFERENCE_ADAPTER in policy.peft_config
            assert policy.active_adapter == "default"


def test_offline_answers_stop_at_the_end_of_turn_and_the_score_lands_on_it(tiny_model):
    """The template's trailing newline after <|im_end|> is not an action; the score goes
    on each row's last real answer token however ragged the rows are."""
    from simtune.decisions.schema import Decision

    cfg = _cfg(tiny_model, kl_coef=0.0, whiten_advantages=False)
    spec, tok, policy, module = _policy_module(tiny_model, cfg)
    stop_ids = stop_token_ids(tok, load_generation_config(spec))
    outputs = ['{"a": 1}', "x", '{"action": "apply", "job_id": "J12"}']
    decisions = [
        Decision(decision_id=str(i), prompt=p, output=o, reward=float(i))
        for i, (p, o) in enumerate(zip(PROMPTS, outputs, strict=False))
    ]
    samples = build_samples(decisions, tok, cfg, stop_ids)
    for s in samples:
        assert s.response[-1] == tok.eos_token_id
        assert tok.eos_token_id not in s.response[:-1]
    traj = generate_trajectory(
        module,
        policy,
        samples,
        cfg,
        PPOInputs(samples, None, stop_ids),
        tok,
        "cpu",
        contextlib.nullcontext,
    )
    rewards, _ = compute_advantages(traj, 0.0, cfg)
    for i, s in enumerate(samples):
        n = len(s.response)
        assert traj.response_mask[i].sum() == n
        nonzero = rewards[i].nonzero().flatten().tolist()
        assert nonzero in ([n - 1], []) and float(rewards[i, n - 1]) == pytest.approx(
            float(traj.scores[i])
        )


def test_dropout_is_off_in_every_rollout_and_training_forward(tiny_model, tmp_path):
    """With lora_dropout 0.5, every Dropout module that runs during PPO (generation,
    scoring, the reference, the training forward) runs in eval mode."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from simtune.training.ppo import build_ppo_inputs, train_ppo

    (tmp_path / "r.py").write_text(
        "def reward(completion, **_):\n    return float(len(completion))\n"
    )
    cfg = _cfg(
        tiny_model,
        lora_dropout=0.5,
        rollout="online",
        reward_fn=f"{tmp_path / 'r.py'}:reward",
        max_steps=2,
        max_new_tokens=4,
        per_device_train_batch_size=2,
        ppo_epochs=1,
    )
    spec = resolve_model(str(tiny_model))
    tok = load_tokenizer(spec)
    from simtune.decisions.schema import Decision

    decisions = [Decision(decision_id=str(i), prompt=p, output="o") for i, p in enumerate(PROMPTS)]
    inputs = build_ppo_inputs(decisions, tok, cfg, spec)
    seen: list[bool] = []

    def hook(module, args):
        if isinstance(module, torch.nn.Dropout):
            seen.append(module.training)

    handle = register_module_forward_pre_hook(hook)
    try:
        metrics, trained, _ = train_ppo(
            cfg,
            inputs,
            load_model(spec, trainable_adapter=True),
            tok,
            log_metrics=lambda m, s: None,
        )
    finally:
        handle.remove()
    assert seen and not any(seen), f"{sum(seen)} of {len(seen)} dropout calls in training mode"
    assert metrics["global_step"] == 2.0
