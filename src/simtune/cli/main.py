"""Command line: parse, call the API, print. No logic of its own.

Flags for `simtune train` are generated from `TuningConfig` (help text = field
docstrings), each as `--snake_case` and `--kebab-case`. Only flags given on the command
line override the YAML file of `--config`. Errors the user can fix print one line and
exit 2; nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from simtune.config import TuningConfig, add_cli_args, add_config_args, resolve_workspace

EXIT_USAGE = 2
EXIT_FAILED = 1


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit code 2), and takes no
    abbreviated flags: `--learning_rat 1` must be an error, not a learning rate of 1
    (YAML keys are matched exactly too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag group per args class `TuningConfig` is made of, in field order."""
    add_config_args(p, TuningConfig)


def build_parser() -> Parser:
    p = Parser(
        prog="simtune",
        description="Fine-tune the LLM behind agent simulations on the decisions its agents made.",
        epilog="Run `simtune COMMAND --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    from simtune.config.commands import (
        JsonListArgs,
        ModelIdArgs,
        ModelsDeleteArgs,
        ModelsPromoteArgs,
        ResultJsonArgs,
        TinyModelArgs,
        TrainFileArgs,
        UiArgs,
        WorkspaceArgs,
    )

    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    t = sub.add_parser(
        "train",
        help="train a LoRA adapter (SFT, PPO or a reward model) on decision logs, track and register it",
        description="Train a LoRA adapter on decision logs; the run is logged to MLflow "
        "and the model registered. Flags accept snake_case and kebab-case.",
    )
    add_cli_args(t, TrainFileArgs)
    _add_config_flags(t)
    add_cli_args(t, ResultJsonArgs)

    m = sub.add_parser(
        "models",
        help="list, show or delete models in the local registry; move an MLflow alias",
    )
    add_cli_args(m, WorkspaceArgs)
    msub = m.add_subparsers(
        dest="models_command", metavar="ACTION", parser_class=Parser, required=True
    )
    add_cli_args(msub.add_parser("list", help="list registered models"), JsonListArgs)
    add_cli_args(
        msub.add_parser("show", help="show one model's registry entry and simtune.json"),
        ModelIdArgs,
    )
    add_cli_args(
        msub.add_parser("delete", help="remove a model's registry entry and its directory"),
        ModelsDeleteArgs,
    )
    add_cli_args(
        msub.add_parser(
            "promote",
            help="point an MLflow alias (e.g. champion) at a registered model version",
            description="Point alias ALIAS of registered MLflow model NAME at VERSION "
            "(set or move it). Serve it with `simtune serve --model NAME@ALIAS`.",
        ),
        ModelsPromoteArgs,
    )

    add_cli_args(sub.add_parser("ui", help="open the MLflow UI on the workspace's store"), UiArgs)
    add_cli_args(
        sub.add_parser(
            "make-tiny-model", help="write a tiny random model + tokenizer for smoke tests"
        ),
        TinyModelArgs,
    )

    from simtune.cli import collect, data, demo, evaluate, serve, sims, sync

    for group in (collect, data, sims, serve, evaluate, demo, sync):
        group.register(sub)
    return p


def _version() -> str:
    from simtune import __version__

    return f"simtune {__version__}"


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    sys.stderr.write(f"simtune: error: {message}\n")
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.debug:
        import warnings

        # Library deprecation chatter (transformers/TRL renames, MLflow's type-hint
        # advice) says nothing a simtune user can act on.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
    from simtune.errors import SimtuneError

    # A job stopped by SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C: the MLflow run
    # is marked KILLED and the staging directory removed, instead of dying mid-write.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except SimtuneError as exc:
        fail(str(exc), getattr(exc, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:
        if args.debug:
            raise
        fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_FAILED)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_train(args: argparse.Namespace) -> int:
    from simtune.training.run import run_tuning

    options = {
        k: v for k, v in vars(args).items() if k not in ("command", "config", "json", "debug")
    }
    if args.json:
        # Libraries print progress to stdout (MLflow's "View run" line among them);
        # keep stdout for the JSON alone.
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):
            result = run_tuning(args.config, **options)
    else:
        result = run_tuning(args.config, **options)
    from simtune.training.launch import is_worker

    if is_worker():
        return 0  # one of several training processes: the launching one reports
    if result is None:
        return 0  # a node other than the master of a multi-node job
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    else:
        _print_result(result)
    return 0


def _result_figures(metrics: dict[str, float]) -> list[tuple[str, str]]:
    """The final figures worth a line: PPO's score and KL (it has no train loss), else the
    train loss of SFT and reward models."""
    if "score_mean_first" in metrics:
        return [
            (
                "PPO score mean",
                f"{metrics['score_mean_first']:.4f} (first step) -> "
                f"{metrics['score_mean_last']:.4f} (last step)",
            ),
            ("PPO KL to reference", f"{metrics['kl_last']:.4f} (last step, per answer)"),
        ]
    if "train_loss" in metrics:
        return [("final train loss", f"{metrics['train_loss']:.4f}")]
    return []


