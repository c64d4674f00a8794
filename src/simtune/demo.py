"""The demo's inputs: a tiny model and the bundled sample decisions, in a workspace."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

SAMPLE = "sample_decisions.jsonl"


def sample_path() -> Path:
    """The bundled job-market sample (48 decisions, written by simtune.sims.job_market)."""
    return Path(str(resources.files("simtune") / "data" / SAMPLE))


def prepare_demo(workspace: Path) -> tuple[Path, Path]:
    """Create (once) <ws>/base-model and <ws>/envs/job_market/datasets/decisions_sample.jsonl."""
    from simtune.testing import make_tiny_model

    model_dir = workspace / "base-model"
    if not (model_dir / "config.json").is_file():
        make_tiny_model(model_dir)
    data = workspace / "envs" / "job_market" / "datasets" / "decisions_sample.jsonl"
    if not data.is_file():
        data.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_path(), data)
    return model_dir, data
