"""Running a simulation with collection on: decision requests, policies, the runner.

A simulation (see `simtune.sims.job_market`) plays one episode at a time. Whenever its
agents must decide, it hands the runner a batch of `DecisionRequest`\\ s (chat messages,
the parser of a valid answer, the default action for an invalid one, the rule-based
expert's answer and the list of valid answers) through `EpisodeContext.ask`. The runner
asks the policy, parses each answer, records the decision with a `Recorder` and returns
a `Ticket` holding the parsed action. When the environment has resolved the step it
pays each ticket with `EpisodeContext.reward` (an appended reward event); at the end
of an episode it returns each agent's episode return, which the runner spreads over
that agent's decisions of the episode with `Recorder.episode_reward` (the recorder's
credit rule, uniform by default). A decision's reward as training reads it is
therefore its immediate reward plus its episode share. Each record also carries the
policy's name as ``model`` and its call time as ``latency_s``.

Invalid answers (not JSON, a wrong key, an unknown id) never crash a run: the decision
is recorded with the raw answer and reward `INVALID_REWARD`, the default action is
taken, and the answer is counted in `SimResult.invalid`; a later `reward` for it is
ignored (the penalty replaces whatever the default action earned).

Policies turn ``(messages, request)`` into answer text:

- `ExpertPolicy`: the simulation's hand-written rule (near-optimal for its reward).
  It is *not* an LLM; it exists to bootstrap demonstrations for SFT.
- `RandomPolicy`: a uniformly random valid answer (a baseline).
- `LLMPolicy`: any OpenAI-compatible chat endpoint (``simtune serve``, vLLM, OpenAI).
- any callable ``fn(messages, request) -> str`` (wrapped in `CallablePolicy`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from simtune.decisions.schema import unfence
from simtune.errors import ConfigError

INVALID_REWARD = -1.0
"""Reward of an answer the environment cannot parse or that names no valid option."""

Messages = list[dict[str, str]]


@dataclass
class DecisionRequest:
    """One decision an agent must make, as the policy and the environment see it."""

    agent_id: str
    agent_type: str
    kind: str
    """Which decision (e.g. ``apply``, ``hire``, ``accept``)."""
    messages: Messages
    observation: dict[str, Any]
    """The state shown in the prompt, structured (recorded as the decision's context)."""
    parse: Callable[[str], Any]
    """Answer text -> action; raises ValueError (with the reason) when invalid."""
    default: Any
    """The action taken when the answer is invalid."""
    expert: str
    """The rule-based expert's answer."""
    choices: list[str]
    """Every valid answer (canonical JSON); `RandomPolicy` draws from these."""
    step: int = 0
    episode: int = 0


@dataclass
class Ticket:
    """A recorded decision: its id, the action taken and whether the answer was valid."""

    decision_id: str | None
    """None for an empty answer, which is counted (invalid) but not recorded."""
    action: Any
    valid: bool
    request: DecisionRequest
    reward: float = 0.0


class Policy:
    """Base class: ``decide(messages, request) -> answer text``.

    ``concurrency`` > 1 lets the runner ask for a batch of simultaneous decisions in
    parallel threads (the answers are still recorded in request order)."""

    name = "policy"
    concurrency = 1

    def prepare(self) -> None:
        """Called once before the first decision (e.g. to check an endpoint)."""

    def decide(self, messages: Messages, request: DecisionRequest) -> str:
        raise NotImplementedError


class ExpertPolicy(Policy):
    """The simulation's hand-written rule: near-optimal for its reward, deterministic.

    Not an LLM -- a demonstrator to bootstrap SFT data before any model is good enough."""

    name = "expert-policy"

    def decide(self, messages: Messages, request: DecisionRequest) -> str:
        return request.expert


class RandomPolicy(Policy):
    """A uniformly random valid answer (a baseline; never invalid)."""

    name = "random-policy"

    def __init__(self, seed: int | None = 0) -> None:
        self.rng = random.Random(seed)

    def decide(self, messages: Messages, request: DecisionRequest) -> str:
        return self.rng.choice(request.choices)


class CallablePolicy(Policy):
    """Wraps ``fn(messages, request) -> str``."""

    def __init__(self, fn: Callable[[Messages, DecisionRequest], str], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable-policy")

    def decide(self, messages: Messages, request: DecisionRequest) -> str:
        return self.fn(messages, request)


class LLMPolicy(Policy):
    """Agents decide through an OpenAI-compatible chat endpoint.

    Args:
        url: the endpoint's base URL (``http://host:port/v1``).
        model: the model to ask for (default: the first model the endpoint lists).
        api_key: sent as a bearer token.
        temperature, max_tokens: sampling options of every request.
        concurrency: simultaneous requests for a batch of decisions.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        temperature: float = 0.0,
        max_tokens: int = 64,
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 4,
    ) -> None:
        from simtune.openai.client import base_url

        self.url = base_url(url, "--model-url")
        self.model = model
        self.api_key = api_key
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.concurrency = max(1, int(concurrency))
        self.client: Any = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.model or "default"

    def prepare(self) -> None:
        """Fail fast (one line, before anything is recorded) if the endpoint is down,
        and pick the model the endpoint lists first when none was named."""
        from simtune.openai.client import ChatClient, check_endpoint, request_json

        check_endpoint(self.url, "--model-url", api_key=self.api_key, label="model endpoint")
        if self.model is None:
            try:
                listed = request_json(f"{self.url}/models", None, self.api_key, 10.0)
                self.model = str(listed["data"][0]["id"])
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                self.model = "default"  # servers that list nothing take any name
        self.client = ChatClient(
            self.url,
            self.name,
            self.api_key,
            timeout=self.timeout,
            max_retries=self.max_retries,
            what="--model-url",
            label="model endpoint",
        )

    def decide(self, messages: Messages, request: DecisionRequest) -> str:
        if self.client is None:
            self.prepare()
        return self.client.chat(messages, temperature=self.temperature, max_tokens=self.max_tokens)


def make_policy(policy: str | Policy | Callable[..., str], seed: int = 0) -> Policy:
    """``"expert"``, ``"random"``, a `Policy` or a callable -> a `Policy`."""
    if isinstance(policy, Policy):
        return policy
    if policy == "expert":
        return ExpertPolicy()
    if policy == "random":
        return RandomPolicy(seed)
    if callable(policy):
        return CallablePolicy(policy)
    raise ConfigError(f"policy must be 'expert', 'random', a Policy or a callable, got {policy!r}")


def load_answer(text: str, key: str) -> Any:
    """The value of `key` in a JSON object answer (markdown fences and chatter around a
    single object tolerated); ValueError naming what is wrong."""
    body = unfence(text.strip())
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        start, end = body.find("{"), body.rfind("}")
        try:
            obj = json.loads(body[start : end + 1]) if 0 <= start < end else None
        except json.JSONDecodeError:
            obj = None
        if obj is None:
            raise ValueError("not a JSON object") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if key not in obj:
        raise ValueError(f"no {key!r} key")
    return obj[key]


class Simulation(Protocol):
    """What `run_simulation` needs from a simulation class."""

    name: str
    description: str
    agent_types: tuple[str, ...]
    decision_kinds: tuple[str, ...]
    default_steps: int

    def run_episode(self, ctx: EpisodeContext, rng: random.Random, steps: int) -> dict[str, float]:
        """Play one episode; returns each agent's episode return."""
        ...

    def agent_type_of(self, agent_id: str) -> str: ...


@dataclass
class _Tally:
    decisions: int = 0
    invalid: int = 0
    reward: float = 0.0

    def add(self, reward: float, valid: bool) -> None:
        self.decisions += 1
        self.invalid += not valid
        self.reward += reward

    def summary(self) -> dict[str, Any]:
        mean = self.reward / self.decisions if self.decisions else None
        return {
            "decisions": self.decisions,
            "invalid": self.invalid,
            "mean_reward": None if mean is None else round(mean, 4),
        }


class EpisodeContext:
    """What a simulation sees of the runner: `ask` its agents, `reward` their decisions
    (and ``episode``, the current episode number)."""

    def __init__(self, recorder: Any, policy: Policy, pool: ThreadPoolExecutor | None) -> None:
        self.recorder, self.policy, self.pool = recorder, policy, pool
        self.episode = 0
        self.tickets: list[Ticket] = []
        self.agreed = 0
        self.blank = 0

    def ask(self, requests: Sequence[DecisionRequest]) -> list[Ticket]:
        """Ask the policy for a batch of simultaneous decisions; record them in order."""
        if not requests:
            return []
        for r in requests:
            r.episode = self.episode

        def timed(req: DecisionRequest) -> tuple[str, float]:
            start = time.perf_counter()
            answer = self.policy.decide(req.messages, req)
            return answer, time.perf_counter() - start

        if self.pool is not None and len(requests) > 1:
            answers = list(self.pool.map(timed, requests))
        else:
            answers = [timed(r) for r in requests]
        tickets = []
        for req, (answer, latency) in zip(requests, answers, strict=True):
            if not isinstance(answer, str):
                answer = "" if answer is None else str(answer)
            meta: dict[str, Any] = {"episode": req.episode, "kind": req.kind}
            try:
                action, valid = req.parse(answer), True
            except (ValueError, TypeError) as exc:
                action, valid = req.default, False
                meta["invalid_reason"] = str(exc) or type(exc).__name__
            if valid and req.parse(req.expert) == action:
                self.agreed += 1
            if not answer.strip():
                # An empty answer (a model that emits end-of-text at once) is invalid and
                # penalised like any other, but it cannot be a record: the reader refuses
                # empty outputs, so one would make the whole folder unreadable.
                self.blank += 1
                tickets.append(Ticket(None, action, valid, req, INVALID_REWARD))
                continue
            did = self.recorder.record(
                messages=req.messages,
                output=answer,
                agent_id=req.agent_id,
                agent_type=req.agent_type,
                step=req.step,
                model=self.policy.name,
                latency_s=latency,
                context=req.observation,
                reward=None if valid else INVALID_REWARD,
                **meta,
            )
            ticket = Ticket(did, action, valid, req, 0.0 if valid else INVALID_REWARD)
            tickets.append(ticket)
        self.tickets.extend(tickets)
        return tickets

    def reward(self, ticket: Ticket, value: float) -> None:
        """Pay a decision its immediate reward (ignored for invalid answers)."""
        if not ticket.valid:
            return
        value = round(float(value), 6)
        self.recorder.reward(ticket.decision_id, value)
        ticket.reward += value


@dataclass
class SimResult:
    """What a simulation run produced (`to_dict` for JSON)."""

    sim: str
    env_name: str
    run_id: str
    policy: str
    episodes: int
    steps: int
    seed: int
    decisions: int
    invalid: int
    mean_reward: float | None
    """Mean reward per decision as training reads it (immediate + episode share)."""
    mean_immediate_reward: float | None
    """Mean of the immediate (per-decision) rewards alone."""
    expert_agreement: float | None
    """Share of decisions whose action equals the expert's."""
    by_agent_type: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    mean_episode_return: dict[str, float] = field(default_factory=dict)
    """Mean episode return per agent type."""
    path: str | None = None
    """The JSONL file written (None when no decision was made)."""
    dataset_dir: str = ""
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_simulation(
    name: str,
    policy: str | Policy | Callable[..., str] = "expert",
    *,
    episodes: int = 5,
    steps: int | None = None,
    seed: int = 0,
    env_name: str | None = None,
    workspace: str | None = None,
    run_id: str | None = None,
    credit: str = "uniform",
    progress: Callable[[int, int], None] | None = None,
    **sim_options: Any,
) -> SimResult:
    """Run simulation `name` for `episodes` episodes with collection on.

    Decisions go to ``<workspace>/envs/<env_name>/datasets/`` (env_name defaults to the
    simulation's name). The environment's randomness depends only on `seed` and the
    episode number, so an expert run is reproducible and every policy faces the same
    starting states. `sim_options` go to the simulation's constructor.
    """
    from simtune.collect.recorder import Recorder
    from simtune.config import check_positive_int
    from simtune.sims import get_simulation

    sim = get_simulation(name)(**sim_options)
    check_positive_int("--episodes", episodes)
    steps = sim.default_steps if steps is None else steps
    check_positive_int("--steps", steps)
    pol = make_policy(policy, seed)
    # Before the recorder exists: an unreachable endpoint must leave no file behind.
    pol.prepare()
    rec = Recorder(env_name or sim.name, run_id, workspace=workspace, credit=credit)
    started = time.perf_counter()
    totals: dict[str, float] = {}
    returns: dict[str, list[float]] = {}
    pool = ThreadPoolExecutor(pol.concurrency) if pol.concurrency > 1 else None
    ctx = EpisodeContext(rec, pol, pool)
    try:
        for ep in range(1, episodes + 1):
            if progress is not None:
                progress(ep, episodes)
            ctx.episode = ep
            # Seeded per episode (not one stream for the run): episode k starts from the
            # same state whatever the policy did in earlier episodes.
            rng = random.Random(seed * 1_000_003 + ep)
            for agent_id, value in sim.run_episode(ctx, rng, steps).items():
                shares = rec.episode_reward(value, agent_id=agent_id)
                for did, share in shares.items():
                    totals[did] = totals.get(did, 0.0) + share
                returns.setdefault(sim.agent_type_of(agent_id), []).append(value)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        rec.close()

    overall, by_type, by_kind = _Tally(), {}, {}
    immediate = 0.0
    for t in ctx.tickets:
        total = t.reward + totals.get(t.decision_id, 0.0)
        immediate += t.reward
        overall.add(total, t.valid)
        by_type.setdefault(t.request.agent_type, _Tally()).add(total, t.valid)
        by_kind.setdefault(t.request.kind, _Tally()).add(total, t.valid)
    n = overall.decisions
    return SimResult(
        sim=sim.name,
        env_name=rec.env_name,
        run_id=rec.run_id,
        policy=pol.name,
        episodes=episodes,
        steps=steps,
        seed=seed,
        decisions=n,
        invalid=overall.invalid,
        mean_reward=overall.summary()["mean_reward"],
        mean_immediate_reward=round(immediate / n, 4) if n else None,
        expert_agreement=round(ctx.agreed / n, 4) if n else None,
        by_agent_type={k: v.summary() for k, v in sorted(by_type.items())},
        by_kind={k: v.summary() for k, v in sorted(by_kind.items())},
        mean_episode_return={k: round(sum(v) / len(v), 4) for k, v in sorted(returns.items())},
        path=str(rec.path) if rec.path else None,
        dataset_dir=str(rec.directory),
        elapsed_s=round(time.perf_counter() - started, 3),
    )
