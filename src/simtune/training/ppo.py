"""PPO recipe: prefer decisions that earned reward, with a LoRA policy on one shared base.

TRL >= 1.0 has no PPO that trains from a fixed log of (prompt, response, reward), which
is what simulations produce, so simtune owns this compact one (maths in ppo_math.py).
Read `train_ppo` top to bottom: `setup_ppo` builds the job's state (`PPORun`), then each
step is `rollout` (draw the batch, `generate_trajectory`: rollout and scoring, no
gradient) -> `compute_advantages` -> `ppo_step` (the PPO epochs over minibatches) ->
`step_metrics` (KL control and logging), with one typed `Trajectory` passed between them.

Algorithm, per rollout batch of B = per_device_train_batch_size x
gradient_accumulation_steps x num_mini_batches x processes samples:

1. Rollout. *Offline*: the action is the logged `output` (up to and including its first
   stop token), its score the logged reward (else rating) normalised over the dataset
   (`--score_normalization`). *Online*: the policy samples an answer for each prompt and a
   reward source scores it (Python function, reward model or LLM judge). Online scores are
   normalised by the running mean and std of every score so far (`--score_normalization
   zscore`, the default; `ppo_math.RunningScoreNorm`), so one kl_coef suits rewards of any
   scale; `ppo/score_mean` logs them as the source gave them.
2. With no gradient: log-probs of the response tokens under the policy (base + LoRA) and
   under the reference, the sampling distribution's entropy, and values from a linear
   value head on the policy's last hidden states.
3. Per-token reward r_t = -beta * KL_t (policy || reference), plus the score at the last
   response token (the stop token, or the last sampled one when max_new_tokens ran out).
   GAE(gamma, lambda) gives advantages and returns; advantages are whitened over the batch.
4. `ppo_epochs` passes over the batch in `num_mini_batches` shuffled minibatches, one
   optimizer step each (gradient accumulation over micro-batches of
   per_device_train_batch_size): clipped policy surrogate + vf_coef x clipped value
   loss, gradient clipping at max_grad_norm.
5. beta is fixed, or adapted towards `target_kl` (Ziegler et al. 2019).

The sampling rule: rollouts sample from exactly the distribution PPO scores.
- The generation config is built from the job's options alone -- temperature, top_p,
  top_k (default 0: off), max_new_tokens and every stop id -- and the model's own
  `generation_config` is swapped out for the call, so nothing it sets (top_k,
  repetition_penalty, min_p, ...) leaks in. transformers' global default top_k=50 is why
  the explicit top_k=0 matters (TRL's PPOv2 passes top_k=0 for the same reason): sampling
  from a truncated distribution while scoring the full one makes the k1 KL estimate
  negative in expectation for policies flatter than the reference, i.e. a "penalty" that
  rewards drifting away.
- Old, new and reference log-probs divide the logits by the same temperature (as PPOv2
  and OpenRLHF do). Policy log-probs also apply the same top-k/top-p masks as the sampler
  (`ppo_math.warp_logits`, checked against transformers' warpers), so the ratio is that of
  the distribution actually sampled; the reference keeps its full support (temperature
  only), so the KL term is KL(sampling policy || reference), finite and >= 0 in
  expectation. PPOv2 and OpenRLHF take log-probs over the full softmax; with the default
  top_k=0/top_p=1 the two rules are the same.
- An answer ends at the first of *any* stop id (`stop_token_ids`: the tokenizer's EOS, the
  model's generation_config EOS list and the chat template's end-of-turn token), which is
  kept as its last action; what follows is padding. Offline answers are cut the same way,
  so the template's trailing tokens after the end-of-turn marker (a newline in ChatML)
  are never scored: the policy never samples them, they carry no decision.
- Offline rollouts ignore temperature/top_k/top_p: their actions were not sampled by this
  policy, and a masked support could exclude a logged token.

The reference (`--ppo_reference`): `init` (default) is the policy PPO starts from -- the
adapter of `--llm_path` when it is one, loaded a second time as a frozen adapter on the
same base (an adapter costs megabytes; PPOv2 calls this `ref_adapter_name`), else the base
model, which is what a fresh zero-initialised LoRA starts as. `base` is always the base
model with the adapter disabled: KL then pulls an SFT-started policy back toward the
untuned base.

Deliberate simplifications (each is a cost we chose to pay, not an oversight):
- Dropout is off for the whole job (model.eval()): old and new log-probs must agree
  exactly before the first update (ratio == 1), and PPO is noisy enough without it.
  Transformers only checkpoints activations in training mode, so
  `--gradient_checkpointing` saves no memory here.
- Offline PPO treats logged answers as if the current policy had sampled them (what the
  seed system did); the clipped ratio keeps updates bounded but there is no off-policy
  correction beyond that.
- Losses are masked means per micro-batch, so with ragged lengths and gradient
  accumulation the weighting of tokens differs slightly from one big batch.
- Sequences are laid out as generate() makes them, [left-padded query | right-padded
  response], with position ids from the attention mask, so every row's response starts at
  the same column: the LM head runs on the response positions only (`logits_to_keep`; the
  prompt's positions cost no vocabulary projection) and micro-batches are trimmed to their
  own widest query and response.
- The critic is a linear value head on the policy's last hidden states, *detached*: the
  value loss trains the head alone. TRL's PPOv2 and OpenRLHF train a separate critic
  model; we keep one model, and a shared body would let the value loss -- whose scale is
  that of the returns, not of the policy's surrogate -- steer the policy: measured on the
  tiny model with a zero score from a perturbed adapter, the KL to the base *rose* from
  12 to 20 nats in 30 steps with the gradient flowing into the adapter. The price is a
  weaker critic (a linear function of features it cannot shape); with whitened
  advantages and GAE's lambda=0.95 the baseline matters less than the interference did.
  `output_hidden_states=True` keeps all layers' hidden states for the step (cheap next
  to the activations autograd keeps).
- top-p in the scoring passes sorts the vocabulary at every response position (only when
  --top_p < 1): O(R V log V) extra per forward, the price of exact ratios.
- Several processes run data-parallel through accelerate (DDP): each one rolls out
  and scores its contiguous share of the batch, then the rollout tensors are gathered
  so advantages, whitening, KL control and logged statistics are those of the whole
  batch, identical on every process. Each process then takes every P-th micro-batch of
  each minibatch. The result equals one process with gradient_accumulation_steps x P
  (same samples, same micro-batches) up to floating-point reduction order; the price
  is that every process holds the gathered batch's tensors (small next to a model).

Where this file is silent, it does what TRL's PPOv2 and OpenRLHF do: k1 KL in the reward,
the score on the last response token, GAE with gamma=1, lambda=0.95, whitened advantages,
clipped value loss with TRL's clip fraction, AdamW.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simtune.config import TuningConfig
from simtune.decisions.schema import Decision
from simtune.errors import DataError, ModelError

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
REFERENCE_ADAPTER = "reference"
"""Name of the frozen copy of the starting adapter (`--ppo_reference init`)."""


@dataclass
class PPOSample:
    decision: Decision
    query: list[int]
    response: list[int] | None = None
    """Logged answer tokens up to and including the first stop id (offline); None when
    the policy generates (online)."""
    score: float | None = None


@dataclass
class PPOInputs:
    """What `build_ppo_inputs` prepares before any run opens (it can fail on the data)."""

    samples: list[PPOSample]
    reward_source: Any | None
    stop_ids: list[int]


@dataclass(frozen=True)
class Sampling:
    """The distribution rollouts sample from and log-probs are taken under."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def of(cls, cfg: TuningConfig) -> Sampling:
        if cfg.rollout == "offline":  # logged actions: the plain softmax (see the docstring)
            return cls()
        return cls(cfg.temperature, cfg.top_k, cfg.top_p)


