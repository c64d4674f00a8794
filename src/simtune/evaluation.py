"""Score models side by side on held-out decisions or in a simulation (DESIGN.md §7).

`evaluate(["sft-...", "ppo-...", "base"], dataset_path=[HELDOUT], reward_fn=...)` loads
every model once (adapters share one base, `simtune.serving.server.Engine`), generates an answer
for each held-out decision and compares it with the logged answer;
`evaluate([...], sim="job_market", episodes=5, seed=1000)` serves them on loopback and
plays the simulation with each one on the same seeds instead.

Dataset-mode metrics (per model):

- ``mean_reward``: the reward source's mean score (a `--reward_fn`, or a judge's 1-5
  rating mapped to [-1, 1] as `JudgeReward` does); absent without a source.
- ``exact_match``: share of answers equal to the reference -- the decision's target
  (its feedback/refined answer when it has one, else the logged output). Both sides
  lose markdown fences and surrounding whitespace; when both parse as JSON they are
  compared as canonical JSON (key order and spacing ignored, ``true`` != ``1``), else
  as text with runs of whitespace collapsed.
- ``json_valid``: share of answers that parse as a JSON object or array (fences
  allowed, nothing else around them), counted only over the ``json_records`` whose
  reference is one.
- ``mean_chars`` / ``mean_tokens``: answer length; ``truncated``: share of answers cut
  by ``max_tokens`` (finish_reason ``length``).

Simulation-mode metrics: ``mean_reward`` per decision (immediate + episode share, as
training reads it), ``invalid_rate``, ``decisions``, ``expert_agreement``,
``mean_reward/<agent type>``, ``invalid_rate/<agent type>`` and
``episode_return/<agent type>``. The episodes are recorded under ``envs/<sim>-eval/``
so they never mix with the training data in ``envs/<sim>/``; a blank answer counts as
invalid but is not recorded (the reader refuses empty outputs).

MLflow layout: one run per model, named ``eval-<model>-<utc time>``, tagged
``simtune.kind=evaluation``, ``simtune.model``, ``simtune.eval_group`` (shared by the
models of one call) and, for a tuned model, ``simtune.training_run_id``. It goes in the
experiment of the model's training run and carries MLflow's ``mlflow.parentRunId`` so
the UI nests it under that run; a model without a training run in this store (the base,
a plain adapter directory) goes in `experiment_name`, by default the experiment of the
other models' training runs so one call's runs sit together. Metrics are ``eval/...``;
the per-sample table is logged with `mlflow.log_table` (``eval_samples.json``).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from simtune.config import check_positive_int, resolve_workspace
from simtune.decisions.schema import unfence
from simtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "llm_tuning"
BASE = "base"
Progress = Callable[[str, int, int], None]
"""progress(model name, done, total): samples (dataset mode) or episodes (sim mode)."""


@dataclass
class EvalReport:
    """What `evaluate` measured: per-model metrics, in the order the models were given."""

    mode: str
    """'dataset' or 'sim'."""
    models: list[str]
    """Served names (an adapter's model id, or 'base')."""
    specs: dict[str, str]
    """Served name -> the spec it was given as."""
    metrics: dict[str, dict[str, float | int | None]]
    runs: dict[str, str] = field(default_factory=dict)
    """Served name -> MLflow evaluation run id (empty with log_to_mlflow=False)."""
    training_runs: dict[str, str | None] = field(default_factory=dict)
    experiments: dict[str, str] = field(default_factory=dict)
    tracking_uri: str | None = None
    eval_group: str = ""
    reward_source: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    """Dataset files and hashes, or sim / seed / episodes / steps."""
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    """Dataset mode: per model, one row per decision (prompt, reference, answer, ...)."""
    sims: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    """Sim mode: per model, `SimResult.to_dict()`."""

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not samples:
            out.pop("samples")
        return out


# --- comparing answers -------------------------------------------------------------------


def _parse_json(text: str) -> tuple[bool, Any]:
    body = unfence(text.strip()).strip()
    if not body:
        return False, None
    try:
        return True, json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return False, None


def normalise_answer(text: str) -> str:
    """The form exact match compares: canonical JSON when the (unfenced) answer is JSON,
    else the text with fences removed and whitespace runs collapsed."""
    ok, value = _parse_json(text)
    if ok:
        return "json:" + json.dumps(value, sort_keys=True, separators=(",", ":"))
    return "text:" + " ".join(unfence(text.strip()).split())


def is_json_answer(text: str) -> bool:
    """The answer is a JSON object or array (markdown fences allowed, no other text)."""
    ok, value = _parse_json(text)
    return ok and isinstance(value, (dict, list))


def exact_match(answer: str, reference: str) -> bool:
    return normalise_answer(answer) == normalise_answer(reference)


def dataset_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float | int | None]:
    """Aggregate per-sample rows (as `evaluate` builds them) into the dataset metrics."""
    n = len(rows)
    json_rows = [r for r in rows if r["reference_is_json"]]
    rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    metrics: dict[str, float | int | None] = {
        "num_samples": n,
        "exact_match": _mean([float(r["exact_match"]) for r in rows]),
        "json_valid": _mean([float(r["json_valid"]) for r in json_rows]),
        "json_records": len(json_rows),
        "mean_chars": _mean([float(len(r["generated"])) for r in rows]),
        "mean_tokens": _mean([float(r["completion_tokens"]) for r in rows]),
        "truncated": _mean([float(r["finish_reason"] == "length") for r in rows]),
    }
    if rewards:
        metrics["mean_reward"] = _mean(rewards)
    return metrics


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


