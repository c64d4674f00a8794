"""Public Python API: what the CLI calls. `run_tuning` is the one training entry point.

The order of work is deliberate: every check that can fail on the user's input
(options, dataset, model path, tokenizer, tracking server) runs *before* an MLflow run
is opened or anything is written, so bad input costs seconds and leaves nothing
behind. After that, the model is built in a staging directory and only moved to
`models/<model_id>/` and entered in the registry once training and registration
succeeded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from simtune.config import TuningConfig, build_config
from simtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class TuningResult:
    """What a finished training job produced."""

    model_id: str
    adapter_path: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    registered_model_name: str
    registered_model_version: str
    model_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_model_id(mode: str, base_name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", base_name).strip("-.")[:40] or "model"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{mode}-{slug}-{stamp}-{secrets.token_hex(3)}"


def run_tuning(
    config: TuningConfig | str | None = None,
    /,
    *,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> TuningResult:
    """Train, track and register one model.

    `config` may be a TuningConfig or the path of a YAML file; keyword `options`
    (the same names as the CLI flags) override it. `progress(step)` is called after each
    logged training step (SFT: every `logging_steps`; PPO: every rollout step); its
    exceptions are swallowed, so a progress display can never fail a job. Raises a
    `SimtuneError` subclass on bad input, before anything is written.
    """
    if isinstance(config, TuningConfig):
        cfg = build_config(overrides=options, base=config)
    else:
        cfg = build_config(config, options)
    if cfg.devices is not None:
        # Must happen before torch initialises CUDA (torch is imported lazily below).
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.devices
    workspace = cfg.workspace_path()

    # --- 1. inputs, cheapest first --------------------------------------------------
    from simtune.decisions.reader import describe, read_dataset, select
    from simtune.training.model import resolve_model

    dataset = read_dataset(cfg.dataset_path)
    selection = select(
        dataset.decisions,
        min_rating=cfg.min_rating,
        min_reward=cfg.min_reward,
        agent_types=cfg.agent_types,
        max_samples=cfg.max_samples,
    )
    if not selection.decisions:
        dropped = ", ".join(f"{k}: {v}" for k, v in selection.dropped.items() if v) or "none"
        where = dataset.files[0].path if len(dataset.files) == 1 else f"{len(dataset.files)} files"
        raise DataError(
            f"no usable records ({len(dataset.decisions)} read; dropped by filters: {dropped})",
            path=where,
        )
    stats = describe(dataset, selection)
    spec = resolve_model(cfg.llm_path or "", workspace)

    model_id = new_model_id(cfg.tuning_mode, spec.base_name)
    final_dir = (
        Path(cfg.output_dir).resolve() if cfg.output_dir else workspace / "models" / model_id
    )
    if final_dir.exists():
        raise ConfigError(f"--output_dir: {final_dir} already exists; choose another")

    from simtune.tracking import Tracker, check_reachable, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(cfg.tracking_uri, workspace)
    check_reachable(tracking_uri)

    from simtune.training.model import load_tokenizer

    tokenizer = load_tokenizer(spec, trust_remote_code=cfg.trust_remote_code)
    prepared = _prepare(cfg, selection.decisions, tokenizer, stats)

    tracker = Tracker(tracking_uri, cfg.experiment_name, workspace, on_step=progress)
    registered_name = cfg.registered_model_name or f"{cfg.experiment_name}-{cfg.tuning_mode}"

    # --- 2. train in a staging dir; publish only on success ---------------------------
    staging = final_dir.parent / f".staging-{model_id}"
    tags = {
        "simtune.model_id": model_id,
        "simtune.tuning_mode": cfg.tuning_mode,
        "simtune.base_model": spec.base,
    }
    published = False
    version = ""
    try:
        with tracker.run(cfg.run_name or model_id, tags) as run_id:
            tracker.log_params(cfg.to_dict())
            tracker.log_dataset(stats)
            adapter_dir = staging / "adapter"
            metrics = _train(cfg, prepared, spec, tokenizer, staging, adapter_dir, tracker)
            tokenizer.save_pretrained(str(adapter_dir))
            shutil.rmtree(staging / "checkpoints", ignore_errors=True)

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
                },
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
                },
            }
            (adapter_dir / "simtune.json").write_text(json.dumps(meta, indent=2, default=str))
            tracker.log_artifacts(adapter_dir, "adapter")
            tracker.mlflow.log_metrics({f"final/{k}": v for k, v in metrics.items()})

            final_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(adapter_dir, final_dir)
            published = True
            _registry_add(workspace, meta, final_dir)
    except BaseException:
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

    return TuningResult(
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
    )


def _prepare(cfg: TuningConfig, decisions: list[Any], tokenizer: Any, stats: dict[str, Any]) -> Any:
    """Mode-specific input work that can fail on the user's data, before any run opens."""
    if cfg.tuning_mode == "sft":
        from simtune.training.sft import build_examples

        examples = build_examples(decisions, tokenizer, cfg)
        stats.update(
            num_tokens=examples.num_tokens,
            num_completion_tokens=examples.num_completion_tokens,
            truncated_prompts=examples.truncated_prompts,
        )
        return examples
    if cfg.tuning_mode == "ppo":
        from simtune.training.ppo import build_samples
        from simtune.training.rewards import make_reward_source

        samples = build_samples(decisions, tokenizer, cfg)
        stats.update(num_ppo_samples=len(samples), rollout=cfg.rollout)
        source = make_reward_source(cfg) if cfg.rollout == "online" else None
        return samples, source
    from simtune.training.reward_model import build_reward_examples

    examples = build_reward_examples(decisions, tokenizer, cfg)
    stats.update(num_scored=len(examples[1]))
    return examples


def _train(
    cfg: TuningConfig,
    prepared: Any,
    spec: Any,
    tokenizer: Any,
    staging: Path,
    adapter_dir: Path,
    tracker: Any,
) -> dict[str, float]:
    """Run the mode's recipe and save its adapter to `adapter_dir`; returns final metrics."""
    from simtune.training.model import load_model

    if cfg.tuning_mode == "reward":
        from simtune.training.reward_model import train_reward_model

        metrics, trained = train_reward_model(
            cfg, prepared, spec, tokenizer, staging, [tracker.metrics_callback()]
        )
        trained.save_pretrained(str(adapter_dir), safe_serialization=True)
        return metrics
    model = load_model(
        spec,
        trainable_adapter=True,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.tuning_mode == "sft":
        from simtune.training.sft import train_sft

        metrics, trained = train_sft(
            cfg, prepared, model, tokenizer, staging, [tracker.metrics_callback()]
        )
        trained.save_pretrained(str(adapter_dir), safe_serialization=True)
        return metrics
    from simtune.training.ppo import save_value_head, train_ppo

    samples, source = prepared
    metrics, trained, v_head = train_ppo(
        cfg,
        samples,
        model,
        tokenizer,
        reward_source=source,
        log_metrics=tracker.log_metrics,
        adapter_dir=spec.adapter,
    )
    trained.save_pretrained(str(adapter_dir), safe_serialization=True)
    save_value_head(v_head, adapter_dir)
    return metrics


def _registry_add(workspace: Path, meta: dict[str, Any], path: Path) -> None:
    from simtune.registry import Registry

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
