"""The maths of PPO for language models: masked statistics, log-probs, KL, rewards, GAE, losses.

Everything here is a pure function of tensors (plus two tiny KL-coefficient controllers), so
each piece is unit-tested against plain Python loops in tests/test_ppo_math.py and the PPO
recipe in training/ppo.py only composes them. No transformers/peft imports: torch only.

Conventions. Per-token tensors are (B, T) float32. `mask` is (B, T), bool or 0/1 float, with 1 on
response tokens: within a row the 1s form one contiguous block that may start anywhere (prompt
before it, right-padding after it), rows are ragged, and a row may be all zeros. Positions outside
the mask may hold anything (padding logits give garbage log-probs), so we select with
`torch.where` rather than multiply by the mask: `0 * inf` is NaN, and so is its gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "RunningScoreNorm",
    "compute_rewards",
    "entropy_from_logits",
    "gae",
    "kl_estimate",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "sampling_logprobs",
    "value_loss",
    "warp_logits",
]


def _keep(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over masked entries (all of them, or along `dim`); 0 where nothing is masked."""
    keep = _keep(mask)
    total = torch.where(keep, x, torch.zeros_like(x))
    count = keep.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over all masked entries; Bessel-corrected when `unbiased` and count > 1."""
    keep = _keep(mask)
    n = keep.to(x.dtype).sum()
    centered = torch.where(keep, x - masked_mean(x, keep), torch.zeros_like(x))
    var = centered.square().sum() / n.clamp(min=1)
    if unbiased:
        # n / (n - 1) for n > 1, 1 for n == 1 (and var is 0 anyway for n == 0); no data-dependent
        # Python branch, so no host sync on GPU.
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with masked batch statistics; 0 outside the mask.

    Whitening over the whole batch (not per row) keeps the relative size of advantages between
    samples, which is the signal; with `shift_mean=False` only the scale changes (used for
    rewards, whose sign carries meaning).
    """
    keep = _keep(mask)
    mean = masked_mean(x, keep)
    var = masked_var(x, keep)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(keep, out, torch.zeros_like(out))


