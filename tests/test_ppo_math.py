"""PPO maths against plain Python loops over rows and tokens (no vectorisation in the reference)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from simtune.training.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningScoreNorm,
    compute_rewards,
    entropy_from_logits,
    gae,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

SEEDS = [0, 1, 2, 3]
B, T, V = 7, 13, 11
TOL = {"rtol": 1e-5, "atol": 1e-5}


def make_mask(gen: torch.Generator, b: int = B, t: int = T) -> torch.Tensor:
    """One contiguous block per row at a random offset with a ragged length.

    Row 0 is empty, row 1 is full, row 2 runs to the last position (no padding) and row 3 is a
    single token; the rest are random.
    """
    mask = torch.zeros(b, t)
    for row in range(1, b):
        if row == 1:
            start, length = 0, t
        elif row == 2:
            start = int(torch.randint(1, t, (1,), generator=gen))
            length = t - start
        elif row == 3:
            start, length = int(torch.randint(0, t, (1,), generator=gen)), 1
        else:
            start = int(torch.randint(0, t, (1,), generator=gen))
            length = int(torch.randint(1, t - start + 1, (1,), generator=gen))
        mask[row, start : start + length] = 1
    return mask


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def setup(seed: int) -> tuple[torch.Generator, torch.Tensor]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    return gen, make_mask(gen)


def masked_items(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    xs, ms = x.tolist(), mask.tolist()
    return [xs[b][t] for b in range(len(ms)) for t in range(len(ms[b])) if ms[b][t]]


def ref_mean(vals: list[float]) -> float:
    return sum(vals) / len(vals) if vals else 0.0


def ref_var(vals: list[float], unbiased: bool = True) -> float:
    if not vals:
        return 0.0
    mu = ref_mean(vals)
    ss = sum((v - mu) ** 2 for v in vals)
    n = len(vals)
    return ss / (n - 1) if unbiased and n > 1 else ss / n


def close(actual: torch.Tensor, expected: object) -> None:
    expected_t = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected_t, **TOL)


def finite(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert torch.isfinite(t).all(), t


# -- masked statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_mean(seed: int) -> None:
    gen, mask = setup(seed)
    x = rand(gen, B, T)
    close(masked_mean(x, mask), ref_mean(masked_items(x, mask)))
    close(masked_mean(x, mask.bool()), ref_mean(masked_items(x, mask)))
    rows = [ref_mean(masked_items(x[b : b + 1], mask[b : b + 1])) for b in range(B)]
    close(masked_mean(x, mask, dim=1), rows)
    cols = [ref_mean(masked_items(x[:, t : t + 1], mask[:, t : t + 1])) for t in range(T)]
    close(masked_mean(x, mask, dim=0), cols)
    assert masked_mean(x, mask, dim=1)[0] == 0  # the empty row


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_var(seed: int) -> None:
    gen, mask = setup(seed)
    x = rand(gen, B, T) * 3 + 1
    vals = masked_items(x, mask)
    close(masked_var(x, mask), ref_var(vals, unbiased=True))
    close(masked_var(x, mask, unbiased=False), ref_var(vals, unbiased=False))


def test_masked_stats_empty_and_single() -> None:
    x = torch.randn(3, 4)
    empty = torch.zeros(3, 4)
    for out in (masked_mean(x, empty), masked_var(x, empty), masked_var(x, empty, False)):
        assert out == 0
    assert (masked_mean(x, empty, dim=1) == 0).all()
    assert (masked_whiten(x, empty) == 0).all()
    one = torch.zeros(3, 4)
    one[1, 2] = 1
    assert masked_var(x, one) == 0  # count 1: no Bessel correction (no division by zero)
    close(masked_mean(x, one), x[1, 2].item())


def test_masked_stats_ignore_garbage_outside_mask() -> None:
    x = torch.randn(2, 5)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    dirty = x.clone()
    dirty[mask == 0] = float("nan")
    dirty[1, 0] = float("inf")
    close(masked_mean(dirty, mask), masked_mean(x, mask).item())
    close(masked_var(dirty, mask), masked_var(x, mask).item())
    finite(masked_whiten(dirty, mask))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(seed: int, shift_mean: bool) -> None:
    gen, mask = setup(seed)
    x = rand(gen, B, T) * 5 - 2
    eps = 1e-8
    vals = masked_items(x, mask)
    mu, var = ref_mean(vals), ref_var(vals)
    xs, ms = x.tolist(), mask.tolist()
    expected = [
        [
            ((xs[b][t] - mu) / math.sqrt(var + eps) + (0.0 if shift_mean else mu))
            if ms[b][t]
            else 0.0
            for t in range(T)
        ]
        for b in range(B)
    ]
    out = masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    close(out, expected)
    if shift_mean:
        close(masked_mean(out, mask), 0.0)
        close(masked_var(out, mask), 1.0)
    assert (out[mask == 0] == 0).all()


# -- log-probs and entropy -----------------------------------------------------------------------


def ref_logsumexp(row: list[float]) -> float:
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


@pytest.mark.parametrize("seed", SEEDS)
def test_logprobs_from_logits(seed: int) -> None:
    gen, _ = setup(seed)
    logits = rand(gen, B, T, V) * 4
    labels = torch.randint(0, V, (B, T), generator=gen)
    ls, ys = logits.tolist(), labels.tolist()
    expected = [[ls[b][t][ys[b][t]] - ref_logsumexp(ls[b][t]) for t in range(T)] for b in range(B)]
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (B, T) and out.dtype == torch.float32
    close(out, expected)
    # bf16 logits are upcast: the result is float32 and matches the float32 maths of the same values
    out_bf16 = logprobs_from_logits(logits.bfloat16(), labels)
    assert out_bf16.dtype == torch.float32
    close(out_bf16, logprobs_from_logits(logits.bfloat16().float(), labels))


@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_from_logits(seed: int) -> None:
    gen, _ = setup(seed)
    logits = rand(gen, B, T, V) * 4
    expected = []
    for b in range(B):
        row = []
        for t in range(T):
            lse = ref_logsumexp(logits[b, t].tolist())
            h = 0.0
            for v in logits[b, t].tolist():
                lp = v - lse
                h -= math.exp(lp) * lp
            row.append(h)
        expected.append(row)
    out = entropy_from_logits(logits)
    assert out.shape == (B, T) and out.dtype == torch.float32
    close(out, expected)
    close(entropy_from_logits(torch.zeros(1, 1, V)), [[math.log(V)]])  # uniform


def test_entropy_with_banned_tokens_is_finite_with_finite_grad() -> None:
    logits = torch.randn(2, 3, V)
    logits[..., :4] = float("-inf")
    logits.requires_grad_(True)
    h = entropy_from_logits(logits)
    close(h, entropy_from_logits(logits.detach()[..., 4:]))
    h.sum().backward()
    finite(h, logits.grad[..., 4:])
    assert torch.isfinite(logits.grad).all()


# -- KL and rewards ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_estimate(seed: int) -> None:
    gen, _ = setup(seed)
    logp, ref_logp = rand(gen, B, T), rand(gen, B, T)
    lp, rp = logp.tolist(), ref_logp.tolist()

    def per_token(f: Callable[[float, float], float]) -> list[list[float]]:
        return [[f(lp[b][t], rp[b][t]) for t in range(T)] for b in range(B)]

    close(kl_estimate(logp, ref_logp), per_token(lambda a, r: a - r))
    close(kl_estimate(logp, ref_logp, "k1"), per_token(lambda a, r: a - r))
    close(kl_estimate(logp, ref_logp, "abs"), per_token(lambda a, r: abs(a - r)))
    k3 = kl_estimate(logp, ref_logp, "k3")
    close(k3, per_token(lambda a, r: (math.exp(r - a) - 1) - (r - a)))
    assert (k3 >= 0).all()
    assert (kl_estimate(logp, logp, "k1") == 0).all()
    assert (kl_estimate(logp, logp, "k3") == 0).all()


def test_kl_k3_nonnegative_wide_range() -> None:
    logp = torch.linspace(-30, 0, 301).unsqueeze(0)
    ref = torch.linspace(0, -30, 301).unsqueeze(0)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, logp + 1e-7, "k3") >= 0).all()


def test_kl_unknown_kind() -> None:
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k2")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["k1", "k3", "abs"])
def test_compute_rewards(seed: int, kind: str) -> None:
    gen, mask = setup(seed)
    logp, ref_logp, scores = rand(gen, B, T), rand(gen, B, T), rand(gen, B)
    coef = 0.05
    kl_tok = kl_estimate(logp, ref_logp, kind).tolist()
    ms = mask.tolist()
    exp_kl = [[kl_tok[b][t] if ms[b][t] else 0.0 for t in range(T)] for b in range(B)]
    exp_r = [[-coef * exp_kl[b][t] for t in range(T)] for b in range(B)]
    for b in range(B):
        last = None
        for t in range(T):
            if ms[b][t]:
                last = t
        if last is not None:
            exp_r[b][last] += scores[b].item()
    rewards, kl = compute_rewards(scores, logp, ref_logp, mask, coef, kind)
    close(kl, exp_kl)
    close(rewards, exp_r)


@pytest.mark.parametrize("seed", SEEDS)
def test_compute_rewards_score_lands_on_last_masked_token(seed: int) -> None:
    gen, mask = setup(seed)
    logp = rand(gen, B, T)
    scores = torch.arange(1, B + 1, dtype=torch.float32) * 10
    rewards, kl = compute_rewards(scores, logp, logp, mask, kl_coef=0.1)
    assert (kl == 0).all()
    for b in range(B):
        idx = mask[b].nonzero().flatten().tolist()
        expected = torch.zeros(T)
        if idx:
            expected[idx[-1]] = scores[b]
        assert torch.equal(rewards[b], expected), (b, rewards[b], mask[b])


def test_compute_rewards_ignores_garbage_outside_mask() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    logp = torch.full((2, 4), -1.0)
    ref = logp.clone()
    ref[mask == 0] = 500.0  # exp(500) overflows: k3 is inf there
    rewards, kl = compute_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, 0.1, "k3")
    finite(rewards, kl)
    assert rewards.tolist() == [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


# -- GAE -----------------------------------------------------------------------------------------


def ref_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[list[list[float]], list[list[float]]]:
    rs, vs, ms = rewards.tolist(), values.tolist(), mask.tolist()
    advs, rets = [], []
    for b in range(len(rs)):
        n = len(rs[b])
        adv = [0.0] * n
        nxt = 0.0
        for t in reversed(range(n)):
            in_next = t + 1 < n and ms[b][t + 1] == 1
            next_value = vs[b][t + 1] if in_next else 0.0
            next_adv = nxt if in_next else 0.0
            delta = rs[b][t] + gamma * next_value - vs[b][t]
            adv[t] = delta + gamma * lam * next_adv
            nxt = adv[t]
        advs.append([adv[t] if ms[b][t] else 0.0 for t in range(n)])
        rets.append([adv[t] + vs[b][t] if ms[b][t] else 0.0 for t in range(n)])
    return advs, rets


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae(seed: int, gamma: float, lam: float) -> None:
    gen, mask = setup(seed)
    rewards, values = rand(gen, B, T), rand(gen, B, T)
    rewards = rewards * mask  # as compute_rewards produces them
    exp_adv, exp_ret = ref_gae(rewards, values * mask, mask, gamma, lam)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    close(adv, exp_adv)
    close(ret, exp_ret)


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_reward_to_go(seed: int) -> None:
    gen, mask = setup(seed)
    rewards = rand(gen, B, T) * mask
    adv, ret = gae(rewards, torch.zeros(B, T), mask, gamma=1.0, lam=1.0)
    rs, ms = rewards.tolist(), mask.tolist()
    expected = [
        [sum(rs[b][s] for s in range(t, T) if ms[b][s]) if ms[b][t] else 0.0 for t in range(T)]
        for b in range(B)
    ]
    close(adv, expected)
    close(ret, expected)


def test_gae_block_end_resets_and_garbage_outside_mask_ignored() -> None:
    # Row 0: response in the middle, then padding with large rewards/values that must not leak in.
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    rewards = torch.tensor([[9.0, 1.0, 2.0, 100.0, 100.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    values = torch.tensor([[9.0, 0.5, 0.25, 1e30, float("nan")], [float("nan")] * 5])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    finite(adv, ret)
    a2 = 2.0 - 0.25  # block end: no bootstrap
    a1 = 1.0 + 0.9 * 0.25 - 0.5 + 0.9 * 0.5 * a2
    close(adv, [[0.0, a1, a2, 0.0, 0.0], [0.0] * 5])
    close(ret, [[0.0, a1 + 0.5, a2 + 0.25, 0.0, 0.0], [0.0] * 5])


def test_gae_recursion_resets_at_any_gap() -> None:
    # Outside the stated convention (one block per row), but the recursion is defined for it:
    # A_{t+1} and V_{t+1} count only where mask[t+1] == 1, so a gap cuts the chain.
    gen = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [0, 1, 0, 0, 1, 1]], dtype=torch.float32)
    rewards, values = rand(gen, 2, 6) * mask, rand(gen, 2, 6)
    exp_adv, exp_ret = ref_gae(rewards, values * mask, mask, 0.9, 0.7)
    adv, ret = gae(rewards, values, mask, 0.9, 0.7)
    close(adv, exp_adv)
    close(ret, exp_ret)


# -- losses --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cliprange", [0.1, 0.2])
def test_policy_loss(seed: int, cliprange: float) -> None:
    gen, mask = setup(seed)
    logp = rand(gen, B, T) * 0.3
    old_logp = logp + rand(gen, B, T) * 0.3
    adv = rand(gen, B, T)
    lp, op, av, ms = logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist()
    losses, clips, kls = [], [], []
    for b in range(B):
        for t in range(T):
            if not ms[b][t]:
                continue
            ratio = math.exp(lp[b][t] - op[b][t])
            unclipped = -av[b][t] * ratio
            clipped = -av[b][t] * min(max(ratio, 1 - cliprange), 1 + cliprange)
            losses.append(max(unclipped, clipped))
            clips.append(1.0 if clipped > unclipped else 0.0)
            kls.append(0.5 * (lp[b][t] - op[b][t]) ** 2)
    loss, clipfrac, approx_kl = policy_loss(logp, old_logp, adv, mask, cliprange)
    close(loss, ref_mean(losses))
    close(clipfrac, ref_mean(clips))
    close(approx_kl, ref_mean(kls))
    assert 0 < clipfrac.item() < 1  # the fixture exercises both branches


@pytest.mark.parametrize("seed", SEEDS)
def test_policy_loss_on_policy(seed: int) -> None:
    gen, mask = setup(seed)
    logp = rand(gen, B, T).requires_grad_(True)
    adv = rand(gen, B, T)
    loss, clipfrac, approx_kl = policy_loss(logp, logp.detach(), adv, mask, 0.2)
    assert clipfrac.item() == 0
    assert approx_kl.item() == 0
    close(loss, (-masked_mean(adv, mask)).item())
    loss.backward()
    # d loss / d logp = -A / n on masked tokens: the vanilla policy gradient when on-policy.
    close(logp.grad, -adv * mask / mask.sum())


def test_policy_loss_grads_finite_with_garbage_outside_mask() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    logp = torch.tensor([[0.0, -1.0, -2.0, 200.0], [300.0, 0.0, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-50.0, -1.1, -1.9, -200.0], [-300.0, 0.0, 0.0, 0.0]])
    adv = torch.tensor([[0.0, 1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    loss, clipfrac, approx_kl = policy_loss(logp, old, adv, mask, 0.2)
    loss.backward()
    finite(loss, clipfrac, approx_kl, logp.grad)
    assert (logp.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cliprange_value", [0.1, 0.5])
def test_value_loss(seed: int, cliprange_value: float) -> None:
    gen, mask = setup(seed)
    values, old_values, returns = rand(gen, B, T), rand(gen, B, T), rand(gen, B, T)
    vs, ov, rt, ms = values.tolist(), old_values.tolist(), returns.tolist(), mask.tolist()
    losses, clips = [], []
    for b in range(B):
        for t in range(T):
            if not ms[b][t]:
                continue
            v_clipped = min(max(vs[b][t], ov[b][t] - cliprange_value), ov[b][t] + cliprange_value)
            unclipped = (vs[b][t] - rt[b][t]) ** 2
            clipped = (v_clipped - rt[b][t]) ** 2
            losses.append(max(unclipped, clipped))
            clips.append(1.0 if clipped > unclipped else 0.0)
    loss, clipfrac = value_loss(values, old_values, returns, mask, cliprange_value)
    close(loss, 0.5 * ref_mean(losses))
    close(clipfrac, ref_mean(clips))
    assert 0 < clipfrac.item() < 1


def test_value_loss_unclipped_when_values_unchanged() -> None:
    values = torch.randn(3, 5, requires_grad=True)
    returns = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float32)
    loss, clipfrac = value_loss(values, values.detach(), returns, mask, 0.2)
    assert clipfrac.item() == 0
    close(loss, (0.5 * masked_mean((values - returns) ** 2, mask)).item())
    loss.backward()
    finite(values.grad)


def test_value_clipfrac_is_zero_when_nothing_is_clipped() -> None:
    """Values that moved, but by less than the clip range: no token counts as clipped.
    (`old + clamp(V - old)` differs from V in the last bit and counted about half.)"""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(64, 32, generator=gen) * 0.5
    old = values + (torch.rand(64, 32, generator=gen) * 2 - 1) * 0.19  # within the range
    returns = torch.randn(64, 32, generator=gen)
    # the old formula's V_clipped is not V bit for bit here (it counted ~3 % as clipped)
    assert (old + torch.clamp(values - old, -0.2, 0.2) != values).any()
    loss, clipfrac = value_loss(values, old, returns, torch.ones(64, 32), 0.2)
    assert clipfrac.item() == 0.0
    close(loss, (0.5 * ((values - returns) ** 2).mean()).item())
    # moved past the range: counted where clipping raises the loss (TRL's definition)
    far = old + 1.0
    _, clipfrac = value_loss(far, old, old + 5.0, torch.ones(64, 32), 0.2)
    assert clipfrac.item() == 1.0  # V_clipped = old + 0.2 is further from R = old + 5
    _, clipfrac = value_loss(far, old, old, torch.ones(64, 32), 0.2)
    assert clipfrac.item() == 0.0  # V_clipped is closer to R: the unclipped term wins


@pytest.mark.parametrize("method", ["zscore", "minmax", "none"])
def test_running_score_norm_uses_every_score_so_far(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=gen) * 5 + 3 for n in (4, 7, 1, 6)]
    norm = RunningScoreNorm(method)
    seen: list[float] = []
    for b in batches:
        norm.update(b)
        seen += b.tolist()
        got = norm(b)
        mean = sum(seen) / len(seen)
        if method == "zscore":
            std = math.sqrt(sum((x - mean) ** 2 for x in seen) / len(seen))
            want = [(x - mean) / std for x in b.tolist()]
        elif method == "minmax":
            lo, hi = min(seen), max(seen)
            want = [(x - (hi + lo) / 2) / ((hi - lo) / 2) for x in b.tolist()]
        else:
            want = b.tolist()
        close(got, want)
    clone = RunningScoreNorm("none")
    clone.load_state_dict(norm.state_dict())
    close(clone(batches[0]), norm(batches[0]))
    # constant scores so far: only shifted, never divided by ~0
    flat = RunningScoreNorm(method)
    flat.update(torch.full((5,), 2.0))
    finite(flat(torch.full((5,), 2.0)))


# -- all-zero mask: nothing is NaN ---------------------------------------------------------------


def test_all_zero_mask_everywhere() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, T)
    x = rand(gen, 2, T).requires_grad_(True)
    y = rand(gen, 2, T)
    rewards, kl = compute_rewards(torch.ones(2), x, y, mask, 0.1, "k3")
    adv, ret = gae(rewards, y, mask, 1.0, 0.95)
    whitened = masked_whiten(adv, mask)
    ploss, pclip, pkl = policy_loss(x, y, whitened, mask, 0.2)
    vloss, vclip = value_loss(x, y, ret, mask, 0.2)
    outs = [rewards, kl, adv, ret, whitened, ploss, pclip, pkl, vloss, vclip]
    outs += [masked_mean(x, mask), masked_var(x, mask), masked_mean(x, mask, dim=1)]
    finite(*outs)
    for o in outs:
        assert (o == 0).all()
    (ploss + vloss).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# -- KL controllers ------------------------------------------------------------------------------


def test_fixed_kl_controller() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=64)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=1000)
    ctl.update(current_kl=6.6, n_steps=100)  # 10 % over target
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 100 / 1000))
    before = ctl.value
    ctl.update(current_kl=3.0, n_steps=100)  # 50 % under: clipped to -20 %
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 100 / 1000))
    assert ctl.value < before

    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(current_kl=600.0, n_steps=1000)  # far over target: at most +20 % per horizon
    assert ctl.value == pytest.approx(0.12)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(current_kl=0.0, n_steps=500)  # far under: at most -20 % per horizon, pro rata
    assert ctl.value == pytest.approx(0.09)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(current_kl=6.0, n_steps=1000)  # on target: unchanged
    assert ctl.value == pytest.approx(0.1)

    ctl.update(current_kl=60.0, n_steps=250)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    restored.update(current_kl=0.0, n_steps=250)
    ctl.update(current_kl=0.0, n_steps=250)
    assert restored.value == ctl.value
