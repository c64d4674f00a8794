"""Public Python API: what the CLI calls. `run_tuning` is the one training entry point.

The order of work is deliberate: every check that can fail on the user's input
(options, dataset, model path, tokenizer, tracking server) runs *before* an MLflow run
is opened or anything is written, so bad input costs seconds and leaves nothing
behind. After that, the model is built in a staging directory and only moved to
`models/<model_id>/` and entered in the registry once training and registration
succeeded.

Resume (`--save_steps`, `--resume`, `--resume_from`): a job's checkpoints live outside
the staging dir, in `<workspace>/jobs/<model_id>/` (`job.json` + `checkpoints/
checkpoint-<step>/`), so they survive a failed, SIGTERMed or SIGKILLed job; they are
removed when the job succeeds. SIGTERM/Ctrl-C during training saves a checkpoint at the
end of the current step, then the job unwinds as KeyboardInterrupt (run KILLED, exit
130). `--resume` picks the most recently updated job dir whose job.json has the same
tuning mode, model, dataset paths and output dir; the resumed job keeps the model id
and reopens the same MLflow run (a SIGKILLed job's run was left RUNNING; it simply
continues and ends FINISHED). Steps logged after the last checkpoint of a SIGKILLed job
are logged again on resume (MLflow keeps both values for those steps).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simtune.config import TuningConfig, build_config
from simtune.errors import ConfigError, DataError
from simtune.training.distributed import Distributed, NoTracker, StopRequest, stop_on_signal
from simtune.training.job import (
    JOBS_DIR,
    TuningResult,
    find_resume,
    keep_or_drop_job,
    new_model_id,
    write_job,
)
from simtune.training.publication import INTENT_FILE, fault_point, recover_workspace, write_intent

if TYPE_CHECKING:
    from simtune.decisions.reader import Selection
    from simtune.training.model import ModelSpec

log = logging.getLogger(__name__)


def run_tuning(
    config: TuningConfig | str | None = None,
    /,
    llm_path: str | None = None,
    dataset_path: str | list[str] | None = None,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
    devices: str | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> TuningResult:
    """Train, track and register one model.

    `config` may be a TuningConfig, the path of a YAML file, or a tuning mode
    (``"sft"``, ``"ppo"``, ``"reward"``, ``"grpo"``, ``"dpo"``, ``"kto"``): YuLan-OneSim's call
    ``run_tuning(tuning_mode, llm_path, dataset_path=None, experiment_name=...,
    tracking_uri=..., devices=...)`` works as it is, positionally too. Those parameters
    and the keyword `options` (the same names as the CLI flags) override the config;
    None leaves an option at its default. ``dataset_path=None`` falls back to the
    environment's datasets folder, ``<workspace>/envs/<env>/datasets``, when `env` is
    given (``env="job_market"``). `progress(step)` is called after each logged training
    step (SFT: every `logging_steps`; PPO: every rollout step); its exceptions are
    swallowed, so a progress display can never fail a job. Raises a `SimtuneError`
    subclass on bad input, before anything is written.
    """
    from simtune.config import TUNING_MODES

    named = {
        "llm_path": llm_path,
        "dataset_path": [dataset_path] if isinstance(dataset_path, (str, Path)) else dataset_path,
        "experiment_name": experiment_name,
        "tracking_uri": tracking_uri,
        "devices": devices,
    }
    options = {**{k: v for k, v in named.items() if v is not None}, **options}
    if isinstance(config, str) and config in TUNING_MODES:
        options.setdefault("tuning_mode", config)
        config = None
    if isinstance(config, TuningConfig):
        cfg = build_config(overrides=options, base=config)
    else:
        cfg = build_config(config, options)
    if "LOCAL_RANK" not in os.environ:
        # Finish or undo what a killed job left (a half-published model, a run RUNNING
        # with no process) before this job looks for one to resume.
        recover_workspace(cfg.workspace_path())
    if cfg.distributed():
        from simtune.training.launch import is_worker, launch

        if not is_worker():
            # Everything that can fail on the user's input fails here, in one process
            # and with exit 2, before several processes start loading a model.
            _check_inputs(cfg, cfg.workspace_path())
            return launch(cfg)
    if cfg.devices is not None and "LOCAL_RANK" not in os.environ:
        # Must happen before torch initialises CUDA (torch is imported lazily below).
        # A launched worker inherits the launcher's setting and picks its own device.
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.devices
    workspace = cfg.workspace_path()
    dist = Distributed.start()

    # --- 1. inputs, cheapest first --------------------------------------------------
    inputs = _check_inputs(cfg, workspace)
    stats, selection, spec = inputs.stats, inputs.selection, inputs.spec
    job, checkpoint, final_dir = inputs.job, inputs.checkpoint, inputs.final_dir
    tracking_uri = inputs.tracking_uri
    model_id = str(job["model_id"]) if job else new_model_id(cfg.tuning_mode, spec.base_name)
    # Every process must train into the same job dir (checkpoints, resume): rank 0's id.
    model_id = dist.broadcast(model_id)
    if final_dir is None:  # --output_dir, when given, was checked with the inputs
        final_dir = workspace / "models" / model_id
        if final_dir.exists():
            raise ConfigError(f"--output_dir: {final_dir} already exists; choose another")

    from simtune.training.model import load_tokenizer, resolve_precision

    # Fails on an impossible choice (fp16 on CPU) before any run opens.
    precision = resolve_precision(cfg.requested_precision())
    log.info("precision: %s (%s)", precision.name, precision.reason)
    tokenizer = load_tokenizer(spec, trust_remote_code=cfg.trust_remote_code)
    prepared = _prepare(cfg, selection.decisions, tokenizer, stats, spec)

    job_dir = workspace / JOBS_DIR / model_id
    if not dist.is_main:
        # Ranks > 0 train their share and leave every write (run, checkpoints, model,
        # registry) to rank 0.
        metrics = _train(
            cfg, prepared, spec, tokenizer, job_dir, None, NoTracker(), checkpoint, dist
        )
        return TuningResult(
            model_id=model_id,
            adapter_path="",
            run_id="",
            experiment_id="",
            tracking_uri=tracking_uri,
            registered_model_name="",
            registered_model_version="",
            model_uri="",
            metrics=metrics,
            dataset=stats,
        )

    from simtune.tracking.tracker import Tracker

    tracker = Tracker(tracking_uri, cfg.experiment_name, workspace, on_step=progress)
    # One registered model per experiment, the mode a version tag (simtune.tuning_mode):
    # an alias such as `champion` can then move from an SFT version to a PPO one.
    registered_name = cfg.registered_model_name or cfg.experiment_name

    # --- 2. train in a staging dir; publish only on success ---------------------------
    staging = final_dir.parent / f".staging-{model_id}"
    tags = {
        "simtune.model_id": model_id,
        "simtune.tuning_mode": cfg.tuning_mode,
        "simtune.base_model": spec.base,
        "simtune.precision": precision.name,
    }
    published = False
    finished = False
    version = ""
    try:
        with tracker.run(
            cfg.run_name or model_id, tags, resume_run_id=job.get("run_id") if job else None
        ) as run_id:
            if not tracker.resumed:
                # A reopened run has these already; MLflow params cannot change.
                tracker.log_params(cfg.to_dict())
                tracker.log_dataset(stats)
            write_job(job_dir, cfg, model_id, run_id, tracking_uri, status="running")
            adapter_dir = staging / "adapter"
            if checkpoint is not None:
                log.info("resuming %s from %s", model_id, checkpoint)
            metrics = _train(
                cfg, prepared, spec, tokenizer, job_dir, adapter_dir, tracker, checkpoint, dist
            )
            tokenizer.save_pretrained(str(adapter_dir))

            # From here on MLflow and the workspace change visibly: first the intent a
            # later command needs to finish or undo this (simtune.training.publication).
            write_intent(
                job_dir,
                {
                    "model_id": model_id,
                    "run_id": run_id,
                    "tracking_uri": tracking_uri,
                    "registered_model_name": registered_name,
                    "final_dir": str(final_dir),
                },
            )
            fault_point("before_register")
            version, model_uri = tracker.register(
                adapter_dir,
                name=registered_name,
                base_model=spec.base,
                base_is_local=spec.base_is_local,
                tags=tags,
                task="reward" if cfg.tuning_mode == "reward" else "generate",
                # A reward model must see its inputs the way it was trained on them.
                extra_config={"max_length": cfg.max_length, "system_prompt": cfg.system_prompt},
            )
            meta = {
                "model_id": model_id,
                "tuning_mode": cfg.tuning_mode,
                "created_at": datetime.now(timezone.utc).isoformat(),
                "base_model": {
                    "path": spec.base,
                    "is_local": spec.base_is_local,
                    "fingerprint": spec.base_fingerprint,
                    **({"gguf": spec.gguf} if spec.gguf else {}),
                },
                "precision": precision.to_dict(),
                "continued_from_adapter": spec.adapter,
                "config": cfg.to_dict(),
                "dataset": stats,
                "metrics": metrics,
                "mlflow": {
                    "tracking_uri": tracking_uri,
                    "experiment_id": tracker.experiment_id,
                    "run_id": run_id,
                    "registered_model_name": registered_name,
                    "registered_model_version": version,
                    "model_uri": model_uri,
                    # False: the server went away; `simtune sync` sends the rest later
                    # (the tracker flips this too if the end of the run fails).
                    "synced": bool(version),
                },
            }
            (adapter_dir / "simtune.json").write_text(json.dumps(meta, indent=2, default=str))
            fault_point("after_register")
            tracker.log_artifacts(adapter_dir, "adapter")
            tracker.log_final_metrics(metrics)

            final_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(adapter_dir, final_dir)
            tracker.moved(adapter_dir, final_dir)
            published = True
            fault_point("after_move")
            _registry_add(workspace, meta, final_dir)
            fault_point("after_registry")
            finished = True
    except BaseException as exc:
        (job_dir / INTENT_FILE).unlink(missing_ok=True)  # undone below, in this process
        keep_or_drop_job(job_dir, "killed" if isinstance(exc, KeyboardInterrupt) else "failed")
        # Nothing of an unfinished job may look usable: no model dir, no registry
        # entry, no registered version (the FAILED/KILLED run itself stays, as history).
        if published:
            shutil.rmtree(final_dir, ignore_errors=True)
        if version:
            with contextlib.suppress(Exception):
                tracker.client.delete_model_version(registered_name, version)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if finished:
            # The model is published; its checkpoints would only cost disk.
            shutil.rmtree(job_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # `jobs/` itself only while it holds a job
            job_dir.parent.rmdir()

    result = TuningResult(
        model_id=model_id,
        adapter_path=str(final_dir),
        run_id=run_id,
        experiment_id=tracker.experiment_id,
        tracking_uri=tracking_uri,
        registered_model_name=registered_name,
        registered_model_version=version,
        model_uri=model_uri,
        metrics=metrics,
        dataset=stats,
        synced=tracker.synced,
    )
    from simtune.training.launch import write_result

    write_result(result)  # a no-op unless this process was launched by `launch`
    return result


@dataclass
class JobInputs:
    """What `_check_inputs` established about a job before anything is written."""

    stats: dict[str, Any]
    """Dataset statistics (`decisions.describe`), logged to MLflow and simtune.json."""
    selection: Selection
    """The decisions kept by the filters."""
    spec: ModelSpec
    """The resolved base model / starting adapter."""
    job: dict[str, Any] | None
    """job.json of the job being resumed, or None for a fresh job."""
    checkpoint: Path | None
    """The checkpoint to resume from, or None."""
    final_dir: Path | None
    """--output_dir resolved (None: models/<model_id>, known once the id is)."""
    tracking_uri: str


def _check_inputs(cfg: TuningConfig, workspace: Path) -> JobInputs:
    """Every check on the user's input that needs no model weights, cheapest first:
    dataset, filters, model path, resume target, output dir, tracking server. Returns
    (stats, selection, model spec, job to resume, its checkpoint, output dir or None
    for the default one, tracking URI)."""
    from simtune.decisions.reader import describe, read_dataset, select
    from simtune.tracking.tracker import check_reachable, resolve_tracking_uri
    from simtune.training.model import resolve_model

    dataset = read_dataset(cfg.dataset_path)
    selection = select(
        dataset.decisions,
        min_rating=cfg.min_rating,
        min_reward=cfg.min_reward,
        agent_types=cfg.agent_types,
        max_samples=cfg.max_samples,
        unfence_outputs=cfg.unfence_outputs,
    )
    if not selection.decisions:
        dropped = ", ".join(f"{k}: {v}" for k, v in selection.dropped.items() if v) or "none"
        where = dataset.files[0].path if len(dataset.files) == 1 else f"{len(dataset.files)} files"
        raise DataError(
            f"no usable records ({len(dataset.decisions)} read; dropped by filters: {dropped})",
            path=where,
        )
    if (
        cfg.tuning_mode == "ppo"
        and cfg.rollout == "offline"
        and all(d.reward is None and d.rating is None for d in selection.decisions)
    ):
        where = dataset.files[0].path if len(dataset.files) == 1 else f"{len(dataset.files)} files"
        raise DataError(
            f"no scored records for offline PPO ({len(selection.decisions)} record(s) have "
            "neither 'reward' nor 'rating'); add scores or use --rollout online with a "
            "reward source",
            path=where,
        )
    stats = describe(dataset, selection)
    spec = resolve_model(cfg.llm_path or "", workspace)
    if cfg.deepspeed:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("--deepspeed: the deepspeed package is not installed")
    job, checkpoint = find_resume(cfg, workspace)
    final_dir = Path(cfg.output_dir).resolve() if cfg.output_dir else None
    if final_dir is not None and final_dir.exists():
        raise ConfigError(f"--output_dir: {final_dir} already exists; choose another")
    tracking_uri = resolve_tracking_uri(cfg.tracking_uri, workspace)
    check_reachable(tracking_uri)
    return JobInputs(stats, selection, spec, job, checkpoint, final_dir, tracking_uri)


def _prepare(
    cfg: TuningConfig, decisions: list[Any], tokenizer: Any, stats: dict[str, Any], spec: Any
) -> Any:
    """Mode-specific input work that can fail on the user's data, before any run opens."""
    if cfg.tuning_mode == "sft":
        from simtune.training.sft import build_examples

        examples = build_examples(
            decisions, tokenizer, cfg, cache_dir=cfg.workspace_path() / "cache" / "examples"
        )
        stats.update(
            num_tokens=examples.num_tokens,
            num_completion_tokens=examples.num_completion_tokens,
            truncated_prompts=examples.truncated_prompts,
        )
        return examples
    if cfg.tuning_mode == "ppo":
        from simtune.training.ppo import build_ppo_inputs

        inputs = build_ppo_inputs(decisions, tokenizer, cfg, spec)
        stats.update(num_ppo_samples=len(inputs.samples), rollout=cfg.rollout)
        return inputs
    if cfg.tuning_mode == "grpo":
        from simtune.training.grpo import build_grpo_inputs

        grpo = build_grpo_inputs(decisions, tokenizer, cfg, spec)
        stats.update(num_grpo_prompts=len(grpo.prompts), long_prompts=grpo.long_prompts)
        return grpo
    if cfg.tuning_mode in ("dpo", "kto"):
        from simtune.training.preference import build_preference_data

        data = build_preference_data(decisions, cfg)
        stats.update(data.stats)
        return data
    from simtune.training.reward_model import build_reward_examples

    examples = build_reward_examples(decisions, tokenizer, cfg)
    stats.update(num_scored=len(examples[1]))
    return examples


