"""The loop: simulate -> collect -> tune -> serve -> simulate, for any registered
simulation and any base model, in rounds (`run_loop`, ``simtune loop``), and the stages
it shares with the demo (`simtune.demo`).

Round 0 collects with the expert (or an external model endpoint) and trains SFT; every
later round serves the latest adapter, runs the simulation on it, trains offline PPO on
those rewards continuing from the latest adapter and evaluates it against the previous
round's model on the same held-out episodes.

What each recipe trains with is in one place: `REAL` (sizes, `REAL_SFT_OPTIONS`,
`REAL_PPO_OPTIONS`) and `QUICK` (the tiny model's). Every stage reports progress through
a `Reporter` (the command layer draws rich bars) and leaves its artefacts in the
workspace: decision logs under ``envs/``, models under ``models/`` and in
``models/registry.json``, runs, registered models and the simulation runs in the
embedded MLflow store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simtune.base_models import ensure_demo_model
from simtune.config import resolve_workspace
from simtune.errors import ConfigError
from simtune.util import write_json_atomic

log = logging.getLogger(__name__)


LOOP_EXPERIMENT = "simtune-loop"

# Seeds of the simulation runs. Each episode's start state depends only on (seed,
# episode), so these three never share a start state: the models are evaluated on
# episodes they were not trained on.
EXPERT_SEED = 0

COLLECT_SEED = 500

EVAL_SEED = 1000

SFT_OPTIONS: dict[str, Any] = {
    "learning_rate": 5e-3,
    "per_device_train_batch_size": 8,
    "warmup_ratio": 0.0,
    "lr_scheduler_type": "cosine",
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "max_length": 256,
    "logging_steps": 1,
}
"""SFT options of ``demo --quick`` (and the loop's defaults without --config and
--llm_path): tuned so the tiny random model learns the answer format in a few dozen
steps on CPU."""


PPO_OPTIONS: dict[str, Any] = {
    "rollout": "offline",
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 8,
    "ppo_epochs": 2,
    "warmup_ratio": 0.0,
    "lr_scheduler_type": "constant",
    "lora_dropout": 0.0,
    "max_length": 256,
    "logging_steps": 1,
    # The reference policy is the base with the adapter disabled -- here a random
    # model. A KL penalty towards it would pull the policy back to gibberish, so the
    # demo relies on the clipped ratio and few small steps to stay near SFT instead.
    "kl_coef": 0.0,
}
"""Offline PPO options of ``demo --quick`` (and the loop's tiny-model defaults)."""


REAL_SFT_OPTIONS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 8,
    "warmup_ratio": 0.05,
    "lr_scheduler_type": "cosine",
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "max_length": 256,
    "logging_steps": 1,
}
"""SFT options of the demo on the real model (SmolLM2-135M-Instruct; also the loop's
defaults for an --llm_path without --config). A pretrained model has the format
half-learnt already; the steps go into which vacancy, applicant and offer to pick."""


REAL_PPO_OPTIONS: dict[str, Any] = {
    **PPO_OPTIONS,
    "learning_rate": 2e-4,
    # A pretrained base is a sensible reference (unlike the tiny random one): a small
    # KL penalty keeps the policy's answers in the language it knows.
    "kl_coef": 0.02,
}
"""Offline PPO options of the demo on the real model -- the one place to retune them
(the PPO trainer itself is `simtune.training.ppo`)."""


COLLECT_TEMPERATURE = 1.0
"""Sampling temperature of the served SFT model while it collects PPO's data: varied
answers, some better and some worse than its greedy one, are what PPO learns from."""


ANSWER_TOKENS = 32
"""Most tokens a served model may answer with (the job market's answers take ~10)."""


@dataclass(frozen=True)
class DemoSize:
    """How much the demo does; `REAL` is ``simtune demo``, `QUICK` is ``--quick``."""

    expert_episodes: int
    sft_steps: int
    collect_episodes: int
    ppo_steps: int
    eval_episodes: int
    steps: int
    """Weeks per episode of the job market."""


@dataclass(frozen=True)
class Recipe:
    """Everything the demo does with one kind of model, in one place to retune."""

    size: DemoSize
    sft: dict[str, Any]
    ppo: dict[str, Any]
    collect_temperature: float = COLLECT_TEMPERATURE


