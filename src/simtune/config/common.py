"""Options several commands share: the workspace, inference precision, a listening server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simtune.config.fields import arg
from simtune.config.optim import PRECISIONS

WORKSPACE_HELP = "workspace root (default: $SIMTUNE_HOME or the current directory)"

PRECISION_HELP = (
    "weights and matmuls in auto (default: bf16 where the hardware does it fast -- a CUDA "
    "GPU with bf16 or a CPU with AMX/AVX512-BF16 --, fp16 on other CUDA GPUs, else fp32), "
    "bf16, fp16 (CUDA only) or fp32"
)


def workspace_arg(**cli: Any) -> Any:
    """`--workspace`, resolved by `simtune.config.resolve_workspace` (one help text for
    every command that takes it)."""
    return arg(None, help=WORKSPACE_HELP, **cli)


def precision_arg(**cli: Any) -> Any:
    """`--precision` of the commands that generate (serve, eval), resolved by
    `simtune.training.model.resolve_precision(..., inference=True)`."""
    return arg("auto", choices=PRECISIONS, help=PRECISION_HELP, **cli)


@dataclass
class ListenArgs:
    """--host, --port and --api-key of a server command: loopback unless told otherwise,
    a key only when given (flag or the environment variable a subclass names)."""

    host: str = "127.0.0.1"
    """address to listen on (default: 127.0.0.1, loopback only; anything else logs a
    warning, use --api-key then)"""

    port: int = 0
    """port to listen on (default: {default}; 0 picks a free one)"""

    api_key: str | None = arg(None, flag="--api-key", metavar="KEY")
    """require this key from clients (Authorization: Bearer KEY), else 401 (default:
    ${env}; none)"""