# --- the entry point ---------------------------------------------------------------------


def evaluate(
    models: Sequence[str],
    *,
    dataset_path: str | Sequence[str] | None = None,
    sim: str | None = None,
    episodes: int = 5,
    seed: int = 1000,
    steps: int | None = None,
    sim_options: dict[str, Any] | None = None,
    reward_fn: str | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    max_samples: int | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    system_prompt: str | None = None,
    workspace: str | None = None,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    log_to_mlflow: bool = True,
    backend: str = "auto",
    device: str | None = None,
    precision: str = "auto",
    batch_size: int = 8,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate `models` (specs as `simtune serve` takes them; 'base' is their base model)
    on held-out decisions (`dataset_path`) or in simulation `sim`; exactly one of the two.

    Dataset mode scores each answer with `reward_fn` ('module:fn' / 'file.py:fn') or an
    LLM judge at `judge_url` (model `judge_model`) when given. `system_prompt` is put
    before every prompt; by default each adapter gets the one it was trained with (none
    for the base). Sim mode plays `episodes` episodes from `seed` (the same starting
    states for every model), recording them under envs/<sim>-eval/. `progress` gets
    (model, done, total) as samples or episodes finish; `on_stage` a line when a slow
    stage (loading the models) starts, after every input check passed.

    Every check that can fail on the user's input runs before a model is loaded or a run
    opened; raises a `SimtuneError` subclass naming the flag.
    """
    # --- 1. options and inputs, cheapest first ----------------------------------------
    specs = _check_models(models)
    paths = [dataset_path] if isinstance(dataset_path, str) else list(dataset_path or [])
    if bool(paths) == bool(sim):
        raise ConfigError(
            "give exactly one of --dataset_path (held-out decisions) or --sim (a simulation)"
            + (" , not both" if paths and sim else "")
        )
    check_positive_int("--max_tokens", max_tokens)
    check_positive_int("--batch_size", batch_size)
    if max_samples is not None:
        check_positive_int("--max_samples", max_samples)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ConfigError(f"--temperature: expected a number >= 0, got {temperature!r}")
    if backend not in ("auto", "transformers"):
        raise ConfigError(
            f"--backend {backend}: evaluation generates in-process with transformers "
            "('auto' or 'transformers'); vLLM is `simtune serve --backend vllm`"
        )
    if judge_model and not judge_url:
        raise ConfigError("--judge_model needs --judge_url")
    ws = resolve_workspace(workspace)

    decisions: list[Any] = []
    inputs: dict[str, Any]
    source = None
    if sim:
        from simtune.sims import get_simulation

        get_simulation(sim)
        check_positive_int("--episodes", episodes)
        if steps is not None:
            check_positive_int("--steps", steps)
        if reward_fn or judge_url:
            raise ConfigError(
                "--reward_fn / --judge_url score held-out decisions (--dataset_path); "
                "a simulation (--sim) pays its own rewards"
            )
        inputs = {"sim": sim, "episodes": episodes, "seed": seed, "steps": steps}
        if sim_options:
            inputs["sim_options"] = dict(sim_options)
    else:
        decisions, inputs = _read_heldout(paths, max_samples)
        source = _reward_source(reward_fn, judge_url, judge_model)

    from simtune.serving.engine import Engine
    from simtune.serving.models import ServedModel, resolve_served
    from simtune.tracking.tracker import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, ws)
    # Resolving reads files and (for MLflow names) the registry: an unknown model fails
    # here, before any weights are loaded. 'base' is not a spec of its own: the engine
    # always serves the others' base under that name (so does a base-model directory).
    resolved = {
        spec: resolve_served(spec, workspace=str(ws), tracking_uri=uri)
        for spec in specs
        if spec != BASE
    }
    names = {spec: BASE if spec == BASE else resolved[spec].name for spec in specs}
    for spec in specs:
        same = [s for s in specs if names[s] == names[spec]]
        if len(same) > 1:
            raise ConfigError(
                f"--model: {' and '.join(same)} are the same served model {names[spec]!r}"
            )
    if log_to_mlflow:
        check_reachable(uri)

    group = f"eval-{_stamp()}-{secrets.token_hex(3)}"
    report = EvalReport(
        mode="sim" if sim else "dataset",
        models=[names[s] for s in specs],
        specs={names[s]: s for s in specs},
        metrics={},
        tracking_uri=uri if log_to_mlflow else None,
        eval_group=group,
        reward_source=getattr(source, "name", None),
        inputs=inputs,
    )
    base_model = next(m.base_model for m in resolved.values())
    served = {names[s]: resolved.get(s) or ServedModel(BASE, None, base_model) for s in specs}
    for name in report.models:
        report.training_runs[name] = served[name].training_run_id or None
    logger = None
    if log_to_mlflow:
        logger = _RunLogger(uri, ws, experiment_name, group)
        logger.plan(report.training_runs)
    params = {
        "mode": report.mode,
        **_flat_inputs(inputs),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "reward_source": report.reward_source or "none",
        "backend": backend,
        "base_model": base_model,
    }
    job = _Job(
        decisions=decisions,
        source=source,
        sim=sim,
        episodes=episodes,
        seed=seed,
        steps=steps,
        sim_options=dict(sim_options or {}),
        max_tokens=max_tokens,
        temperature=float(temperature),
        system_prompt=system_prompt,
        batch_size=batch_size,
        workspace=str(ws),
        group=group,
        progress=progress,
    )
    # --- 2. load once, then one model after the other --------------------------------
    if on_stage is not None:
        on_stage(f"loading {len(resolved)} adapter(s) and their base model")
    engine = Engine.load(
        [s for s in specs if s != BASE],
        workspace=str(ws),
        tracking_uri=uri,
        backend=backend,
        device=device,
        precision=precision,
        max_batch_size=batch_size,
        max_new_tokens=max_tokens,
        trust_remote_code=trust_remote_code,
    )
    server = None
    try:
        if sim:
            from simtune.serving.server import Server

            server = Server(engine, host="127.0.0.1", port=0).start()
        for name in report.models:
            info = served[name]
            training_run = report.training_runs[name]
            tags = _model_tags(name, report.specs[name], info, base_model)
            with _maybe_run(logger, name, training_run, tags, params) as run:
                metrics, rows, result = _evaluate_one(
                    job, engine, server.url if server else None, name, info
                )
                report.metrics[name] = metrics
                if rows is not None:
                    report.samples[name] = rows
                if result is not None:
                    report.sims[name] = result
                if run is not None:
                    run.log_results(metrics, rows, result, source)
                    report.runs[name] = run.run_id
                    report.experiments[name] = run.experiment_id
    finally:
        if server is not None:
            server.stop()
        engine.close()
    return report


@dataclass
class _Job:
    """What every model of one `evaluate` call is run with."""

    decisions: list[Any]
    source: Any
    sim: str | None
    episodes: int
    seed: int
    steps: int | None
    sim_options: dict[str, Any]
    max_tokens: int
    temperature: float
    system_prompt: str | None
    batch_size: int
    workspace: str
    group: str
    progress: Progress | None


def _evaluate_one(
    job: _Job, engine: Any, url: str | None, name: str, info: Any
) -> tuple[dict[str, float | int | None], list[dict[str, Any]] | None, dict[str, Any] | None]:
    """(metrics, per-sample rows or None, SimResult dict or None) of one model."""
    if job.sim:
        assert url is not None
        metrics, result = _run_sim(job, url, name)
        return metrics, None, result
    system = job.system_prompt if job.system_prompt is not None else _trained_system_prompt(info)
    rows = _generate_rows(job, engine, name, system)
    return dataset_metrics(rows), rows, None


# --- inputs ------------------------------------------------------------------------------


def _check_models(models: Sequence[str]) -> list[str]:
    if isinstance(models, str):
        models = [models]
    specs = [str(m).strip() for m in models or []]
    if not specs or any(not s for s in specs):
        raise ConfigError(
            "--model: name at least one model (an id, NAME/VERSION, NAME@ALIAS, a path or 'base')"
        )
    dupes = sorted({s for s in specs if specs.count(s) > 1})
    if dupes:
        raise ConfigError(f"--model: {', '.join(dupes)} given more than once")
    if specs == [BASE]:
        raise ConfigError(
            "--model: 'base' means the base model of the other --model specs; give the base "
            "model's directory or id to evaluate it alone"
        )
    return specs


def _read_heldout(paths: list[str], max_samples: int | None) -> tuple[list[Any], dict[str, Any]]:
    from simtune.decisions.reader import read_dataset, select

    dataset = read_dataset(paths)
    chosen = select(dataset.decisions, max_samples=max_samples).decisions
    if not chosen:
        where = dataset.files[0].path if len(dataset.files) == 1 else f"{len(dataset.files)} files"
        raise DataError("no held-out decisions to evaluate on", path=where)
    inputs = {
        "dataset_files": [f.path for f in dataset.files],
        "dataset_sha256": [f.sha256 for f in dataset.files],
        "num_records": len(dataset.decisions),
        "num_samples": len(chosen),
    }
    return chosen, inputs


def _reward_source(reward_fn: str | None, judge_url: str | None, judge_model: str | None) -> Any:
    if reward_fn and judge_url:
        raise ConfigError("give one reward source: --reward_fn or --judge_url, not both")
    if not (reward_fn or judge_url):
        return None
    from simtune.rewards import make_reward_source

    # The same construction (and fail-fast checks, judge key from the environment) as
    # PPO's online reward, so a score means the same thing in training and evaluation.
    cfg = SimpleNamespace(
        reward_fn=reward_fn,
        reward_model=None,
        judge_url=judge_url,
        judge_model=judge_model,
        judge_timeout=30.0,
        judge_max_retries=3,
        trust_remote_code=False,
    )
    return make_reward_source(cfg)


def _trained_system_prompt(info: Any) -> str | None:
    """The system prompt an adapter was trained with (simtune.json), so it is asked the
    way it learned; None for the base and for adapters without one."""
    adapter = getattr(info, "adapter_dir", None)
    if not adapter:
        return None
    meta = Path(adapter) / "simtune.json"
    try:
        value = json.loads(meta.read_text(encoding="utf-8")).get("config", {}).get("system_prompt")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return value or None


# --- dataset mode ------------------------------------------------------------------------


def _generate_rows(
    job: _Job, engine: Any, name: str, system_prompt: str | None
) -> list[dict[str, Any]]:
    from simtune.rewards import prompt_text

    decisions, progress = job.decisions, job.progress
    prompts = [d.chat_prompt(system_prompt) for d in decisions]
    total = len(prompts)
    generations: list[Any] = []
    if progress is not None:
        progress(name, 0, total)
    # In chunks, not one call: the progress bar moves and memory stays bounded.
    for start in range(0, total, job.batch_size):
        chunk = prompts[start : start + job.batch_size]
        generations.extend(
            engine.generate(name, chunk, max_tokens=job.max_tokens, temperature=job.temperature)
        )
        if progress is not None:
            progress(name, len(generations), total)
    texts = [g.text for g in generations]
    rewards: list[float | None] = [None] * total
    if job.source is not None:
        rewards = list(job.source.score(prompts, texts, decisions))
    rows = []
    for d, prompt, gen, reward in zip(decisions, prompts, generations, rewards, strict=True):
        reference = d.target
        ref_json = is_json_answer(reference)
        rows.append(
            {
                "decision_id": d.decision_id,
                "agent_type": d.agent_type,
                "prompt": prompt_text(prompt),
                "reference": reference,
                "generated": gen.text,
                "exact_match": exact_match(gen.text, reference),
                "reference_is_json": ref_json,
                "json_valid": is_json_answer(gen.text) if ref_json else None,
                "reward": reward,
                "completion_tokens": int(gen.completion_tokens),
                "finish_reason": gen.finish_reason,
            }
        )
    return rows


# --- sim mode ----------------------------------------------------------------------------

LOCAL_TIMEOUT_S = 900.0
"""Seconds a simulation waits for one answer of the in-process server (sim mode, the
demo and the loop)."""


def _run_sim(job: _Job, url: str, name: str) -> tuple[dict[str, float | int | None], dict]:
    from simtune.sims import LLMPolicy, run_simulation

    assert job.sim is not None

    # The server is this process's own engine on loopback: a timeout only guards against
    # a hang, and a CPU generating for a real model under load can take minutes for a
    # batch (a retried request is generated twice). As many requests in flight as the
    # engine batches.
    policy = LLMPolicy(
        url,
        model=name,
        max_tokens=job.max_tokens,
        temperature=job.temperature,
        timeout=LOCAL_TIMEOUT_S,
        concurrency=job.batch_size,
    )
    progress = job.progress

    def on_episode(episode: int, total: int) -> None:
        if progress is not None:
            progress(name, episode - 1, total)

    result = run_simulation(
        job.sim,
        policy,
        episodes=job.episodes,
        steps=job.steps,
        seed=job.seed,
        # A separate env: evaluation episodes must not become training data by accident.
        env_name=f"{job.sim}-eval",
        workspace=job.workspace,
        run_id=f"{job.group}-{_slug(name)}",
        progress=on_episode,
        **job.sim_options,
    )
    if progress is not None:
        progress(name, job.episodes, job.episodes)
    n = result.decisions
    metrics: dict[str, float | int | None] = {
        "mean_reward": result.mean_reward,
        "invalid_rate": round(result.invalid / n, 6) if n else None,
        "decisions": n,
        "invalid": result.invalid,
        "mean_immediate_reward": result.mean_immediate_reward,
        "expert_agreement": result.expert_agreement,
    }
    for kind, summary in result.by_agent_type.items():
        metrics[f"mean_reward/{kind}"] = summary["mean_reward"]
        d = summary["decisions"]
        metrics[f"invalid_rate/{kind}"] = round(summary["invalid"] / d, 6) if d else None
    for kind, value in result.mean_episode_return.items():
        metrics[f"episode_return/{kind}"] = value
    return metrics, result.to_dict()


# --- MLflow ------------------------------------------------------------------------------


class _EvalRun:
    """The open evaluation run of one model: what it logs at the end."""

    def __init__(self, tracker: Any, run_id: str) -> None:
        self.tracker, self.run_id = tracker, run_id
        self.experiment_id = tracker.experiment_id

    def log_results(
        self,
        metrics: dict[str, float | int | None],
        rows: list[dict[str, Any]] | None,
        sim_result: dict[str, Any] | None,
        source: Any,
    ) -> None:
        mlflow = self.tracker.mlflow
        mlflow.log_metrics({f"eval/{k}": float(v) for k, v in metrics.items() if v is not None})
        if rows is not None:
            table = {
                key: [r[key] for r in rows]
                for key in (
                    "decision_id",
                    "agent_type",
                    "prompt",
                    "reference",
                    "generated",
                    "exact_match",
                    "json_valid",
                    "reward",
                    "completion_tokens",
                    "finish_reason",
                )
            }
            mlflow.log_table(data=table, artifact_file="eval_samples.json")
            if source is not None:
                stats = {f"eval/reward_source/{k}": float(v) for k, v in source.stats().items()}
                mlflow.log_metrics(stats)
        if sim_result is not None:
            mlflow.log_dict(sim_result, "sim_result.json")
            path = sim_result.get("path")
            if path and Path(path).is_file():
                mlflow.log_artifact(path, artifact_path="decisions")
        mlflow.log_dict(metrics, "eval_metrics.json")


class _RunLogger:
    """Opens one evaluation run per model in the right experiment, linked to training."""

    def __init__(self, uri: str, workspace: Path, experiment_name: str | None, group: str) -> None:
        import mlflow

        self.uri, self.workspace, self.group = uri, workspace, group
        self.experiment_name = experiment_name
        self.client = mlflow.MlflowClient(uri)
        self._trackers: dict[str, Any] = {}
        self._plan: dict[str, str | None] = {}
        self._fallback = experiment_name or DEFAULT_EXPERIMENT

    def plan(self, training_runs: dict[str, str | None]) -> None:
        """Find each training run's experiment before any run opens; models without one
        go to --experiment_name, else to the first tuned model's experiment."""
        self._plan = {name: self._experiment_of(run) for name, run in training_runs.items()}
        if self.experiment_name is None:
            found = next((e for e in self._plan.values() if e), None)
            self._fallback = found or DEFAULT_EXPERIMENT

    def _experiment_of(self, training_run: str | None) -> str | None:
        if not training_run:
            return None
        try:
            run = self.client.get_run(training_run)
            return str(self.client.get_experiment(run.info.experiment_id).name)
        except Exception:  # another store, or deleted: linked by tag only
            log.info("training run %s is not in %s; not nesting under it", training_run, self.uri)
            return None

    def start(self, name: str, training_run: str | None, tags: dict[str, str]) -> tuple[Any, dict]:
        from simtune.tracking.tracker import Tracker

        experiment = self._plan.get(name)
        tags = {**tags, "simtune.kind": "evaluation", "simtune.eval_group": self.group}
        if training_run:
            tags["simtune.training_run_id"] = training_run
        if experiment is not None and training_run:
            # Same experiment as the training run, so the UI can nest the evaluation.
            tags["mlflow.parentRunId"] = training_run
        else:
            experiment = self._fallback
        if experiment not in self._trackers:
            self._trackers[experiment] = Tracker(self.uri, experiment, self.workspace)
        return self._trackers[experiment], tags


def _maybe_run(
    logger: _RunLogger | None,
    name: str,
    training_run: str | None,
    tags: dict[str, str],
    params: dict[str, Any],
) -> Any:
    import contextlib

    if logger is None:
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def opened() -> Any:
        tracker, run_tags = logger.start(name, training_run, tags)
        with tracker.run(f"eval-{_slug(name)}-{_stamp()}", run_tags) as run_id:
            tracker.log_params({k: v for k, v in params.items() if v is not None})
            yield _EvalRun(tracker, run_id)

    return opened()


def _model_tags(name: str, spec: str, info: Any, base_model: str | None) -> dict[str, str]:
    tags = {"simtune.model": name, "simtune.model_spec": spec}
    if base_model:
        tags["simtune.base_model"] = str(base_model)
    adapter = getattr(info, "adapter_dir", None)
    if adapter:
        tags["simtune.adapter_path"] = str(adapter)
    reg_name = getattr(info, "registered_name", None)
    reg_version = getattr(info, "registered_version", None)
    if reg_name:
        tags["simtune.registered_model"] = f"{reg_name}/{reg_version}" if reg_version else reg_name
    return tags


def _flat_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if key == "dataset_files":
            out["dataset.files"] = ",".join(Path(p).name for p in value)
        elif key == "dataset_sha256":
            out["dataset.sha256"] = ",".join(h[:16] for h in value)
        elif key == "sim_options":
            out.update({f"sim.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:80] or "model"