def _print_result(result: Any, workspace: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    synced = getattr(result, "synced", True)
    title = "model trained, tracked and registered"
    if not synced:
        title = "model trained and saved locally; NOT yet in MLflow (server unreachable)"
    table = Table(title=f"simtune: {title}", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("model id", result.model_id)
    table.add_row("adapter", result.adapter_path)
    for label, value in _result_figures(result.metrics):
        table.add_row(label, value)
    table.add_row("MLflow run", f"{result.run_id}  ({result.tracking_uri})")
    if synced:
        table.add_row(
            "registered model",
            f"{result.registered_model_name} v{result.registered_model_version}"
            f"  (load: mlflow.pyfunc.load_model('{result.model_uri}'))",
        )
    else:
        table.add_row(
            "registered model",
            f"{result.registered_model_name}: pending; when the server is back run "
            "`simtune sync`"
            + (f" --workspace {workspace}" if workspace else "")
            + " (see the warning above)",
        )
    ui = "simtune ui" + (f" --workspace {workspace}" if workspace else "")
    if result.tracking_uri.startswith("http"):
        ui = f"open {result.tracking_uri}"
    table.add_row("MLflow UI", ui)
    Console().print(table)


def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from simtune.tracking.registry import Registry
    from simtune.training.publication import recover_workspace

    ws = resolve_workspace(args.workspace)
    recover_workspace(ws)  # list what is published, not what a killed job half-left
    reg = Registry(ws)
    console = Console()
    if args.models_command == "promote":
        return _promote(args, ws, console)
    if args.models_command == "list":
        entries = reg.list()
        if entries:
            from simtune.tracking.aliases import entry_aliases

            aliases = entry_aliases(entries, ws)
            for e in entries:
                if e["model_id"] in aliases:
                    e["mlflow_aliases"] = aliases[e["model_id"]]
        if args.json:
            sys.stdout.write(json.dumps(entries, indent=2) + "\n")
            return 0
        if not entries:
            console.print(f"no models registered in {reg.path}")
            return 0
        table = Table(
            "model id", "mode", "base model", "train loss", "MLflow model", "aliases", "created"
        )
        for e in entries:
            ml = e.get("mlflow", {})
            loss = e.get("metrics", {}).get("train_loss")
            table.add_row(
                e["model_id"],
                e.get("tuning_mode", ""),
                Path(e.get("base_model", "")).name,
                "" if loss is None else f"{loss:.4f}",
                f"{ml.get('registered_model_name', '')}/{ml.get('registered_model_version', '')}"
                if ml.get("synced", True)
                else "not yet synced (simtune sync)",
                ", ".join(e.get("mlflow_aliases", [])),
                e.get("created_at", "")[:19],
            )
        console.print(table)
    elif args.models_command == "show":
        from simtune.tracking.aliases import entry_aliases

        entry = reg.get(args.model_id)
        aliases = entry_aliases([entry], ws)
        if args.model_id in aliases:
            entry["mlflow_aliases"] = aliases[args.model_id]
        meta_path = Path(entry["path"]) / "simtune.json"
        out = {
            "registry": entry,
            "simtune.json": json.loads(meta_path.read_text()) if meta_path.is_file() else None,
        }
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    else:
        entry = reg.delete(args.model_id, remove_files=not args.keep_files)
        console.print(
            f"deleted {entry['model_id']}"
            + ("" if args.keep_files else f" and {entry['path']}")
            + " (its MLflow run and registered version are kept)"
        )
    return 0


def _promote(args: argparse.Namespace, ws: Path, console: Any) -> int:
    from simtune.config.cli_args import namespace_to
    from simtune.config.commands import ModelsPromoteArgs
    from simtune.tracking.aliases import promote

    opts = namespace_to(ModelsPromoteArgs, args)
    done = promote(
        opts.name, opts.version, opts.alias, tracking_uri=opts.tracking_uri, workspace=ws
    )
    if opts.json:
        sys.stdout.write(json.dumps(done, indent=2) + "\n")
        return 0
    moved = (
        f" (was version {done['previous_version']})"
        if done["previous_version"] and done["previous_version"] != done["version"]
        else ""
    )
    mode = f", {done['tuning_mode']}" if done["tuning_mode"] else ""
    console.print(
        f"{done['name']}@{done['alias']} -> version {done['version']}{mode}{moved}; serve it "
        f"with `simtune serve --model {done['name']}@{done['alias']}`"
    )
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    ws = resolve_workspace(args.workspace)
    from simtune.tracking.tracker import embedded_uri

    store = args.tracking_uri or embedded_uri(ws)
    url = f"http://{args.host}:{args.port}"
    sys.stderr.write(f"MLflow UI for {store} at {url} (Ctrl-C to stop)\n")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        store,
        "--default-artifact-root",
        (ws / "mlruns").as_uri(),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
    ]
    import subprocess

    env = dict(os.environ)
    # MLflow's job runner (a tree of huey consumers for its GenAI features) costs seconds
    # of start-up and ignores the server's shutdown; simtune's UI does not need it.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Its own process group, so that stopping `simtune ui` (Ctrl-C, SIGTERM: both arrive
    # here as KeyboardInterrupt) takes the whole server tree down, workers included.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop_group(proc)
        return 0


def _stop_group(proc: Any, grace: float = 15.0) -> None:
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            # The leader may exit before its workers: sweep the group once more.
            os.killpg(proc.pid, signal.SIGKILL)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from simtune.training.tiny import make_tiny_model

    out = make_tiny_model(args.dir)
    sys.stdout.write(f"wrote a tiny random model and tokenizer to {out}\n")
    return 0


COMMANDS = {
    "train": cmd_train,
    "models": cmd_models,
    "ui": cmd_ui,
    "make-tiny-model": cmd_make_tiny_model,
}


if __name__ == "__main__":
    raise SystemExit(main())
