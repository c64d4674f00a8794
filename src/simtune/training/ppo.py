"""PPO recipe: prefer decisions that earned reward, with a LoRA policy on one shared base.

TRL >= 1.0 has no PPO that trains from a fixed log of (prompt, response, reward), which
is what simulations produce, so simtune owns this compact one (maths in ppo_math.py).

Algorithm, per rollout batch of B = per_device_train_batch_size x
gradient_accumulation_steps x num_mini_batches x processes samples:

1. Rollout. *Offline*: the action is the logged `output`, its score the logged
   reward (else rating) normalised over the dataset (`--score_normalization`).
   *Online*: the policy samples an answer for each prompt (temperature, top-p,
   max_new_tokens) and a reward source scores it (Python function, reward model or
   LLM judge); online scores are used as the source returns them.
2. With no gradient: log-probs of the response tokens under the policy (base + LoRA)
   and under the reference (the same base with the adapter disabled -- no second model
   copy), and values from a linear value head on the policy's last hidden states.
3. Per-token reward r_t = -beta * KL_t (policy || reference), plus the score at the last
   response token. GAE(gamma, lambda) gives advantages and returns; advantages are
   whitened over the batch.
4. `ppo_epochs` passes over the batch in `num_mini_batches` shuffled minibatches, one
   optimizer step each (gradient accumulation over micro-batches of
   per_device_train_batch_size): clipped policy surrogate + vf_coef x clipped value
   loss, gradient clipping at max_grad_norm.
5. beta is fixed, or adapted towards `target_kl` (Ziegler et al. 2019).

Deliberate simplifications (each is a cost we chose to pay, not an oversight):
- Dropout is off for the whole job (model.eval()): old and new log-probs must agree
  exactly before the first update (ratio == 1), and PPO is noisy enough without it.
  Transformers only checkpoints activations in training mode, so
  `--gradient_checkpointing` saves no memory here.
- The reference is the base model even when training continues from an (SFT) adapter:
  KL is measured to the base, which is what "adapter disabled" gives for free. A merged
  SFT reference would need a second copy of the weights.
- Offline PPO treats logged answers as if the current policy had sampled them (what the
  seed system did); the clipped ratio keeps updates bounded but there is no off-policy
  correction beyond that.
- Losses are masked means per micro-batch, so with ragged lengths and gradient
  accumulation the weighting of tokens differs slightly from one big batch.
- The value head reads hidden states from `output_hidden_states=True`, which keeps all
  layers' hidden states for the step (cheap next to the activations autograd keeps).
- Several processes run data-parallel through accelerate (DDP): each one rolls out
  and scores its contiguous share of the batch, then the rollout tensors are gathered
  so advantages, whitening, KL control and logged statistics are those of the whole
  batch, identical on every process. Each process then takes every P-th micro-batch of
  each minibatch. The result equals one process with gradient_accumulation_steps x P
  (same samples, same micro-batches) up to floating-point reduction order; the price
  is that every process holds the gathered batch's tensors (small next to a model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simtune.config import TuningConfig
from simtune.decisions.schema import Decision
from simtune.errors import DataError

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class PPOSample:
    decision: Decision
    query: list[int]
    response: list[int] | None = None
    """Logged answer tokens (offline); None when the policy generates (online)."""
    score: float | None = None


def build_samples(decisions: list[Decision], tokenizer: Any, cfg: TuningConfig) -> list[PPOSample]:
    """Tokenize prompts (and, offline, logged answers with their normalised scores)."""
    from simtune.training.rewards import normalise_scores
    from simtune.training.sft import chat_ids, split_prompt_answer

    offline = cfg.rollout == "offline"
    budget = cfg.max_length - (0 if offline else cfg.max_new_tokens)
    if budget < 8:
        raise DataError(f"--max_length {cfg.max_length} leaves no room for the prompt")
    samples: list[PPOSample] = []
    skipped = 0
    for d in decisions:
        score = d.reward if d.reward is not None else d.rating
        if offline and score is None:
            skipped += 1
            continue
        prompt = d.chat_prompt(cfg.system_prompt)
        response = None
        if offline:
            query, response = split_prompt_answer(tokenizer, prompt, d.output)
            response = response[: max(1, cfg.max_length // 2)]
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


def make_policy(model: Any, cfg: TuningConfig) -> Any:
    """The model with a trainable LoRA adapter (a new one unless it already has one)."""
    from peft import PeftModel, get_peft_model

    from simtune.training.sft import lora_config

    if isinstance(model, PeftModel):
        return model
    return get_peft_model(model, lora_config(cfg))


class _PolicyAndValue:
    """Built lazily so torch is imported only when PPO runs."""

    @staticmethod
    def build(policy: Any, adapter_dir: str | None) -> Any:
        import torch
        from torch import nn

        class PolicyAndValue(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.policy = policy
                hidden = policy.config.hidden_size
                self.v_head = nn.Linear(hidden, 1)
                # Start from value 0 everywhere: no arbitrary baseline in the first batches.
                nn.init.zeros_(self.v_head.weight)
                nn.init.zeros_(self.v_head.bias)

            def forward(
                self,
                input_ids: Any,
                attention_mask: Any,
                *,
                reference: bool = False,
                with_values: bool = True,
            ) -> tuple[Any, Any, Any]:
                from simtune.training.ppo_math import entropy_from_logits, logprobs_from_logits

                if reference:
                    with self.policy.disable_adapter():
                        out = self.policy(input_ids=input_ids, attention_mask=attention_mask)
                    logits = out.logits[:, :-1].float()
                    return logprobs_from_logits(logits, input_ids[:, 1:]), None, None
                out = self.policy(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    output_hidden_states=with_values,
                )
                logits = out.logits[:, :-1].float()
                logp = logprobs_from_logits(logits, input_ids[:, 1:])
                values = None
                if with_values:
                    hidden = out.hidden_states[-1][:, :-1]
                    values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)
                return logp, values, entropy_from_logits(logits)

        module = PolicyAndValue()
        if adapter_dir and (Path(adapter_dir) / VALUE_HEAD_FILE).is_file():
            from safetensors.torch import load_file

            module.v_head.load_state_dict(load_file(str(Path(adapter_dir) / VALUE_HEAD_FILE)))
        module.v_head.to(next(policy.parameters()).device, dtype=torch.float32)
        return module


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


def _generate(
    policy: Any, tokenizer: Any, queries: list[list[int]], cfg: TuningConfig, device: Any
) -> list[list[int]]:
    """Sample one answer per query; the answer ends at (and keeps) the first EOS."""
    import torch

    ids, att = _pad(queries, tokenizer.pad_token_id, left=True)
    with torch.no_grad():
        out = policy.generate(
            input_ids=ids.to(device),
            attention_mask=att.to(device),
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    responses = []
    for row in out[:, ids.shape[1] :].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        responses.append(row or [tokenizer.eos_token_id])
    return responses


def train_ppo(
    cfg: TuningConfig,
    samples: list[PPOSample],
    model: Any,
    tokenizer: Any,
    *,
    reward_source: Any | None,
    log_metrics: Callable[[dict[str, float], int], None],
    adapter_dir: str | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], Any, Any]:
    """Run PPO; returns (final metrics, trained PEFT policy, value head module).

    With `checkpoint_dir`, a checkpoint is written there every `save_steps` rollout
    steps and when `should_stop()` turns true (training then returns early);
    `resume_from` continues from one (see `save_checkpoint`)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from simtune.training import ppo_math as pm
    from simtune.training.model import resolve_precision

    accelerator = Accelerator(
        mixed_precision=resolve_precision(cfg.requested_precision()).mixed_precision,
    )
    # torch's RNG per process (online sampling must differ between processes; rank 0's
    # LoRA init is what DDP broadcasts); the sample order, from `rng`, is shared.
    set_seed(cfg.seed, device_specific=True)
    rng = random.Random(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    policy = make_policy(model, cfg)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    module = _PolicyAndValue.build(policy, adapter_dir)
    micro = cfg.per_device_train_batch_size
    mini = micro * cfg.gradient_accumulation_steps * world  # samples per optimizer step
    batch = mini * cfg.num_mini_batches  # samples per rollout, all processes together
    share = batch // world
    n_rollouts = (
        cfg.max_steps
        if cfg.max_steps > 0
        else max(1, math.ceil(cfg.num_train_epochs * len(samples) / batch))
    )
    total_updates = n_rollouts * cfg.ppo_epochs * cfg.num_mini_batches
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
    device = accelerator.device
    pad_id = tokenizer.pad_token_id

    order: list[int] = []
    history: list[dict[str, float]] = []
    start = 0
    if resume_from is not None:
        start, order, history = load_checkpoint(
            Path(resume_from), inner, optimizer, scheduler, kl_ctl, rng
        )
    progress = _progress(n_rollouts, accelerator.is_main_process)
    if progress is not None and start:
        progress.update(start)
    for step in range(start + 1, n_rollouts + 1):
        # --- 1. rollout ------------------------------------------------------------
        picked = []
        while len(picked) < batch:
            if not order:
                order = list(range(len(samples)))
                rng.shuffle(order)
            picked.append(samples[order.pop()])
        # Every process drew the same `picked` (same `rng`); each rolls out its share.
        picked = picked[rank * share : (rank + 1) * share]
        queries = [s.query for s in picked]
        if cfg.rollout == "offline":
            responses = [s.response for s in picked]
            scores = [float(s.score) for s in picked]
        else:
            responses = _generate(inner.policy, tokenizer, queries, cfg, device)
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            scores = reward_source.score(
                [s.decision.chat_prompt(cfg.system_prompt) for s in picked],
                texts,
                [s.decision for s in picked],
            )
        ids, att = _pad([q + r for q, r in zip(queries, responses, strict=True)], pad_id)
        mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
            mask[i, len(q) - 1 : len(q) - 1 + len(r)] = 1.0
        ids, att, mask = ids.to(device), att.to(device), mask.to(device)
        score_t = torch.tensor(scores, dtype=torch.float32, device=device)

        # --- 2-3. old log-probs, reference, values, rewards, advantages -------------
        with torch.no_grad():
            old_logp, old_values, _ = module(ids, att)
            ref_logp, _, _ = module(ids, att, reference=True)
            if world > 1:
                ids, att, mask, old_logp, old_values, ref_logp, score_t = _gather_batch(
                    accelerator, pad_id, ids, att, mask, old_logp, old_values, ref_logp, score_t
                )
            rewards, kl = pm.compute_rewards(
                score_t, old_logp, ref_logp, mask, kl_ctl.value, cfg.kl_estimator
            )
            adv, returns = pm.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = pm.masked_whiten(adv, mask)

        # --- 4. PPO epochs over minibatches ----------------------------------------
        stats: dict[str, list[float]] = {
            k: []
            for k in (
                "policy_loss",
                "value_loss",
                "clipfrac",
                "approx_kl",
                "value_clipfrac",
                "entropy",
            )
        }
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(
                batch, generator=torch.Generator().manual_seed(rng.getrandbits(31))
            )
            for start in range(0, batch, mini):
                mb = perm[start : start + mini]
                # This process's micro-batches: every world-th of the minibatch's.
                mine = list(range(rank * micro, mini, world * micro))
                for i, m0 in enumerate(mine):
                    idx = mb[m0 : m0 + micro].to(device)
                    last = i == len(mine) - 1
                    # DDP all-reduces gradients on the last micro-batch only.
                    sync = contextlib.nullcontext() if last else accelerator.no_sync(module)
                    with sync:
                        logp, values, entropy = module(ids[idx], att[idx])
                        m = mask[idx]
                        pg, clipfrac, approx_kl = pm.policy_loss(
                            logp, old_logp[idx], adv[idx], m, cfg.cliprange
                        )
                        vf, vclip = pm.value_loss(
                            values, old_values[idx], returns[idx], m, cfg.cliprange_value
                        )
                        loss = (pg + cfg.vf_coef * vf) / cfg.gradient_accumulation_steps
                        accelerator.backward(loss)
                    for k, v in (
                        ("policy_loss", pg),
                        ("value_loss", vf),
                        ("clipfrac", clipfrac),
                        ("approx_kl", approx_kl),
                        ("value_clipfrac", vclip),
                        ("entropy", pm.masked_mean(entropy.detach(), m)),
                    ):
                        stats[k].append(float(v.detach()))
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

        # --- 5. KL control and logging ---------------------------------------------
        losses = {k: sum(v) / len(v) for k, v in stats.items()}
        if world > 1:  # every process ran as many micro-batches: the mean of means
            means = accelerator.reduce(torch.tensor(list(losses.values()), device=device), "mean")
            losses = dict(zip(losses, means.tolist(), strict=True))
        seq_kl = float((kl * mask).sum(dim=1).mean())
        kl_ctl.update(seq_kl, batch)
        record = {
            "ppo/score_mean": float(score_t.mean()),
            "ppo/score_std": float(score_t.std()) if batch > 1 else 0.0,
            "ppo/kl": seq_kl,
            "ppo/kl_coef": float(kl_ctl.value),
            "ppo/returns_mean": float(pm.masked_mean(returns, mask)),
            "ppo/response_length": float(mask.sum(dim=1).mean()),
            "train/learning_rate": float(scheduler.get_last_lr()[0]),
            **{f"ppo/{k}": v for k, v in losses.items()},
        }
        history.append(record)
        if accelerator.is_main_process and (step % cfg.logging_steps == 0 or step == n_rollouts):
            log_metrics(record, step)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                score=f"{record['ppo/score_mean']:.3f}", kl=f"{seq_kl:.3f}", refresh=False
            )
        stopping = should_stop is not None and should_stop()
        periodic = cfg.save_steps > 0 and step % cfg.save_steps == 0
        if checkpoint_dir is not None and (stopping or periodic):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(
                    Path(checkpoint_dir),
                    step,
                    inner,
                    optimizer,
                    scheduler,
                    kl_ctl,
                    rng,
                    order,
                    history,
                )
        if stopping:
            break
    if progress is not None:
        progress.close()
    if reward_source is not None and accelerator.is_main_process:
        log_metrics(
            {f"reward_source/{k}": float(v) for k, v in reward_source.stats().items()}, n_rollouts
        )
    last = history[-1]
    metrics = {
        "global_step": float(n_rollouts),
        "score_mean_first": history[0]["ppo/score_mean"],
        "score_mean_last": last["ppo/score_mean"],
        "kl_last": last["ppo/kl"],
        "policy_loss_last": last["ppo/policy_loss"],
        "value_loss_last": last["ppo/value_loss"],
    }
    return metrics, accelerator.unwrap_model(module).policy, inner.v_head


def _gather_batch(accelerator: Any, pad_id: int, *tensors: Any) -> list[Any]:
    """Each process's rollout share -> the whole batch, in rank order, on every process.
    Shares are right-padded to the widest one first (ids with the pad token, the rest
    with 0, which the attention mask and the response mask both ignore)."""
    ids, *rest = tensors
    out = [accelerator.gather(accelerator.pad_across_processes(ids, dim=1, pad_index=pad_id))]
    for t in rest:
        if t.dim() > 1:
            t = accelerator.pad_across_processes(t, dim=1, pad_index=0)
        out.append(accelerator.gather(t.contiguous()))
    return out


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
