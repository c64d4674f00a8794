"""`simtune sims list|run`: run the example simulations with decision collection on.

Nothing heavy is imported here: the handler imports `simtune.sims` when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from simtune.cli.common import add_workspace_flag, positive_int

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

    ls = ssub.add_parser("list", help="list the simulations")
    ls.add_argument("--json", action="store_true", help="print JSON")

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
    r.add_argument("name", metavar="NAME", help="simulation (see `simtune sims list`)")
    who = r.add_argument_group("policy (exactly one)").add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--model-url",
        "--model_url",
        dest="model_url",
        metavar="URL",
        help="agents ask this OpenAI-compatible endpoint (e.g. `simtune serve`, vLLM)",
    )
    who.add_argument(
        "--expert",
        action="store_true",
        help="the simulation's rule-based expert (not an LLM; bootstraps demonstrations)",
    )
    who.add_argument("--random", action="store_true", help="random valid answers (a baseline)")
    llm = r.add_argument_group("model endpoint options (with --model-url)")
    llm.add_argument("--model", help="model name to request (default: the first one listed)")
    llm.add_argument(
        "--api-key",
        "--api_key",
        dest="api_key",
        help=f"bearer token (default: ${KEY_ENV[0]}, else ${KEY_ENV[1]})",
    )
    llm.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default: 0)"
    )
    llm.add_argument(
        "--concurrency",
        type=positive_int,
        default=4,
        help="simultaneous requests for agents deciding at once (default: 4)",
    )
    r.add_argument(
        "--episodes", type=positive_int, default=5, metavar="N", help="episodes (default: 5)"
    )
    r.add_argument(
        "--steps",
        type=positive_int,
        metavar="S",
        help="steps per episode (default: the simulation's)",
    )
    r.add_argument("--seed", type=int, default=0, help="environment seed (default: 0)")
    r.add_argument(
        "--env",
        "--env-name",
        "--env_name",
        dest="env_name",
        metavar="NAME",
        help="env name, i.e. the folder envs/<env>/datasets (default: the simulation's name)",
    )
    add_workspace_flag(r)
    r.add_argument("--run-id", "--run_id", dest="run_id", help="run id (default: a fresh one)")
    r.add_argument(
        "--credit",
        choices=("uniform", "last", "discounted"),
        default="uniform",
        help="how an episode return is spread over the agent's decisions (default: uniform)",
    )
    r.add_argument("--json", action="store_true", help="print the result as JSON")


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