REAL = Recipe(
    DemoSize(
        expert_episodes=40,
        sft_steps=80,
        collect_episodes=3,
        ppo_steps=8,
        eval_episodes=3,
        steps=4,
    ),
    REAL_SFT_OPTIONS,
    REAL_PPO_OPTIONS,
)
"""``simtune demo``: SmolLM2-135M-Instruct (or --llm_path), sized for ~15 minutes on 2
CPU cores (bench/demo_time.py)."""


QUICK = Recipe(
    DemoSize(
        expert_episodes=12, sft_steps=30, collect_episodes=2, ppo_steps=3, eval_episodes=2, steps=4
    ),
    SFT_OPTIONS,
    PPO_OPTIONS,
)
"""``simtune demo --quick``: the tiny random model, ~1 minute (tests and CI)."""


class Reporter:
    """Progress hooks; the command layer draws them as rich bars. Does nothing here.

    A stage is started once (`start`), advanced any number of times (`update`, with
    the number of items done so far) and ended once (`finish`, with a one-line result).
    """

    def start(self, key: str, title: str, total: int | None = None, unit: str = "") -> None:
        """A stage begins; `total` None draws a spinner instead of a bar."""

    def update(self, key: str, completed: int, total: int | None = None) -> None:
        """`completed` of the stage's items are done."""

    def finish(self, key: str, detail: str = "") -> None:
        """The stage is over; `detail` says what it produced."""


@dataclass
class StageResult:
    """One stage's wall time and what it left behind."""

    name: str
    seconds: float
    detail: str = ""
    artefacts: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelScore:
    """One row of the reward table."""

    name: str
    """'base', 'sft', 'ppo' (or a round's name in the loop), 'expert', 'random'."""
    model: str | None
    """Model id (None for the base model and the reference policies)."""
    mean_reward: float | None
    """Mean reward per decision (immediate + episode share), as training reads it."""
    invalid_rate: float | None
    decisions: int
    reference: bool = False
    """A policy that is not a model (expert, random): context, not a contender."""


def tune(reporter: Reporter, key: str, steps: int | None, options: dict[str, Any]) -> Any:
    """`run_tuning(**options)` with its steps on the stage's bar (`steps` None: unknown)."""
    from simtune.training.run import run_tuning

    def on_step(step: int) -> None:
        reporter.update(key, step if steps is None else min(step, steps), steps)

    return run_tuning(progress=on_step, **options)


def simulate(
    reporter: Reporter,
    key: str,
    sim: str,
    policy: Any,
    *,
    episodes: int,
    steps: int | None,
    seed: int,
    workspace: Path,
    env_name: str | None = None,
    run_id: str | None = None,
) -> Any:
    from simtune.sims import run_simulation

    result = run_simulation(
        sim,
        policy,
        episodes=episodes,
        steps=steps,
        seed=seed,
        workspace=str(workspace),
        env_name=env_name,
        run_id=run_id,
        # Called as an episode starts: the ones before it are done.
        progress=lambda ep, total: reporter.update(key, ep - 1, total),
    )
    reporter.update(key, episodes, episodes)
    return result


def log_simulation_run(
    result: Any, *, tracking_uri: str, experiment_name: str, workspace: Path, purpose: str
) -> str:
    """An MLflow run for a simulation run (policy, seeds, rewards, the decision file),
    so that the data every model was trained on is in the same place as the models."""
    from simtune.tracking.tracker import Tracker

    tracker = Tracker(tracking_uri, experiment_name, workspace)
    client = tracker.client
    run = client.create_run(
        tracker.experiment_id,
        run_name=f"sim-{purpose}-{result.run_id}",
        tags={
            "simtune.kind": "simulation",
            "simtune.purpose": purpose,
            "simtune.sim": result.sim,
            "simtune.policy": result.policy,
        },
    )
    run_id = run.info.run_id
    status = "FAILED"
    try:
        for key in ("sim", "env_name", "run_id", "policy", "episodes", "steps", "seed"):
            client.log_param(run_id, key, str(getattr(result, key)))
        metrics = {
            "sim/decisions": result.decisions,
            "sim/invalid": result.invalid,
            "sim/invalid_rate": result.invalid / result.decisions if result.decisions else 0.0,
            "sim/mean_reward": result.mean_reward,
            "sim/mean_immediate_reward": result.mean_immediate_reward,
            "sim/expert_agreement": result.expert_agreement,
            "sim/elapsed_s": result.elapsed_s,
        }
        for name, value in metrics.items():
            if value is not None:
                client.log_metric(run_id, name, float(value), step=0)
        client.log_dict(run_id, result.to_dict(), "simulation.json")
        if result.path:
            client.log_artifact(run_id, result.path, "decisions")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def sim_score(name: str, result: Any, *, reference: bool = False) -> ModelScore:
    n = result.decisions
    return ModelScore(
        name=name,
        model=None,
        mean_reward=result.mean_reward,
        invalid_rate=round(result.invalid / n, 4) if n else None,
        decisions=n,
        reference=reference,
    )


