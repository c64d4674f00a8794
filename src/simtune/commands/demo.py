"""`simtune demo` (and, later, `simtune loop`): the whole cycle on a tiny model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    d = sub.add_parser(
        "demo", help="make a tiny model and fine-tune it on the bundled sample decisions"
    )
    d.add_argument(
        "--workspace",
        default="demo-workspace",
        help="workspace to create (default: ./demo-workspace)",
    )
    d.add_argument(
        "--num_train_epochs",
        "--num-train-epochs",
        type=float,
        default=5.0,
        help="epochs over the 48 bundled decisions (default: 5)",
    )
    d.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from simtune.api import run_tuning
    from simtune.cli import _print_result
    from simtune.demo import prepare_demo

    console = Console()
    ws = Path(args.workspace).resolve()
    with console.status("building a tiny model and the sample dataset..."):
        model_dir, data = prepare_demo(ws)
    console.print(f"[bold]tiny model[/] {model_dir}\n[bold]sample decisions[/] {data}")
    result = run_tuning(
        llm_path=str(model_dir),
        dataset_path=[str(data)],
        workspace=str(ws),
        experiment_name="simtune-demo",
        num_train_epochs=args.num_train_epochs,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        warmup_ratio=0.0,
        tracking_uri=f"sqlite:///{ws / 'mlflow.db'}",
    )
    _print_result(result, str(ws))
    return 0