def _train(
    cfg: TuningConfig,
    prepared: Any,
    spec: Any,
    tokenizer: Any,
    job_dir: Path,
    adapter_dir: Path | None,
    tracker: Any,
    checkpoint: Path | None = None,
    dist: Distributed | None = None,
) -> dict[str, float]:
    """Run the mode's recipe and save its adapter to `adapter_dir` (None: don't, as on
    ranks > 0); returns final metrics.

    Checkpoints go to `job_dir/checkpoints`; `checkpoint` is the one to resume from.
    Raises KeyboardInterrupt after the checkpoint a SIGTERM/Ctrl-C asked for is saved."""
    with stop_on_signal(dist.any if dist is not None and dist.world > 1 else None) as stop:
        metrics, trained, v_head = _train_mode(
            cfg, prepared, spec, tokenizer, job_dir, tracker, checkpoint, stop
        )
        stop.raise_if_requested()
    if adapter_dir is not None:
        trained.save_pretrained(str(adapter_dir), safe_serialization=True)
        if v_head is not None:
            from simtune.training.ppo import save_value_head

            save_value_head(v_head, adapter_dir)
    return metrics


def _train_mode(
    cfg: TuningConfig,
    prepared: Any,
    spec: Any,
    tokenizer: Any,
    job_dir: Path,
    tracker: Any,
    checkpoint: Path | None,
    stop: StopRequest,
) -> tuple[dict[str, float], Any, Any]:
    """The mode's recipe: (final metrics, trained PEFT model, PPO value head or None)."""
    from simtune.training.model import load_model, resolve_precision

    precision = resolve_precision(cfg.requested_precision())
    resume = str(checkpoint) if checkpoint is not None else None
    if cfg.tuning_mode == "reward":
        from simtune.training.reward_model import train_reward_model

        metrics, trained = train_reward_model(
            cfg,
            prepared,
            spec,
            tokenizer,
            job_dir,
            [tracker.metrics_callback()],
            resume_from=resume,
            should_stop=stop,
        )
        return metrics, trained, None
    model = load_model(
        spec,
        trainable_adapter=True,
        precision=precision,
        trust_remote_code=cfg.trust_remote_code,
        device_map=cfg.device_map,
    )
    if cfg.tuning_mode != "ppo":  # the Trainer-based recipes share one signature
        metrics, trained = _trainer_recipe(cfg.tuning_mode)(
            cfg,
            prepared,
            model,
            tokenizer,
            job_dir,
            [tracker.metrics_callback()],
            resume_from=resume,
            should_stop=stop,
        )
        return metrics, trained, None
    from simtune.training.ppo import train_ppo

    metrics, trained, v_head = train_ppo(
        cfg,
        prepared,
        model,
        tokenizer,
        log_metrics=tracker.log_metrics,
        adapter_dir=spec.adapter,
        checkpoint_dir=job_dir / "checkpoints",
        resume_from=checkpoint,
        should_stop=stop,
    )
    return metrics, trained, v_head


def _trainer_recipe(mode: str) -> Callable[..., tuple[dict[str, float], Any]]:
    """sft, grpo, dpo or kto: (cfg, prepared, model, tokenizer, job_dir, callbacks, *,
    resume_from, should_stop) -> (metrics, trained model)."""
    if mode == "sft":
        from simtune.training.sft import train_sft

        return train_sft
    if mode == "grpo":
        from simtune.training.grpo import train_grpo

        return train_grpo
    from simtune.training.preference import train_preference

    return train_preference


def _registry_add(workspace: Path, meta: dict[str, Any], path: Path) -> None:
    from simtune.tracking.registry import Registry

    Registry(workspace).add(
        {
            "model_id": meta["model_id"],
            "path": str(path),
            "tuning_mode": meta["tuning_mode"],
            "created_at": meta["created_at"],
            "base_model": meta["base_model"]["path"],
            "base_model_fingerprint": meta["base_model"]["fingerprint"],
            "dataset_files": [
                {"path": f["path"], "sha256": f["sha256"], "records": f["records"]}
                for f in meta["dataset"]["files"]
            ],
            "metrics": meta["metrics"],
            "mlflow": meta["mlflow"],
        }
    )