def eval_scores(report: Any, names: dict[str, str]) -> list[ModelScore]:
    """Rows of the reward table from an `EvalReport`; `names` maps the spec each model
    was given as (``base`` or a model id) to the row's name."""
    rows = []
    for served in report.models:
        spec = report.specs.get(served, served)
        if spec not in names:
            continue
        metrics = report.metrics[served]
        rows.append(
            ModelScore(
                name=names[spec],
                model=None if spec == "base" else spec,
                mean_reward=metrics.get("mean_reward"),
                invalid_rate=metrics.get("invalid_rate"),
                decisions=int(metrics.get("decisions") or 0),
            )
        )
    return rows


def llm_policy(url: str, model: str | None, *, temperature: float, concurrency: int = 4) -> Any:
    """An `LLMPolicy` answering with at most `ANSWER_TOKENS` tokens."""
    from simtune.evaluation import LOCAL_TIMEOUT_S
    from simtune.sims import LLMPolicy

    return LLMPolicy(
        url,
        model,
        temperature=temperature,
        max_tokens=ANSWER_TOKENS,
        concurrency=concurrency,
        timeout=LOCAL_TIMEOUT_S,
    )


def serve_and_simulate(
    reporter: Reporter,
    key: str,
    sim: str,
    model: str,
    *,
    episodes: int,
    steps: int | None,
    seed: int,
    workspace: Path,
    tracking_uri: str,
    temperature: float,
) -> Any:
    """Serve `model` (an adapter over its base) on loopback and run the simulation on
    it: the sim talks to it like to any OpenAI-compatible endpoint."""
    from simtune.serving.engine import Engine
    from simtune.serving.server import Server

    engine = Engine.load(
        [model], workspace=str(workspace), tracking_uri=tracking_uri, max_new_tokens=ANSWER_TOKENS
    )
    # Adapters are listed first, then "base".
    served = model if model in engine.names else engine.names[0]
    with engine, Server(engine, host="127.0.0.1", port=0) as srv:
        # Several agents decide at once in each phase; concurrent requests let the
        # server batch them.
        policy = llm_policy(srv.url, served, temperature=temperature, concurrency=8)
        return simulate(
            reporter,
            key,
            sim,
            policy,
            episodes=episodes,
            steps=steps,
            seed=seed,
            workspace=workspace,
        )


def evaluate_models(
    reporter: Reporter,
    key: str,
    models: list[str],
    *,
    sim: str,
    episodes: int,
    steps: int | None,
    seed: int,
    workspace: Path,
    tracking_uri: str,
    experiment_name: str,
) -> Any:
    """`evaluate` in sim mode, greedy, its per-model progress summed into one bar."""
    from simtune.evaluation import evaluate

    total = episodes * len(models)
    done: dict[str, int] = {}

    def progress(model: str, completed: int, _total: int) -> None:
        done[model] = completed
        reporter.update(key, sum(done.values()), total)

    report = evaluate(
        models,
        sim=sim,
        episodes=episodes,
        steps=steps,
        seed=seed,
        max_tokens=ANSWER_TOKENS,
        temperature=0.0,
        workspace=str(workspace),
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        progress=progress,
    )
    reporter.update(key, total, total)
    return report


