"""simtune: fine-tune the LLM behind agent simulations on the decisions its agents made.

Heavy libraries (torch, transformers, mlflow) are imported only when a function that
needs them runs, so `import simtune` and the CLI start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Recorder", "TuningConfig", "TuningResult", "run_tuning", "__version__"]

if TYPE_CHECKING:
    from simtune.api import TuningResult, run_tuning
    from simtune.config import TuningConfig
    from simtune.decisions.recorder import Recorder


def __getattr__(name: str) -> Any:
    if name in ("run_tuning", "TuningResult"):
        from simtune import api

        return getattr(api, name)
    if name == "Recorder":
        from simtune.decisions.recorder import Recorder

        return Recorder
    if name == "TuningConfig":
        from simtune.config import TuningConfig

        return TuningConfig
    raise AttributeError(f"module 'simtune' has no attribute {name!r}")
