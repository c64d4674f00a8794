"""PPO and reward-model training, online rollouts and their reward source (TRL names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from simtune.config import checks

ROLLOUTS = ("offline", "online")
NORMALISATIONS = ("zscore", "minmax", "none")
KL_ESTIMATORS = ("k1", "k3", "abs")
PPO_REFERENCES = ("init", "base")


@dataclass
class PPOArgs:
    """PPO and reward-model training, online rollouts and their reward source (TRL names)."""

    cli_group: ClassVar[str] = "PPO and reward options"
    doc_section: ClassVar[str] = "PPO (TRL names)"

    rollout: str = "offline"
    """PPO rollouts: 'offline' scores the logged outputs with their reward/rating;
    'online' generates answers with the policy and scores them with a reward source."""

    score_normalization: str = "zscore"
    """How scores are normalised: zscore, minmax (to [-1, 1]) or none. Offline PPO and
    reward models: the logged rewards/ratings over the whole dataset; online PPO: each
    rollout's scores by the running statistics of all scores so far, so the KL penalty
    weighs the same against rewards of any scale."""

    reward_fn: str | None = None
    """Online reward: a Python function 'module:function' or 'file.py:function' called
    with prompt, completion and record, returning a float."""

    reward_model: str | None = None
    """Online reward: a sequence-classification checkpoint or a simtune reward model
    (--tuning_mode reward)."""

    judge_url: str | None = None
    """Online reward: base URL of an OpenAI-compatible endpoint asked to score 1-5."""

    judge_model: str | None = None
    """Model name sent to --judge_url."""

    judge_timeout: float = 30.0
    """Seconds to wait for one judge answer."""

    judge_max_retries: int = 3
    """Retries for judge calls that fail in transport (with exponential backoff)."""

    ppo_epochs: int = 4
    """Optimisation passes over each rollout batch."""

    num_mini_batches: int = 1
    """Minibatches per rollout batch (one optimizer step each)."""

    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty to the reference policy (--ppo_reference)."""

    ppo_reference: str = "init"
    """What the KL penalty pulls toward: 'init', the policy PPO starts from (the adapter of
    --llm_path when it is one, as a frozen copy; else the base model), or 'base', the base
    model with the adapter disabled."""

    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al. 2019) instead of keeping it fixed."""

    target_kl: float = 6.0
    """KL the adaptive controller aims for (per sequence)."""

    kl_horizon: int = 10000
    """Adaptive KL controller horizon, in samples."""

    kl_estimator: str = "k1"
    """Per-token KL estimate in the reward: k1 (log ratio), k3 (always >= 0) or abs."""

    cliprange: float = 0.2
    """PPO policy ratio clip range."""

    cliprange_value: float = 0.2
    """Value function clip range."""

    vf_coef: float = 0.1
    """Weight of the value loss."""

    gamma: float = 1.0
    """Discount factor of GAE."""

    lam: float = 0.95
    """lambda of GAE."""

    whiten_advantages: bool = True
    """Normalise advantages to mean 0, variance 1 per rollout batch."""

    max_new_tokens: int = 64
    """Online rollouts: most tokens generated per answer (an answer ends earlier at any of
    the model's stop tokens)."""

    temperature: float = 1.0
    """Online rollouts: sampling temperature; PPO's log-probs (policy and reference) use the
    same temperature."""

    top_p: float = 1.0
    """Online rollouts: nucleus sampling threshold (1: off); the policy's log-probs use the
    same truncated distribution."""

    top_k: int = 0
    """Online rollouts: sample among the k most likely tokens only (0: off, the whole
    vocabulary); the policy's log-probs use the same truncated distribution. The model's
    own generation_config is never used for rollouts."""

    def problems(self) -> list[str]:
        """Every problem of these options alone (`TuningConfig` checks the online reward
        source, which depends on --tuning_mode)."""
        out = [
            checks.one_of(f"--{name}", getattr(self, name), allowed)
            for name, allowed in (
                ("rollout", ROLLOUTS),
                ("score_normalization", NORMALISATIONS),
                ("kl_estimator", KL_ESTIMATORS),
                ("ppo_reference", PPO_REFERENCES),
            )
        ]
        out += checks.each(
            checks.positive_number,
            self,
            (
                "ppo_epochs",
                "num_mini_batches",
                "max_new_tokens",
                "temperature",
                "top_p",
                "judge_timeout",
                "kl_horizon",
                "target_kl",
                "cliprange",
                "cliprange_value",
            ),
        )
        out += checks.each(checks.non_negative, self, ("kl_coef", "vf_coef", "judge_max_retries"))
        out += [checks.in_range(f"--{n}", getattr(self, n), 0, 1) for n in ("gamma", "lam")]
        if isinstance(self.top_p, (int, float)) and self.top_p > 1.0:
            out.append(f"--top_p: must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            out.append(f"--top_k: must be >= 0 (0: off), got {self.top_k!r}")
        return [p for p in out if p]

    def reward_sources(self) -> list[str]:
        """The online reward sources given: --reward_fn, --reward_model, --judge_url."""
        return [n for n in ("reward_fn", "reward_model", "judge_url") if getattr(self, n)]