@dataclass
class LoopRound:
    """One round of `run_loop`."""

    round: int
    mode: str
    """'sft' (round 0) or 'ppo'."""
    collected_with: str
    """'expert', the endpoint URL, or the served model id."""
    collected_reward: float | None
    collected_invalid_rate: float | None
    data: str
    """The decision file the round trained on."""
    model_id: str
    model_uri: str
    eval: ModelScore
    """The new model on the held-out episodes."""
    previous: ModelScore
    """The model it is compared with (the base for round 0), on the same episodes."""


@dataclass
class LoopResult:
    sim: str
    workspace: str
    tracking_uri: str
    experiment_name: str
    base_model: str
    rounds: list[LoopRound]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_sim(sim: str) -> str:
    """A registered simulation's name, or ``module:Class`` / ``file.py:Class`` of a
    user's own simulation class (registered under its ``name`` for this process)."""
    from simtune.sims import SIMULATIONS

    if sim in SIMULATIONS or ":" not in sim:
        from simtune.sims import get_simulation

        get_simulation(sim)  # a one-line error listing the known ones
        return sim
    from simtune.util import load_object

    cls: Any = load_object(sim, "--sim", "Class")
    name = getattr(cls, "name", None)
    if not isinstance(cls, type) or not isinstance(name, str) or not hasattr(cls, "run_episode"):
        raise ConfigError(
            f"--sim {sim}: not a simulation class (needs a `name` and `run_episode`; "
            "see simtune.sims.core.Simulation)"
        )
    SIMULATIONS[name] = cls
    return name


def _loop_options(config: str | None, mode: str, real: bool = False) -> dict[str, Any]:
    """Training options of one mode: without a config, the demo's defaults (`REAL`'s for
    a real base model, `real`, else the tiny model's); with one, its top-level keys plus
    its `sft:` / `ppo:` section, nothing else."""
    if not config:
        recipe = REAL if real else QUICK
        if real:
            steps = REAL.size.sft_steps if mode == "sft" else REAL.size.ppo_steps
        else:  # more than --quick's: a loop round should leave the tiny model usable
            steps = 60 if mode == "sft" else 12
        return {**(recipe.sft if mode == "sft" else recipe.ppo), "max_steps": steps}
    from simtune.config import load_yaml

    data = load_yaml(config)
    options = {k: v for k, v in data.items() if k not in ("sft", "ppo")}
    section = data.get(mode) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{config}: '{mode}' must be a mapping of option names to values")
    options.update(section)
    if mode == "ppo":
        options.setdefault("rollout", "offline")
    return options


