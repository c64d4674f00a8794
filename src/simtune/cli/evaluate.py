"""`simtune eval`: compare models side by side on held-out decisions or in a simulation.

Parsing only; the work is `simtune.evaluation.evaluate`, imported when the command runs
(nothing heavy at import time: `simtune --help` must stay fast).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from simtune.config import add_cli_args
from simtune.config.commands import EvalArgs

DESCRIPTION = """\
Generate answers with each --model and compare them in one table.

With --dataset_path (held-out decisions, e.g. from `simtune data split`): exact match
and JSON validity against the logged answers, answer length, and the mean reward of a
--reward_fn or --judge_url when given. With --sim: play the simulation with each model
(served on loopback) on the same seeded episodes; mean reward per decision, invalid
answers and per-agent-type means. Sim episodes are recorded under envs/<sim>-eval/,
apart from training data.

Each model gets an MLflow evaluation run (eval-<model>-<time>, tag simtune.kind=
evaluation) in its training run's experiment, nested under that run."""

EPILOG = """\
examples:
  simtune eval --model sft-tiny-20250101-120000-ab12cd --model base \\
      --dataset_path heldout.jsonl --reward_fn rewards.py:score
  simtune eval --model llm_tuning/2 --model llm_tuning@champion --model base \\
      --sim job_market --episodes 5 --seed 1000"""

# Shown as rates / signed rewards / counts in the table.
_RATES = ("exact_match", "json_valid", "truncated", "invalid_rate", "expert_agreement")
_COUNTS = ("num_samples", "json_records", "decisions", "invalid")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="compare models (tuned adapters vs base) on held-out decisions or in a simulation",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cli_args(p, EvalArgs)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from simtune.evaluation import evaluate

    options: dict[str, Any] = dict(
        dataset_path=args.dataset_path,
        sim=args.sim,
        episodes=args.episodes,
        seed=args.seed,
        steps=args.steps,
        reward_fn=args.reward_fn,
        judge_url=args.judge_url,
        judge_model=args.judge_model,
        max_samples=args.max_samples,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        system_prompt=args.system_prompt,
        workspace=args.workspace,
        tracking_uri=args.tracking_uri,
        experiment_name=args.experiment_name,
        log_to_mlflow=not args.no_mlflow,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        trust_remote_code=args.trust_remote_code,
    )
    if args.json:
        # Libraries print to stdout (MLflow's "View run" line); keep it for the JSON.
        with contextlib.redirect_stdout(sys.stderr):
            report = evaluate(args.models, **options)
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        return 0
    report = _with_progress(evaluate, args.models, options)
    _print(report)
    return 0


def _with_progress(evaluate: Any, models: list[str], options: dict[str, Any]) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    unit = "episodes" if options.get("sim") else "decisions"
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    # Started only once every input check has passed, so a one-line error stays one line.
    bar = Progress(*columns, console=Console(stderr=True))
    tasks: dict[str, Any] = {}

    def on_stage(text: str) -> None:
        if not bar.live.is_started:
            bar.start()
        tasks["_stage"] = bar.add_task(text, total=None)

    def progress(name: str, done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        stage = tasks.pop("_stage", None)
        if stage is not None:
            bar.remove_task(stage)
        if name not in tasks:
            tasks[name] = bar.add_task(f"eval {name}", total=total)
        bar.update(tasks[name], completed=done, total=total)

    try:
        return evaluate(models, progress=progress, on_stage=on_stage, **options)
    finally:
        bar.stop()


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    leaf = key.split("/")[0]
    if leaf in _RATES:
        return f"{value:.1%}"
    if leaf in _COUNTS:
        return str(int(value))
    if "reward" in leaf or "return" in leaf:
        return f"{value:+.3f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _print(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    if report.mode == "sim":
        inp = report.inputs
        title = f"simtune eval: {inp['sim']}, {inp['episodes']} episode(s) from seed {inp['seed']}"
    else:
        files = report.inputs.get("dataset_files", [])
        shown = files[0] if len(files) == 1 else f"{len(files)} files"
        title = f"simtune eval: {report.inputs.get('num_samples')} held-out decisions ({shown})"
    caption = f"reward: {report.reward_source}" if report.reward_source else None
    table = Table(title=title, caption=caption)
    table.add_column("metric", style="bold", no_wrap=True)
    for name in report.models:
        # Long model ids fold in the header; the numbers themselves never wrap.
        table.add_column(name, justify="right", overflow="fold", min_width=7)
    keys: list[str] = []
    for name in report.models:
        keys += [k for k in report.metrics[name] if k not in keys and k != "json_records"]
    if report.mode == "dataset" and "mean_reward" in keys:
        keys.insert(0, keys.pop(keys.index("mean_reward")))  # the headline first
    json_refs = max((m.get("json_records") or 0) for m in report.metrics.values())
    for key in keys:
        label = f"json_valid ({json_refs} JSON refs)" if key == "json_valid" else key
        table.add_row(label, *(_fmt(key, report.metrics[n].get(key)) for n in report.models))
    console = Console()
    console.print(table)
    if report.runs:
        runs = ", ".join(f"{n}: {r}" for n, r in report.runs.items())
        console.print(f"MLflow evaluation runs ({report.tracking_uri}): {runs}", soft_wrap=True)
    if report.mode == "sim" and report.sims:
        first = next(iter(report.sims.values()))
        console.print(f"episodes recorded under {first.get('dataset_dir')}", soft_wrap=True)
