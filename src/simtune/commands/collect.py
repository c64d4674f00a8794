"""`simtune collect ...` (placeholder; filled in by its owner)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("collect", help="(not yet implemented)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("simtune collect: not implemented yet")
