"""`simtune sims list|run`: run the example simulations with decision collection on.

Nothing heavy is imported here: the handler imports `simtune.sims` when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from simtune.config import add_cli_args
from simtune.config.commands import JsonListArgs, SimsRunArgs

KEY_ENV = ("SIMTUNE_API_KEY", "OPENAI_API_KEY")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sims",
        help="run an example simulation (job market) and collect its agents' decisions",
        description="Example multi-agent simulations whose agents decide through an LLM "
        "(or a rule-based expert that bootstraps demonstrations). Runs record every "
        "decision with its reward under envs/<env>/datasets/, ready for `simtune train`.",
    )
    p.set_defaults(handler=run)
    ssub = p.add_subparsers(dest="sims_command", metavar="ACTION", required=True)

    add_cli_args(ssub.add_parser("list", help="list the simulations"), JsonListArgs)

    r = ssub.add_parser(
        "run",
        help="run a simulation with collection on",
        description="Run simulation NAME for --episodes episodes; each agent decision "
        "(chat prompt -> JSON answer) is recorded with its reward, and episode returns are "
        "spread over each agent's decisions. Invalid answers are penalised (-1), never fatal.",
        epilog="examples:\n"
        "  simtune sims run job_market --expert --episodes 20      # demonstrations for SFT\n"
        "  simtune sims run job_market --model-url http://127.0.0.1:8000/v1 --episodes 5\n"
        "  simtune train --tuning_mode sft --llm_path MODEL "
        "--dataset_path envs/job_market/datasets",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cli_args(r, SimsRunArgs)


def run(args: argparse.Namespace) -> int:
    if args.sims_command == "list":
        return _list(args)
    return _run(args)


def _list(args: argparse.Namespace) -> int:
    from simtune.sims import list_simulations

    sims = list_simulations()
    if args.json:
        sys.stdout.write(json.dumps(sims, indent=2) + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "agent types", "decisions", "steps", "description")
    for s in sims:
        table.add_row(
            str(s["name"]),
            ", ".join(s["agent_types"]),  # type: ignore[arg-type]
            ", ".join(s["decision_kinds"]),  # type: ignore[arg-type]
            str(s["default_steps"]),
            str(s["description"]),
        )
    Console().print(table)
    return 0


def _run(args: argparse.Namespace) -> int:
    from simtune.errors import ConfigError
    from simtune.sims import LLMPolicy, get_simulation, run_simulation

    get_simulation(args.name)  # an unknown name fails before anything else
    if not args.model_url and (args.model or args.api_key):
        raise ConfigError("--model and --api-key need --model-url")
    if args.model_url:
        key = args.api_key or next((os.environ[k] for k in KEY_ENV if os.environ.get(k)), None)
        policy: Any = LLMPolicy(
            args.model_url,
            args.model,
            key,
            temperature=args.temperature,
            concurrency=args.concurrency,
        )
    else:
        policy = "expert" if args.expert else "random"

    from rich.console import Console

    console = Console(stderr=True)
    options = dict(
        episodes=args.episodes,
        steps=args.steps,
        seed=args.seed,
        env_name=args.env_name,
        workspace=args.workspace,
        run_id=args.run_id,
        credit=args.credit,
    )
    if args.json:
        result = run_simulation(args.name, policy, **options)
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return 0
    with console.status(f"running {args.name}...") as status:

        def progress(episode: int, total: int) -> None:
            status.update(f"running {args.name}: episode {episode}/{total}")

        result = run_simulation(args.name, policy, progress=progress, **options)
    _print(result)
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _print(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"simtune sims: {result.sim} collected", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("env / run", f"{result.env_name} / {result.run_id}")
    table.add_row("policy", result.policy)
    table.add_row("episodes x steps", f"{result.episodes} x {result.steps} (seed {result.seed})")
    share = result.invalid / result.decisions if result.decisions else 0.0
    table.add_row("decisions", f"{result.decisions} ({result.invalid} invalid, {share:.0%})")
    table.add_row(
        "mean reward / decision",
        f"{_fmt(result.mean_reward)} (immediate only {_fmt(result.mean_immediate_reward)})",
    )
    for kind, s in result.by_agent_type.items():
        ret = result.mean_episode_return.get(kind)
        table.add_row(
            f"  {kind}",
            f"{_fmt(s['mean_reward'])} over {s['decisions']} decisions"
            + ("" if ret is None else f"; mean episode return {_fmt(ret)}"),
        )
    if result.expert_agreement is not None:
        table.add_row("agrees with expert", f"{result.expert_agreement:.0%}")
    table.add_row("written", result.path or "(nothing)")
    table.add_row(
        "train on it",
        f"simtune train --tuning_mode sft --llm_path MODEL --dataset_path {result.dataset_dir}",
    )
    Console().print(table)