def run_loop(
    sim: str,
    rounds: int,
    *,
    llm_path: str | None = None,
    model_url: str | None = None,
    model_name: str | None = None,
    episodes: int = 20,
    eval_episodes: int = 4,
    steps: int | None = None,
    config: str | None = None,
    temperature: float = 1.0,
    workspace: str | Path | None = None,
    experiment_name: str = LOOP_EXPERIMENT,
    seed: int = 0,
    reporter: Reporter | None = None,
) -> LoopResult:
    """simulate -> collect -> tune -> serve rounds (see the module docstring).

    Round r collects `episodes` episodes from seed ``seed + r``; every model is
    evaluated greedily on `eval_episodes` episodes from seed ``1000 + seed`` (never
    collected from). Training options come from `config` (YAML; ``sft:`` / ``ppo:``
    sections apply to one mode) or, without one, the demo's options for tiny models;
    the loop sets the model, data, workspace and experiment itself.
    """

    from simtune.config import build_config, check_positive_int

    for flag, value in (
        ("--rounds", rounds),
        ("--episodes", episodes),
        ("--eval-episodes", eval_episodes),
    ):
        check_positive_int(flag, value)
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ConfigError(f"--temperature: expected a number >= 0, got {temperature!r}")
    name = resolve_sim(sim)
    rep = reporter or Reporter()
    ws = resolve_workspace(workspace)
    ws.mkdir(parents=True, exist_ok=True)
    from simtune.tracking.tracker import embedded_uri

    uri = embedded_uri(ws)
    options = {m: _loop_options(config, m, real=llm_path is not None) for m in ("sft", "ppo")}
    for mode, opts in options.items():
        # Bad options fail now, not after the first round's simulation and training.
        build_config(
            overrides={**opts, "tuning_mode": mode, "llm_path": "x", "dataset_path": ["x"]}
        )
    started = time.perf_counter()
    if llm_path is None:
        rep.start("model", "build the tiny base model")
        base = str(ensure_demo_model(ws, name))
        rep.finish("model", base)
    else:
        base = llm_path
    eval_seed = EVAL_SEED + seed
    common = dict(workspace=str(ws), experiment_name=experiment_name, tracking_uri=uri)
    done: list[LoopRound] = []
    previous: ModelScore | None = None
    latest: str | None = None
    for r in range(rounds):
        key = f"round {r}"
        mode = "sft" if r == 0 else "ppo"
        # --- collect -------------------------------------------------------------------
        rep.start(f"{key} collect", f"{key}: collect", episodes, "episodes")
        if r == 0:
            policy: Any = (
                llm_policy(model_url, model_name, temperature=temperature)
                if model_url
                else "expert"
            )
            who = model_url or "expert"
            collected = simulate(
                rep,
                f"{key} collect",
                name,
                policy,
                episodes=episodes,
                steps=steps,
                seed=seed + r,
                workspace=ws,
            )
        else:
            assert latest is not None
            who = latest
            collected = serve_and_simulate(
                rep,
                f"{key} collect",
                name,
                latest,
                episodes=episodes,
                steps=steps,
                seed=seed + r,
                workspace=ws,
                tracking_uri=uri,
                temperature=temperature,
            )
        log_simulation_run(
            collected,
            tracking_uri=uri,
            experiment_name=experiment_name,
            workspace=ws,
            purpose=f"round-{r}",
        )
        rep.finish(
            f"{key} collect",
            f"{collected.decisions} decisions, mean reward {collected.mean_reward}",
        )
        if not collected.path:
            raise ConfigError(f"{key}: the simulation recorded no decisions; nothing to train on")
        # --- tune ----------------------------------------------------------------------
        opts = options[mode]
        total = int(opts.get("max_steps") or 0)
        rep.start(f"{key} {mode}", f"{key}: {mode.upper()}", total if total > 0 else None, "steps")
        job = tune(
            rep,
            f"{key} {mode}",
            total if total > 0 else None,
            dict(
                opts,
                tuning_mode=mode,
                llm_path=base if r == 0 else latest,
                dataset_path=[str(collected.path)],
                seed=int(opts.get("seed", 42)) + seed + r,
                **common,
            ),
        )
        rep.finish(f"{key} {mode}", f"{job.model_id} ({job.model_uri})")
        # --- evaluate --------------------------------------------------------------------
        models = [job.model_id] if previous is not None else ["base", job.model_id]
        rep.start(f"{key} eval", f"{key}: evaluate", eval_episodes * len(models), "episodes")
        report = evaluate_models(
            rep,
            f"{key} eval",
            models,
            sim=name,
            episodes=eval_episodes,
            steps=steps,
            seed=eval_seed,
            workspace=ws,
            tracking_uri=uri,
            experiment_name=experiment_name,
        )
        scores = {
            s.name: s for s in eval_scores(report, {"base": "base", job.model_id: f"round {r}"})
        }
        new = scores[f"round {r}"]
        # Greedy answers on the same seeded episodes: the previous model's score from its
        # own round is what it would score again, so it is not re-evaluated.
        before = previous if previous is not None else scores["base"]
        rep.finish(f"{key} eval", f"{new.mean_reward} (was {before.mean_reward})")
        done.append(
            LoopRound(
                round=r,
                mode=mode,
                collected_with=who,
                collected_reward=collected.mean_reward,
                collected_invalid_rate=(
                    round(collected.invalid / collected.decisions, 4)
                    if collected.decisions
                    else None
                ),
                data=str(collected.path),
                model_id=job.model_id,
                model_uri=job.model_uri,
                eval=new,
                previous=before,
            )
        )
        previous, latest = new, job.model_id
    result = LoopResult(
        sim=name,
        workspace=str(ws),
        tracking_uri=uri,
        experiment_name=experiment_name,
        base_model=base,
        rounds=done,
        seconds=round(time.perf_counter() - started, 2),
    )
    write_json_atomic(ws / "loop_result.json", result.to_dict())
    return result