# --- stop tokens ---------------------------------------------------------------------


def stop_token_ids(tokenizer: Any, generation_config: Any | None = None) -> list[int]:
    """Every token id that ends an answer: the tokenizer's EOS, each EOS id the model's
    generation_config lists (chat models list several: <|im_end|>, <|endoftext|>,
    <|eot_id|>, ...), and the special token the chat template puts right after an
    assistant answer (its end-of-turn marker). First the tokenizer's EOS."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    if generation_config is not None:
        add(getattr(generation_config, "eos_token_id", None))
    add(_template_end_of_turn(tokenizer))
    if not ids:
        raise ModelError("--llm_path: the tokenizer has no end-of-sequence token to stop answers")
    return ids


def _template_end_of_turn(tokenizer: Any) -> int | None:
    """The first special token after the content of a rendered assistant answer."""
    from simtune.training.sft import split_prompt_answer

    try:
        _, answer = split_prompt_answer(tokenizer, [{"role": "user", "content": "Hi"}], "OK")
    except Exception:  # an unusual template: fall back to the EOS ids alone
        return None
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {
        i
        for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
        if getattr(t, "special", False)
    }
    return next((t for t in answer if t in special), None)


def load_generation_config(spec: Any) -> Any | None:
    """The base model's generation_config.json (for its stop ids), or None."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(spec.base, local_files_only=spec.base_is_local)
    except Exception:  # no such file: the tokenizer's EOS and the template's marker remain
        return None