def warp_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """The logits a sampler draws from: divided by `temperature`, then -inf outside the top-k
    tokens (`top_k` > 0), then outside the nucleus (`top_p` < 1). (..., V) -> (..., V) float32.

    The same steps, in the same order and with the same tie rules, as transformers'
    TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper (tests check equality), so
    log-probs computed here are those of the distribution `generate` sampled from.
    """
    out = logits.float() / temperature
    if top_k > 0 and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(out, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sampling_logprobs(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    *,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `labels` (and, optionally, the entropy) under the sampling distribution
    `warp_logits` describes: (B, T, V), (B, T) -> (B, T) float32, and (B, T) or None.

    With top-k/top-p the label's own logit is always kept in the support: a token sampled
    from the set must not fall out of it through a rounding difference between the cached
    generation pass and this teacher-forced one (or, for the updated policy, because its set
    moved), which would give log 0 = -inf and a NaN step. Without them this is exactly
    log_softmax(logits / temperature)[labels]. One row at a time: the peak extra memory is
    one (T, V) float32 buffer instead of a (B, T, V) one (V is ~150k for recent tokenizers).
    """
    rows, entropies = [], []
    masked = top_k > 0 or top_p < 1.0
    for row_logits, row_labels in zip(logits, labels, strict=True):
        row_labels = row_labels.long().unsqueeze(-1)
        warped = warp_logits(row_logits, temperature, top_k, top_p)
        if with_entropy:
            entropies.append(entropy_from_logits(warped.unsqueeze(0))[0])
        if masked:
            own = (row_logits.float() / temperature).gather(-1, row_labels)
            warped = warped.scatter(-1, row_labels, own)
        picked = warped.gather(-1, row_labels).squeeze(-1)
        rows.append(picked - torch.logsumexp(warped, dim=-1))
    if not rows:
        empty = logits.new_zeros(labels.shape, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    return torch.stack(rows), (torch.stack(entropies) if with_entropy else None)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels]: (B, T, V), (B, T) -> (B, T) float32 (`sampling_logprobs`
    at temperature 1 with the full vocabulary)."""
    return sampling_logprobs(logits, labels)[0]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits): (B, T, V) -> (B, T) float32, one row at a time (memory)."""
    rows = []
    for row_logits in logits:
        logp = torch.log_softmax(row_logits.float(), dim=-1)
        # Logits of -inf (banned tokens) give p = 0, logp = -inf and p * logp = NaN; their true
        # contribution is 0. Zero logp there before the product so the gradient stays finite too.
        logp_finite = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
        rows.append(-(logp.exp() * logp_finite).sum(-1))
    if not rows:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.stack(rows)


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    k1 = log pi - log pi_ref: unbiased but high-variance and can be negative per token.
    k3 = (r - 1) - log r with r = pi_ref / pi (Schulman, "Approximating KL divergence"): unbiased,
    lower variance, and >= 0 for every token. abs = |k1|: biased, but >= 0 too.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_r = ref_logp - logp
        return torch.expm1(log_r) - log_r  # expm1 keeps precision when r is close to 1
    if kind == "abs":
        return (logp - ref_logp).abs()
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k3' or 'abs'")


def compute_rewards(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: -kl_coef * KL on every response token, plus the sequence score on the last.

    The score (B,) arrives once per sample, so it goes on the token that ended the response;
    GAE then carries it back. Rows with an empty mask get no score. Returns (rewards, kl), both
    (B, T) and 0 outside the mask.
    """
    keep = _keep(mask)
    kl = kl_estimate(logp, ref_logp, kl_kind)
    kl = torch.where(keep, kl, torch.zeros_like(kl))
    rewards = -kl_coef * kl
    positions = torch.arange(keep.shape[1], device=keep.device)
    last = torch.where(keep, positions, 0).amax(dim=1)  # 0 for an empty row...
    has_tokens = keep.any(dim=1)
    bonus = torch.where(has_tokens, scores.to(rewards.dtype), 0)  # ...which then gets 0 added
    rewards = rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))
    return rewards, kl


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation inside each row's response block.

    A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t, where V_{t+1}
    and A_{t+1} count only if token t+1 is in the mask: the block's last token bootstraps from
    nothing (the episode ended), and padding never leaks in. Returns (advantages, returns =
    advantages + values), 0 outside the mask. Pass detached tensors: the result is a target.
    Loops over T (sequential by nature), vectorised over B.
    """
    keep = _keep(mask)
    m = keep.to(rewards.dtype)
    zeros = torch.zeros_like(rewards)
    # Garbage outside the mask must not reach the recursion through V_{t+1}.
    r = torch.where(keep, rewards, zeros)
    v = torch.where(keep, values, zeros)
    T = rewards.shape[1]
    next_adv = rewards.new_zeros(rewards.shape[0])
    next_value = rewards.new_zeros(rewards.shape[0])
    reversed_adv = []
    for t in reversed(range(T)):
        if t + 1 < T:
            next_value = v[:, t + 1]
            next_adv = next_adv * m[:, t + 1]
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = delta + gamma * lam * next_adv
        reversed_adv.append(next_adv)
    if T == 0:
        return zeros, zeros
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    advantages = torch.where(keep, advantages, zeros)
    returns = torch.where(keep, advantages + v, zeros)
    return advantages, returns


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate. Returns (loss, clipfrac, approx_kl).

    loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))): the pessimistic
    bound, so a step gains nothing by moving the ratio past the clip range. clipfrac (share of
    tokens where the clipped term won) and approx_kl (0.5 * (logp - old_logp)^2) are detached
    diagnostics: a rising clipfrac means the learning rate or the number of PPO epochs is too
    high.
    """
    keep = _keep(mask)
    # Zero the log-ratio outside the mask first: exp(garbage) may be inf, and inf * 0 in the
    # backward pass would be NaN even though the forward pass masks it out.
    log_ratio = torch.where(keep, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), keep)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), keep)
        approx_kl = masked_mean(0.5 * log_ratio.square(), keep)
    return loss, clipfrac, approx_kl


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, Tensor]:
    """Clipped value loss: 0.5 * masked_mean(max((V - R)^2, (V_clipped - R)^2)).

    V_clipped = clamp(V, V_old - c, V_old + c) stays within cliprange_value of the rollout's
    values, so one batch cannot drag the value head far (its scale differs from the
    policy's, hence a separate range). Clamping V itself (TRL's formula) rather than adding a
    clamped delta to V_old keeps V_clipped bit-identical to V inside the range, so clipfrac
    (the share of tokens where the clipped term is larger) is 0 when nothing is clipped;
    `V_old + clamp(V - V_old)` differs from V in the last bit and counted about half of the
    unclipped tokens. Returns (loss, clipfrac), clipfrac detached.
    """
    keep = _keep(mask)
    zeros = torch.zeros_like(values)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    err = torch.where(keep, values - returns, zeros)
    err_clipped = torch.where(keep, clipped_values - returns, zeros)
    unclipped = err.square()
    clipped = err_clipped.square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), keep)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), keep)
    return loss, clipfrac


