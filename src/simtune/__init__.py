"""simtune: fine-tune the LLM behind agent simulations on the decisions its agents made.

Heavy libraries (torch, transformers, mlflow) are imported only when a function that
needs them runs, so `import simtune` and the CLI start fast.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that sleep when idle instead of spinning (unless the user set a policy).
# torch's OpenMP reads this when torch is first imported, so it is set here, before any
# simtune module imports torch. Measured on a 2-core machine shared with other jobs
# (load ~9): bf16 matmul + elementwise loops ran 3-5x faster with 2 threads than with
# the default spin-waiting, which burns the cores the other thread is waiting for.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["Recorder", "TuningConfig", "TuningResult", "run_tuning", "__version__"]

if TYPE_CHECKING:
    from simtune.collect.recorder import Recorder
    from simtune.config import TuningConfig
    from simtune.training.job import TuningResult
    from simtune.training.run import run_tuning


def __getattr__(name: str) -> Any:
    if name == "run_tuning":
        from simtune.training.run import run_tuning

        return run_tuning
    if name == "TuningResult":
        from simtune.training.job import TuningResult

        return TuningResult
    if name == "Recorder":
        from simtune.collect.recorder import Recorder

        return Recorder
    if name == "TuningConfig":
        from simtune.config import TuningConfig

        return TuningConfig
    raise AttributeError(f"module 'simtune' has no attribute {name!r}")