def truncate_at_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """`tokens` up to and including the first stop id (all of them when none occurs)."""
    stops = set(stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


# --- samples ---------------------------------------------------------------------------


def build_samples(
    decisions: list[Decision], tokenizer: Any, cfg: TuningConfig, stop_ids: list[int]
) -> list[PPOSample]:
    """Tokenize prompts (and, offline, logged answers with their normalised scores)."""
    from simtune.rewards import normalise_scores
    from simtune.training.sft import chat_ids, split_prompt_answer

    offline = cfg.rollout == "offline"
    budget = cfg.max_length - (0 if offline else cfg.max_new_tokens)
    if budget < 8:
        raise DataError(f"--max_length {cfg.max_length} leaves no room for the prompt")
    samples: list[PPOSample] = []
    skipped = 0
    for d in decisions:
        score = d.score
        if offline and score is None:
            skipped += 1
            continue
        prompt = d.chat_prompt(cfg.system_prompt)
        response = None
        if offline:
            query, response = split_prompt_answer(tokenizer, prompt, d.output)
            response = truncate_at_stop(response, stop_ids)[: max(1, cfg.max_length // 2)]
            budget = cfg.max_length - len(response)
        else:
            query = chat_ids(tokenizer, prompt, True)
        if len(query) > budget:
            query = query[len(query) - budget :]  # keep the end: simulators put the ask last
        samples.append(PPOSample(d, query, response, score))
    if skipped:
        log.warning(
            "%d record(s) have no reward or rating and are skipped for offline PPO", skipped
        )
    if not samples:
        raise DataError(
            f"no scored records for offline PPO ({skipped} record(s) have neither 'reward' nor "
            "'rating'); add scores or use --rollout online with a reward source"
        )
    if offline:
        normalised = normalise_scores([s.score for s in samples], cfg.score_normalization)
        for s, v in zip(samples, normalised, strict=True):
            s.score = v
    return samples


def build_ppo_inputs(
    decisions: list[Decision], tokenizer: Any, cfg: TuningConfig, spec: Any
) -> PPOInputs:
    """Samples, the online reward source (checked fail-fast) and the stop ids."""
    from simtune.rewards import make_reward_source

    stop_ids = stop_token_ids(tokenizer, load_generation_config(spec))
    samples = build_samples(decisions, tokenizer, cfg, stop_ids)
    source = make_reward_source(cfg) if cfg.rollout == "online" else None
    return PPOInputs(samples, source, stop_ids)


# --- policy, reference and value head ------------------------------------------------------


def make_policy(model: Any, cfg: TuningConfig) -> Any:
    """The model with a trainable LoRA adapter (a new one unless it already has one)."""
    from peft import PeftModel, get_peft_model

    from simtune.training.sft import lora_config

    if isinstance(model, PeftModel):
        return model
    return get_peft_model(model, lora_config(cfg))


def add_reference_adapter(policy: Any, adapter_dir: str) -> str:
    """Load the starting adapter a second time, frozen, as the KL reference; the
    trainable adapter stays active. Returns the reference adapter's name."""
    active = policy.active_adapter
    policy.load_adapter(adapter_dir, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    policy.set_adapter(active)
    return REFERENCE_ADAPTER


class _PolicyAndValue:
    """Built lazily so torch is imported only when PPO runs."""

    @staticmethod
    def build(policy: Any, adapter_dir: str | None, reference_adapter: str | None = None) -> Any:
        """The policy with a value head. `reference_adapter` names a frozen adapter of
        `policy` to use as the KL reference; None: the base (adapter disabled)."""
        import torch
        from torch import nn

        from simtune.training import ppo_math as pm

        base_forward = policy.get_base_model().forward
        keeps_logits = "logits_to_keep" in inspect.signature(base_forward).parameters

        class PolicyAndValue(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.policy = policy
                self.reference_adapter = reference_adapter
                hidden = policy.config.hidden_size
                self.v_head = nn.Linear(hidden, 1)
                # Start from value 0 everywhere: no arbitrary baseline in the first batches.
                nn.init.zeros_(self.v_head.weight)
                nn.init.zeros_(self.v_head.bias)

            @contextlib.contextmanager
            def _as_reference(self) -> Iterator[None]:
                if self.reference_adapter is None:
                    with self.policy.disable_adapter():
                        yield
                    return
                active = self.policy.active_adapter
                # inference_mode: the reference stays frozen while it is active; switching
                # back makes the trainable adapter trainable again (PEFT's set_adapter).
                self.policy.set_adapter(self.reference_adapter, inference_mode=True)
                try:
                    yield
                finally:
                    self.policy.set_adapter(active)

            def forward(
                self,
                query_ids: Any,
                query_mask: Any,
                response_ids: Any,
                response_mask: Any,
                sampling: Sampling = Sampling(),  # noqa: B008 (frozen, immutable)
                *,
                reference: bool = False,
                with_values: bool = True,
                with_entropy: bool = False,
            ) -> tuple[Any, Any, Any]:
                """(log-probs, values, entropy) of each response token, (B, R) each; values
                and entropy are None unless asked for (never for the reference)."""
                ids = torch.cat([query_ids, response_ids], dim=1)
                att = torch.cat([query_mask, response_mask], dim=1)
                # Left-padded queries: positions from the mask, as generate() numbers them.
                pos = (att.cumsum(-1) - 1).clamp(min=0)
                q, r = query_ids.shape[1], response_ids.shape[1]
                kwargs: dict[str, Any] = {
                    "input_ids": ids,
                    "attention_mask": att,
                    "position_ids": pos,
                }
                if keeps_logits:  # the LM head on the positions that predict the response
                    kwargs["logits_to_keep"] = r + 1
                if reference:
                    with self._as_reference():
                        out = self.policy(**kwargs)
                    logits = out.logits[:, -(r + 1) : -1]
                    # Full support for the reference: temperature only (see the docstring).
                    logp, _ = pm.sampling_logprobs(logits, response_ids, sampling.temperature)
                    return logp, None, None
                out = self.policy(**kwargs, output_hidden_states=with_values)
                logits = out.logits[:, -(r + 1) : -1]
                logp, entropy = pm.sampling_logprobs(
                    logits,
                    response_ids,
                    sampling.temperature,
                    sampling.top_k,
                    sampling.top_p,
                    with_entropy=with_entropy,
                )
                values = None
                if with_values:
                    # Detached: the value loss trains the head only, never the policy's
                    # adapter (see the docstring).
                    hidden = out.hidden_states[-1][:, q - 1 : q + r - 1].detach()
                    values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)
                return logp, values, entropy

        module = PolicyAndValue()
        if adapter_dir and (Path(adapter_dir) / VALUE_HEAD_FILE).is_file():
            from safetensors.torch import load_file

            module.v_head.load_state_dict(load_file(str(Path(adapter_dir) / VALUE_HEAD_FILE)))
        module.v_head.to(next(policy.parameters()).device, dtype=torch.float32)
        return module


# --- rollouts ------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """One rollout batch, laid out as generate() makes it: queries left-padded to a common
    width Q, responses right-padded to R, so per-token tensors are (B, R), column j being
    response token j of every row. `response_mask` is 1 on answer tokens (the stop token
    included) and 0 on padding. Tensors; typed Any so this module imports no torch."""

    query_ids: Any
    query_mask: Any
    response_ids: Any
    response_mask: Any
    scores: Any
    """(B,) one score per answer, as PPO optimises it (online: normalised, see
    ppo_math.RunningScoreNorm)."""
    raw_scores: Any
    logprobs: Any
    """(B, R) under the rollout's policy, at the sampling temperature and masks."""
    ref_logprobs: Any
    values: Any
    entropy: Any
    """(B, R) entropy of the sampling distribution at each response position."""
    advantages: Any = None
    returns: Any = None

    def rows(self, idx: Any) -> Trajectory:
        """The rows `idx`, trimmed to their own widest query and response (what a
        micro-batch forward needs: no columns that are padding in every row)."""
        q_mask, r_mask = self.query_mask[idx], self.response_mask[idx]
        q = int(q_mask.sum(dim=1).max())
        r = max(1, int(r_mask.sum(dim=1).max()))
        fields = {}
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            if t is None:
                fields[f.name] = None
            elif f.name in ("query_ids", "query_mask"):
                fields[f.name] = t[idx][:, t.shape[1] - q :]
            elif t.dim() == 1:
                fields[f.name] = t[idx]
            else:
                fields[f.name] = t[idx][:, :r]
        return Trajectory(**fields)


def _pad(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[Any, Any]:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, width - len(s) :] = torch.tensor(s)
            att[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
    return ids, att


def generation_config(
    sampling: Sampling, max_new_tokens: int, stop_ids: list[int], pad_id: int
) -> Any:
    """The complete sampling configuration of online rollouts, from the job's options
    alone (see the module docstring): neutral values for everything that would otherwise
    be filled in from the model's generation_config or transformers' defaults."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        num_beams=1,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        min_length=0,
        min_new_tokens=None,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        renormalize_logits=False,
        remove_invalid_values=False,
        use_cache=True,
    )


def sample_responses(
    policy: Any,
    queries: list[list[int]],
    gen: Any,
    stop_ids: list[int],
    device: Any,
    **generate_kwargs: Any,
) -> Any:
    """Sample one answer per query with exactly `gen`; each answer ends at (and keeps) its
    first stop id. Returns (answers as token lists, generate's output)."""
    import torch

    ids, att = _pad(queries, gen.pad_token_id, left=True)
    model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    saved = model.generation_config
    # generate() fills every option the given config leaves unset from the model's own
    # generation_config; with that swapped for ours nothing of the model's leaks in.
    model.generation_config = gen
    try:
        with torch.no_grad():
            out = policy.generate(
                input_ids=ids.to(device),
                attention_mask=att.to(device),
                generation_config=gen,
                **generate_kwargs,
            )
    finally:
        model.generation_config = saved
    sequences = out.sequences if hasattr(out, "sequences") else out
    answers = [
        truncate_at_stop(row, stop_ids) or [stop_ids[0]]
        for row in sequences[:, ids.shape[1] :].tolist()
    ]
    return answers, out


def generate_trajectory(
    module: Any,
    policy: Any,
    picked: list[PPOSample],
    cfg: TuningConfig,
    inputs: PPOInputs,
    tokenizer: Any,
    device: Any,
    autocast: Callable[[], Any],
) -> Trajectory:
    """Rollout: the answers (logged, or sampled from the policy and scored by the reward
    source), then with no gradient the policy's and reference's log-probs, the values
    and the sampling entropy of every answer token. `module` is the (possibly
    DDP-wrapped) policy-and-value module, `policy` its PEFT model (for generate)."""
    import torch

    sampling = Sampling.of(cfg)
    queries = [s.query for s in picked]
    if cfg.rollout == "offline":
        responses = [list(s.response or []) for s in picked]
        scores = [float(s.score or 0.0) for s in picked]
    else:
        gen = generation_config(
            sampling, cfg.max_new_tokens, inputs.stop_ids, tokenizer.pad_token_id
        )
        with autocast():
            responses, _ = sample_responses(policy, queries, gen, inputs.stop_ids, device)
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        scores = inputs.reward_source.score(
            [s.decision.chat_prompt(cfg.system_prompt) for s in picked],
            texts,
            [s.decision for s in picked],
        )
    q_ids, q_mask = (t.to(device) for t in _pad(queries, tokenizer.pad_token_id, left=True))
    r_ids, r_mask = (t.to(device) for t in _pad(responses, tokenizer.pad_token_id))
    with torch.no_grad():
        logp, values, entropy = module(q_ids, q_mask, r_ids, r_mask, sampling, with_entropy=True)
        ref_logp, _, _ = module(q_ids, q_mask, r_ids, r_mask, sampling, reference=True)
    score_t = torch.tensor(scores, dtype=torch.float32, device=device)
    return Trajectory(
        query_ids=q_ids,
        query_mask=q_mask,
        response_ids=r_ids,
        response_mask=r_mask,
        scores=score_t,
        raw_scores=score_t.clone(),
        logprobs=logp,
        ref_logprobs=ref_logp,
        values=values,
        entropy=entropy,
    )


def compute_advantages(traj: Trajectory, kl_coef: float, cfg: TuningConfig) -> tuple[Any, Any]:
    """Fill `traj.advantages` and `traj.returns` (KL-shaped rewards, GAE, whitening);
    returns (per-token rewards, per-token KL estimates)."""
    from simtune.training import ppo_math as pm

    mask = traj.response_mask
    rewards, kl = pm.compute_rewards(
        traj.scores, traj.logprobs, traj.ref_logprobs, mask, kl_coef, cfg.kl_estimator
    )
    adv, returns = pm.gae(rewards, traj.values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = pm.masked_whiten(adv, mask)
    traj.advantages, traj.returns = adv, returns
    return rewards, kl


STAT_NAMES = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "value_clipfrac")


def ppo_step(
    module: Any,
    traj: Trajectory,
    cfg: TuningConfig,
    *,
    accelerator: Any,
    optimizer: Any,
    scheduler: Any,
    params: list[Any],
    rng: random.Random,
) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in `num_mini_batches` shuffled minibatches, one
    optimizer step each; returns the mean of each loss statistic over micro-batches (of
    this process)."""
    import torch

    from simtune.training import ppo_math as pm

    sampling = Sampling.of(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.per_device_train_batch_size
    mini = micro * cfg.gradient_accumulation_steps * world  # samples per optimizer step
    batch = int(traj.scores.shape[0])
    device = traj.scores.device
    stats: dict[str, list[float]] = {k: [] for k in STAT_NAMES}
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(batch, generator=torch.Generator().manual_seed(rng.getrandbits(31)))
        for start in range(0, batch, mini):
            mb = perm[start : start + mini]
            # This process's micro-batches: every world-th of the minibatch's.
            mine = list(range(rank * micro, mini, world * micro))
            for i, m0 in enumerate(mine):
                part = traj.rows(mb[m0 : m0 + micro].to(device))
                last = i == len(mine) - 1
                # DDP all-reduces gradients on the last micro-batch only.
                sync = contextlib.nullcontext() if last else accelerator.no_sync(module)
                with sync:
                    logp, values, _ = module(
                        part.query_ids,
                        part.query_mask,
                        part.response_ids,
                        part.response_mask,
                        sampling,
                    )
                    m = part.response_mask
                    pg, clipfrac, approx_kl = pm.policy_loss(
                        logp, part.logprobs, part.advantages, m, cfg.cliprange
                    )
                    vf, vclip = pm.value_loss(
                        values, part.values, part.returns, m, cfg.cliprange_value
                    )
                    loss = (pg + cfg.vf_coef * vf) / cfg.gradient_accumulation_steps
                    accelerator.backward(loss)
                for k, v in zip(STAT_NAMES, (pg, vf, clipfrac, approx_kl, vclip), strict=True):
                    stats[k].append(float(v.detach()))
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return {k: sum(v) / len(v) for k, v in stats.items()}


# --- the recipe ----------------------------------------------------------------------------


@dataclass
class PPORun:
    """Everything one PPO job carries from step to step (built by `setup_ppo`): the
    prepared modules and optimizer, the KL controller and score normaliser, the shared
    sample order and the metric history -- what a checkpoint saves."""

    accelerator: Any
    module: Any
    """The policy-and-value module as `accelerator.prepare` returned it (DDP-wrapped in
    a job of several processes)."""
    inner: Any
    """The same module unwrapped (what checkpoints read and write)."""
    optimizer: Any
    scheduler: Any
    params: list[Any]
    kl_ctl: Any
    score_norm: Any
    rng: random.Random
    reference: str | None
    """The frozen reference adapter's name (--ppo_reference init), else None (the base)."""
    batch: int
    """Samples per rollout, all processes together."""
    n_rollouts: int
    order: list[int] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    start: int = 0

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes)


def setup_ppo(cfg: TuningConfig, model: Any, n_samples: int, adapter_dir: str | None) -> PPORun:
    """Accelerator, policy + value head (+ reference adapter), AdamW and its schedule,
    KL controller and score normaliser, sized for `n_samples` training samples."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from simtune.training import ppo_math as pm
    from simtune.training.model import fp32_trainable, resolve_precision

    accelerator = Accelerator(
        mixed_precision=resolve_precision(cfg.requested_precision()).mixed_precision,
    )
    # torch's RNG per process (online sampling must differ between processes; rank 0's
    # LoRA init is what DDP broadcasts); the sample order, from `rng`, is shared.
    set_seed(cfg.seed, device_specific=True)
    rng = random.Random(cfg.seed)
    world = accelerator.num_processes
    policy = make_policy(model, cfg)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    reference = None
    if cfg.ppo_reference == "init" and adapter_dir:
        reference = add_reference_adapter(policy, adapter_dir)
    log.info(
        "PPO reference: %s",
        f"the starting adapter {adapter_dir} (frozen copy)" if reference else "the base model",
    )
    module = _PolicyAndValue.build(policy, adapter_dir, reference)
    micro = cfg.per_device_train_batch_size
    mini = micro * cfg.gradient_accumulation_steps * world  # samples per optimizer step
    batch = mini * cfg.num_mini_batches  # samples per rollout, all processes together
    n_rollouts = (
        cfg.max_steps
        if cfg.max_steps > 0
        else max(1, math.ceil(cfg.num_train_epochs * n_samples / batch))
    )
    total_updates = n_rollouts * cfg.ppo_epochs * cfg.num_mini_batches
    fp32_trainable(module)  # a bf16 base: LoRA, value head and AdamW state stay fp32
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_updates),
        num_training_steps=total_updates,
    )
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    inner = accelerator.unwrap_model(module)
    inner.eval()  # see the docstring: no dropout in PPO
    kl_ctl = (
        pm.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        if cfg.adaptive_kl
        else pm.FixedKLController(cfg.kl_coef)
    )
    # Offline scores were normalised over the whole dataset already (build_samples).
    score_norm = pm.RunningScoreNorm(cfg.score_normalization if cfg.rollout == "online" else "none")
    return PPORun(
        accelerator=accelerator,
        module=module,
        inner=inner,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        kl_ctl=kl_ctl,
        score_norm=score_norm,
        rng=rng,
        reference=reference,
        batch=batch,
        n_rollouts=n_rollouts,
    )


def rollout(run: PPORun, cfg: TuningConfig, inputs: PPOInputs, tokenizer: Any) -> Trajectory:
    """Steps 1-2: draw the next batch of samples (the same on every process), roll out
    this process's share, gather the shares and normalise the scores."""
    picked = []
    while len(picked) < run.batch:
        if not run.order:
            run.order = list(range(len(inputs.samples)))
            run.rng.shuffle(run.order)
        picked.append(inputs.samples[run.order.pop()])
    share = run.batch // run.world
    rank = run.accelerator.process_index
    traj = generate_trajectory(
        run.module,
        run.inner.policy,
        picked[rank * share : (rank + 1) * share],
        cfg,
        inputs,
        tokenizer,
        run.accelerator.device,
        run.accelerator.autocast,
    )
    if run.world > 1:
        traj = _gather_trajectory(run.accelerator, traj, tokenizer.pad_token_id)
    run.score_norm.update(traj.raw_scores)
    traj.scores = run.score_norm(traj.raw_scores)
    return traj


def step_metrics(
    run: PPORun, traj: Trajectory, kl: Any, losses: dict[str, float]
) -> dict[str, float]:
    """Step 5: update the KL controller with this rollout's KL; the step's metrics."""
    import torch

    from simtune.training import ppo_math as pm

    acc = run.accelerator
    if run.world > 1:  # every process ran as many micro-batches: the mean of means
        means = acc.reduce(torch.tensor(list(losses.values()), device=acc.device), "mean")
        losses = dict(zip(losses, means.tolist(), strict=True))
    mask = traj.response_mask
    seq_kl = float((kl * mask).sum(dim=1).mean())
    run.kl_ctl.update(seq_kl, run.batch)
    return {
        "ppo/score_mean": float(traj.raw_scores.mean()),
        "ppo/score_std": float(traj.raw_scores.std()) if run.batch > 1 else 0.0,
        "ppo/kl": seq_kl,
        "ppo/kl_coef": float(run.kl_ctl.value),
        "ppo/entropy": float(pm.masked_mean(traj.entropy, mask)),
        "ppo/returns_mean": float(pm.masked_mean(traj.returns, mask)),
        "ppo/response_length": float(mask.sum(dim=1).float().mean()),
        "train/learning_rate": float(run.scheduler.get_last_lr()[0]),
        **{f"ppo/{k}": v for k, v in losses.items()},
    }


def train_ppo(
    cfg: TuningConfig,
    inputs: PPOInputs,
    model: Any,
    tokenizer: Any,
    *,
    log_metrics: Callable[[dict[str, float], int], None],
    adapter_dir: str | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], Any, Any]:
    """Run PPO; returns (final metrics, trained PEFT policy, value head module).

    `adapter_dir` is the adapter training continues from (its value head too, if PPO
    made it). With `checkpoint_dir`, a checkpoint is written there every `save_steps`
    rollout steps and when `should_stop()` turns true (training then returns early);
    `resume_from` continues from one (see `save_checkpoint`)."""
    import torch

    run = setup_ppo(cfg, model, len(inputs.samples), adapter_dir)
    acc = run.accelerator
    if resume_from is not None:
        run.start, run.order, run.history = load_checkpoint(
            Path(resume_from),
            run.inner,
            run.optimizer,
            run.scheduler,
            run.kl_ctl,
            run.rng,
            score_norm=run.score_norm,
        )
    progress = _progress(run.n_rollouts, acc.is_main_process)
    if progress is not None and run.start:
        progress.update(run.start)
    for step in range(run.start + 1, run.n_rollouts + 1):
        traj = rollout(run, cfg, inputs, tokenizer)  # 1-2. rollout and scoring
        with torch.no_grad():  # 3. rewards and advantages
            _, kl = compute_advantages(traj, run.kl_ctl.value, cfg)
        losses = ppo_step(  # 4. PPO epochs over minibatches
            run.module,
            traj,
            cfg,
            accelerator=acc,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            params=run.params,
            rng=run.rng,
        )
        record = step_metrics(run, traj, kl, losses)  # 5. KL control and logging
        run.history.append(record)
        if acc.is_main_process and (step % cfg.logging_steps == 0 or step == run.n_rollouts):
            log_metrics(record, step)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                score=f"{record['ppo/score_mean']:.3f}", kl=f"{record['ppo/kl']:.3f}", refresh=False
            )
        stopping = should_stop is not None and should_stop()
        periodic = cfg.save_steps > 0 and step % cfg.save_steps == 0
        if checkpoint_dir is not None and (stopping or periodic):
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(
                    Path(checkpoint_dir),
                    step,
                    run.inner,
                    run.optimizer,
                    run.scheduler,
                    run.kl_ctl,
                    run.rng,
                    run.order,
                    run.history,
                    score_norm=run.score_norm,
                )
        if stopping:
            break
    if progress is not None:
        progress.close()
    if inputs.reward_source is not None and acc.is_main_process:
        log_metrics(
            {f"reward_source/{k}": float(v) for k, v in inputs.reward_source.stats().items()},
            run.n_rollouts,
        )
    trained = acc.unwrap_model(run.module).policy
    if run.reference is not None:
        trained.delete_adapter(run.reference)  # save_pretrained would save it too
    return summary_metrics(run.history, run.n_rollouts), trained, run.inner.v_head


def summary_metrics(history: list[dict[str, float]], n_rollouts: int) -> dict[str, float]:
    """The job's final PPO figures (TuningResult.metrics, simtune.json, the CLI table)."""
    first, last = history[0], history[-1]
    return {
        "global_step": float(n_rollouts),
        "score_mean_first": first["ppo/score_mean"],
        "score_mean_last": last["ppo/score_mean"],
        "kl_last": last["ppo/kl"],
        "entropy_first": first["ppo/entropy"],
        "entropy_last": last["ppo/entropy"],
        "policy_loss_last": last["ppo/policy_loss"],
        "value_loss_last": last["ppo/value_loss"],
    }


def _gather_trajectory(accelerator: Any, traj: Trajectory, pad_id: int) -> Trajectory:
    """Each process's rollout share -> the whole batch, in rank order, on every process.
    Queries are left-padded and responses right-padded to the widest share first (ids
    with the pad token, the rest with 0, which both masks ignore)."""
    out = {}
    for f in dataclasses.fields(traj):
        t = getattr(traj, f.name)
        if t is None:
            out[f.name] = None
            continue
        if t.dim() > 1:
            pad = pad_id if f.name in ("query_ids", "response_ids") else 0
            first = f.name in ("query_ids", "query_mask")
            t = accelerator.pad_across_processes(t, dim=1, pad_index=pad, pad_first=first)
        out[f.name] = accelerator.gather(t.contiguous())
    return Trajectory(**out)


PPO_STATE_FILE = "ppo_state.json"


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    module: Any,
    optimizer: Any,
    scheduler: Any,
    kl_ctl: Any,
    rng: random.Random,
    order: list[int],
    history: list[dict[str, float]],
    keep: int = 2,
    *,
    score_norm: Any = None,
) -> Path:
    """Write checkpoint-<step>: trainable weights (LoRA + value head), optimizer and
    scheduler state, torch RNG states, and (last, as the completeness marker) a JSON of
    step, KL controller, sample order, Python RNG and metric history. Written to a temp
    dir and renamed, so a kill mid-save leaves no half checkpoint; only the last `keep`
    are kept (each costs an adapter plus two AdamW moments of it)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"checkpoint-{step}"
    tmp = checkpoint_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {
        n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad
    }
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        tmp / "optimizer.pt",
    )
    version, internal, gauss = rng.getstate()
    state = {
        "step": step,
        "kl_ctl": kl_ctl.state_dict(),
        "order": order,
        "python_rng": [version, list(internal), gauss],
        "history": history,
        "score_norm": score_norm.state_dict() if score_norm is not None else None,
    }
    (tmp / PPO_STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted(
        (int(d.name.split("-")[1]), d)
        for d in checkpoint_dir.glob("checkpoint-*")
        if d.name.split("-")[1].isdigit()
    )
    for _, old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path,
    module: Any,
    optimizer: Any,
    scheduler: Any,
    kl_ctl: Any,
    rng: random.Random,
    *,
    score_norm: Any = None,
) -> tuple[int, list[int], list[dict[str, float]]]:
    """Restore what `save_checkpoint` wrote; returns (step, sample order, history)."""
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / PPO_STATE_FILE).read_text(encoding="utf-8"))
    weights = load_file(str(path / "trainable.safetensors"))
    missing, unexpected = module.load_state_dict(weights, strict=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    if unexpected or trainable - set(weights):
        raise DataError(
            f"--resume_from: {path} does not fit this model "
            f"({len(unexpected)} unexpected, {len(trainable - set(weights))} missing tensors)"
        )
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    if score_norm is not None and state.get("score_norm"):
        score_norm.load_state_dict(state["score_norm"])
    version, internal, gauss = state["python_rng"]
    rng.setstate((version, tuple(internal), gauss))
    return int(state["step"]), list(state["order"]), list(state["history"])


def save_value_head(v_head: Any, adapter_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in v_head.state_dict().items()},
        str(adapter_dir / VALUE_HEAD_FILE),
    )


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="PPO", unit="step")