class FixedKLController:
    """A constant KL coefficient (same interface as AdaptiveKLController)."""

    def __init__(self, kl_coef: float) -> None:
        self.value: float = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """KL coefficient steered toward a target KL (Ziegler et al. 2019, "Fine-Tuning LMs from
    Human Preferences").

    After each batch: e = clip(KL / target - 1, -0.2, 0.2); value *= 1 + e * n_steps / horizon.
    The clip bounds the change to +-20 % per `horizon` samples, so one noisy KL estimate cannot
    swing the coefficient. `n_steps` is the number of samples in the batch just used.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value: float = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.value = float(d["value"])
        self.target = float(d.get("target", self.target))
        self.horizon = int(d.get("horizon", self.horizon))


class RunningScoreNorm:
    """Online scores normalised with running statistics of every score seen so far.

    'zscore': (s - mean) / std over all scores so far (this batch included; Chan et al.'s
    parallel update of mean and variance), which makes the balance between the score and
    the KL penalty independent of the reward's scale -- a share of digits in [0, 0.1] and a
    profit in [-1000, 1000] train alike under the same kl_coef (TRL's old PPOTrainer
    `use_score_norm`; OpenRLHF's `normalize_reward`). 'minmax': linearly onto [-1, 1] by
    the running minimum and maximum. 'none': unchanged. While every score so far is equal
    only the mean (zscore) or the midpoint (minmax) is subtracted.
    """

    def __init__(self, method: str = "zscore") -> None:
        if method not in ("zscore", "minmax", "none"):
            raise ValueError(f"unknown score normalisation {method!r}")
        self.method = method
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.low = math.inf
        self.high = -math.inf

    def update(self, scores: Tensor) -> None:
        values = [float(v) for v in scores.detach().flatten().tolist()]
        if not values:
            return
        n = len(values)
        mean = sum(values) / n
        m2 = sum((v - mean) ** 2 for v in values)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.low = min(self.low, *values)
        self.high = max(self.high, *values)

    def __call__(self, scores: Tensor) -> Tensor:
        if self.method == "none" or self.count == 0:
            return scores
        if self.method == "zscore":
            std = math.sqrt(self.m2 / self.count)
            shifted = scores - self.mean
            return shifted / std if std > 1e-8 * max(1.0, abs(self.mean)) else shifted
        mid, half = (self.high + self.low) / 2, (self.high - self.low) / 2
        shifted = scores - mid
        return shifted / half if half > 1e-8 * max(1.0, abs(mid)) else shifted

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "count": self.count,
            "mean": self.mean,
            "m2": self.m2,
            "low": self.low if math.isfinite(self.low) else None,
            "high": self.high if math.isfinite(self.high) else None,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.method = str(d["method"])
        self.count = int(d["count"])
        self.mean = float(d["mean"])
        self.m2 = float(d["m2"])
        self.low = math.inf if d.get("low") is None else float(d["low"])
        self.high = -math.inf if d.get("high") is None else float(d["high"])
