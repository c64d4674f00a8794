"""Subcommand groups of the CLI that live outside cli.py, and the flags they share.

Each module exposes ``register(sub)``: it adds its parser(s) to the top-level
subparsers and sets ``handler=`` on them via ``set_defaults``. Modules import nothing
heavy at import time (the CLI must start fast); handlers import what they need.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

WORKSPACE_HELP = "workspace root (default: $SIMTUNE_HOME or the current directory)"


def positive_int(text: str) -> int:
    """argparse `type=` for counts (episodes, steps, tokens): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_workspace_flag(parser: Any) -> None:
    """`--workspace`, resolved by `simtune.config.resolve_workspace`."""
    parser.add_argument("--workspace", help=WORKSPACE_HELP)


PRECISION_HELP = (
    "weights and matmuls in auto (default: bf16 where the hardware does it fast -- a CUDA "
    "GPU with bf16 or a CPU with AMX/AVX512-BF16 --, fp16 on other CUDA GPUs, else fp32), "
    "bf16, fp16 (CUDA only) or fp32"
)


def add_precision_flag(parser: Any) -> None:
    """`--precision` of the commands that generate (serve, eval), resolved by
    `simtune.training.model.resolve_precision(..., inference=True)`."""
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help=PRECISION_HELP
    )


def add_listen_flags(parser: Any, *, default_port: int, key_env: str) -> None:
    """--host, --port and --api-key of a server command: loopback unless told otherwise,
    a key only when given (flag or `key_env`)."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, loopback only; anything else "
        "logs a warning, use --api-key then)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=default_port,
        help=f"port to listen on (default: {default_port}; 0 picks a free one)",
    )
    parser.add_argument(
        "--api-key",
        "--api_key",
        dest="api_key",
        metavar="KEY",
        default=os.environ.get(key_env),
        help="require this key from clients (Authorization: Bearer KEY), else 401 "
        f"(default: ${key_env}; none)",
    )
