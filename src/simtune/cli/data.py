"""`simtune data ...`: look at, check, rate, export and split decision datasets.

Every action reads dataset paths (files or folders, like ``--dataset_path``) and/or
``--env NAME`` (= ``<workspace>/envs/NAME/datasets``). None of them rewrites what was
collected: ``rate`` appends event lines to a new log file, ``export`` and ``split``
write new files atomically. Bad input prints one line naming file:line and field and
exits 2 (``validate`` prints every problem instead of the first).

``stats``, ``validate``, ``export`` and ``split`` stream (see `reader.scan_dataset`):
memory does not grow with the number of records, and on a terminal a progress bar of
bytes read goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from simtune.config import FILTERS, DataArgs, add_cli_args, namespace_to
from simtune.config.datasets import (
    DataInputs,
    ExportArgs,
    ImportTracesArgs,
    MirrorTracesArgs,
    RateArgs,
    SplitArgs,
    StatsArgs,
    ValidateArgs,
)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """Look at, check, rate, export and split decision datasets.

Dataset paths are files or folders (folders are searched for decisions_*.json and
decisions_*.jsonl); --env NAME adds <workspace>/envs/NAME/datasets. Collected files are
never rewritten: `rate` appends rating events to a new log file in the dataset folder,
`export` and `split` write new files atomically."""


FILTERS_GROUP = "filters (as in `simtune train`)"


def _add_filters(p: argparse.ArgumentParser) -> None:
    """The training filters, declared once (`DataArgs`): the same flags as `simtune train`."""
    add_cli_args(p, DataArgs, fields=FILTERS, title=FILTERS_GROUP)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "data",
        help="stats, validate, rate (LLM judge), export and split decision datasets",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    s = actions.add_parser(
        "stats",
        help="records per env and agent type: score coverage, means, lengths",
        description="Counts per env and agent type: records, how many carry a reward, a "
        "rating and an improved answer (feedback), mean reward and rating, mean prompt and "
        "output length in characters; events, orphan events and repeated ids in all. Copies "
        "of a repeated decision id are merged in file order (later non-null fields win, "
        "a human rating is never replaced by an LLM one).",
    )
    add_cli_args(s, DataInputs)
    add_cli_args(s, StatsArgs)
    s.set_defaults(handler=run_stats)

    v = actions.add_parser(
        "validate",
        help="list every problem as file:line: field: message",
        description="Read everything and print every problem, one per line, as "
        "`file:line: field 'x': message`: errors (unreadable lines and records) and "
        "warnings (events naming unknown decisions, repeated decision ids, a torn last "
        "line). A JSON-list file is checked up to its first structural error. Exit code: "
        "2 if there is any error, 0 otherwise (warnings alone pass).",
    )
    add_cli_args(v, DataInputs)
    add_cli_args(v, ValidateArgs)
    v.set_defaults(handler=run_validate)

    r = actions.add_parser(
        "rate",
        help="rate unrated decisions with an LLM judge (verify -> analyze -> refine)",
        description="Rate decisions with an LLM judge behind any OpenAI-compatible endpoint. "
        "verify: a score 1-5 with a reason; analyze: below --threshold the judge explains "
        "what is wrong (-> reason); refine: it writes an improved answer in the same format "
        "(-> feedback). One rating event (source llm) per decision is appended to a new "
        "decisions_<ts>_*.jsonl in the dataset folder as soon as it is done. Resumable: "
        "decisions that already have a rating are skipped, so rerunning after Ctrl-C, "
        "failures or unparsable answers rates only the rest. Human ratings are never "
        "overwritten, and human-rated decisions are never sent. Exit code: 0 when every "
        "selected decision was rated, 1 when some failed or were unparsable (rerun to "
        "retry them), 2 for bad input or an unreachable judge, 130 when interrupted.",
    )
    add_cli_args(r, DataInputs)
    add_cli_args(r, RateArgs)
    r.set_defaults(handler=run_rate)

    e = actions.add_parser(
        "export",
        help="merge files and events into one JSON list (seed format) or JSONL",
        description="Merge dataset files and their events into one file of folded records. "
        "--format seed: one JSON list in the seed simulator's export format (trail_id, "
        "human_rating / llm_rating by the rating's source, refined_output, "
        "low_quality_reason, ...); --format jsonl: one DESIGN.md record per line. Both are "
        "read back by simtune as the same decisions. The file is written atomically and "
        "an existing one is only replaced with --force.",
    )
    add_cli_args(e, DataInputs)
    add_cli_args(e, ExportArgs)
    _add_filters(e)
    e.set_defaults(handler=run_export)

    t = actions.add_parser(
        "split",
        help="deterministic train / held-out split by run or agent",
        description="Split folded records into DIR/train.jsonl and DIR/heldout.jsonl, "
        "keeping whole runs (--by run) or agents (--by agent) on one side. A group's side "
        "is fixed by hashing --seed, its env and its id, so reruns agree and adding data "
        "never moves an existing group; --held-out is the chance of each group landing "
        "there, not an exact share. An empty side is an error.",
    )
    add_cli_args(t, DataInputs)
    add_cli_args(t, SplitArgs)
    _add_filters(t)
    t.set_defaults(handler=run_split)

    i = actions.add_parser(
        "import-traces",
        help="MLflow traces (chat-model spans) and their feedback -> decision records",
        description="Read the traces of an MLflow experiment (e.g. made by "
        "mlflow.openai.autolog()), take each trace's first chat-model span (request "
        "messages, answer, model, times) and its feedback (mlflow.log_feedback) and append "
        "them as decisions to a new file in envs/NAME/datasets/. The trace id is the "
        "decision id: a rerun skips traces already imported. Feedback 'reward' becomes the "
        "reward and 'rating' the rating unless --feedback maps other names; numbers are "
        "kept, booleans are 1/0.",
    )
    add_cli_args(i, ImportTracesArgs)
    i.set_defaults(handler=run_import_traces)

    m = actions.add_parser(
        "mirror-traces",
        help="write one MLflow trace per recorded decision (reward/rating as feedback)",
        description="Opt-in: one MLflow trace per decision of envs/NAME/datasets/ not "
        "mirrored yet, tagged simtune.decision_id (and agent, step, run), its reward and "
        "rating logged as feedback, to browse decisions beside the training runs. The JSONL "
        "files stay the record; nothing in them changes.",
    )
    add_cli_args(m, MirrorTracesArgs)
    m.set_defaults(handler=run_mirror_traces)


# --- shared ----------------------------------------------------------------------------------


def dataset_paths(args: argparse.Namespace) -> list[str]:
    """The positional paths plus --env's datasets folder."""
    from simtune.errors import ConfigError

    paths = list(args.paths)
    if args.env:
        from simtune.config import resolve_workspace
        from simtune.decisions.writer import datasets_dir

        ws = resolve_workspace(args.workspace)
        paths.append(str(datasets_dir(ws, args.env)))
    if not paths:
        raise ConfigError("give dataset paths (files or folders) or --env NAME")
    return paths


def _dropped(dropped: dict[str, int]) -> str:
    parts = [f"{n} by --{k.replace('_', '-')}" for k, n in dropped.items() if n]
    return f" (dropped {', '.join(parts)})" if parts else ""


def _filters(args: argparse.Namespace) -> Any:
    """The training filters (as in `simtune train`, checked by the same `DataArgs`),
    applied one decision at a time."""
    from simtune.decisions.reader import Filters

    options = namespace_to(DataArgs, args)
    return Filters(**{name: getattr(options, name) for name in FILTERS})


@contextlib.contextmanager
def _progress(paths: list[str], what: str) -> Iterator[Callable[[int], None] | None]:
    """A bytes-read progress bar on stderr when it is a terminal (the streaming commands
    read each file twice: events first, then records); nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from simtune.decisions.reader import discover

    try:
        total = 2 * sum(p.stat().st_size for p in discover(paths))
    except Exception:  # a bad path: the command itself reports it, with its own words
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task(what, total=total)
    with progress:
        yield lambda n: progress.advance(task, n)


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")


# --- stats -----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_stats(args: argparse.Namespace) -> int:
    from simtune.decisions.curate import stream_stats

    paths = dataset_paths(args)
    with _progress(paths, "reading") as on_bytes:
        stats = stream_stats(paths, on_bytes=on_bytes)
    if args.json:
        _write(json.dumps(stats, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="decisions by env and agent type")
    for name in ("env", "agent type"):
        table.add_column(name)
    for name in (
        "records",
        "reward",
        "rating",
        "feedback",
        "mean reward",
        "mean rating",
        "prompt chars",
        "output chars",
    ):
        table.add_column(name, justify="right")

    def row(label: tuple[str, str], g: dict[str, Any], **style: Any) -> None:
        table.add_row(
            *label,
            str(g["records"]),
            f"{g['with_reward']} ({g['reward_pct']:.0f}%)",
            f"{g['with_rating']} ({g['rating_pct']:.0f}%)",
            f"{g['with_feedback']} ({g['feedback_pct']:.0f}%)",
            _num(g["mean_reward"]),
            _num(g["mean_rating"]),
            _num(g["mean_prompt_chars"], 0),
            _num(g["mean_output_chars"], 0),
            **style,
        )

    for g in stats["groups"]:
        row((g["env_name"] or "-", g["agent_type"] or "-"), g)
    if len(stats["groups"]) > 1:
        table.add_section()
        row(("all", ""), stats["total"], style="bold")
    # Piped output gets room for all columns instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    t = stats["total"]
    console.print(
        f"{stats['files']} file(s), {stats['runs']} run(s), {stats['agents']} agent(s); "
        f"ratings by human {t['rated_by_human']}, by LLM {t['rated_by_llm']}; "
        f"{stats['events']} event(s), {stats['orphan_events']} orphan event(s), "
        f"{stats['duplicate_ids']} repeated id(s) merged",
        highlight=False,
    )
    return 0


# --- validate --------------------------------------------------------------------------------


def run_validate(args: argparse.Namespace) -> int:
    from simtune.decisions.reader import Problem, scan_dataset

    paths = dataset_paths(args)
    problems: list[Problem] = []
    with _progress(paths, "validating") as on_bytes:
        # Streamed: only the problems are kept (see `scan_dataset` for what else is).
        scan = scan_dataset(paths, lambda _: None, problems=problems, on_bytes=on_bytes)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    summary = {
        "errors": len(errors),
        "warnings": len(warnings),
        "files": len(scan.files),
        "records": sum(f.records for f in scan.files),
        "events": sum(f.events for f in scan.files),
        "decisions": scan.decisions,
    }
    if args.json:
        _write(
            json.dumps(
                {
                    **summary,
                    "problems": [
                        {
                            "severity": p.severity,
                            "path": p.path,
                            "line": p.line,
                            "field": p.field,
                            "message": p.text,
                        }
                        for p in problems
                    ],
                },
                indent=2,
            )
        )
    else:
        for p in problems:
            _write(p.text if p.severity == "error" else f"{p.text} (warning)")
        verdict = "FAILED" if errors else "ok"
        _write(
            f"{verdict}: {len(errors)} error(s), {len(warnings)} warning(s); read "
            f"{summary['records']} record(s) and {summary['events']} event(s) from "
            f"{summary['files']} file(s)"
        )
    return EXIT_USAGE if errors else 0


# --- rate ------------------------------------------------------------------------------------


def run_rate(args: argparse.Namespace) -> int:
    from simtune.decisions.judge import RateInterrupted, rate_decisions

    progress = None
    task: Any = None
    if sys.stderr.isatty() and not args.json:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )

    def on_start(n: int) -> None:
        nonlocal task
        if progress is not None:
            progress.start()
            task = progress.add_task("rating", total=n)

    def on_done(outcome: str) -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    try:
        report = rate_decisions(
            dataset_paths(args),
            args.judge_url,
            args.judge_model,
            api_key=args.api_key,
            threshold=args.threshold,
            concurrency=args.concurrency,
            max_retries=args.max_retries,
            backoff=args.backoff,
            timeout=args.timeout,
            rerate=args.rerate,
            out_dir=args.out,
            limit=args.limit,
            agent_types=args.agent_types,
            max_tokens=args.max_tokens,
            on_start=on_start,
            on_done=on_done,
        )
    except RateInterrupted as exc:
        report = exc.report
    finally:
        if progress is not None:
            progress.stop()
    _print_rate(report, args.json)
    if report.interrupted:
        return EXIT_INTERRUPTED
    return 0 if report.complete else EXIT_FAILED


def _print_rate(report: Any, as_json: bool) -> None:
    if as_json:
        _write(json.dumps(report.to_dict(), indent=2))
        return
    mean = report.mean_score
    lines = [
        f"rated {report.rated} of {report.selected} selected decision(s) with "
        f"{report.judge_model}"
        + (
            f" (mean score {mean:.2f}, {report.refined} below threshold refined)"
            if mean is not None
            else ""
        ),
        f"skipped {report.skipped_rated + report.skipped_human} already rated "
        f"({report.skipped_human} by a human); unparsable {report.unparsable}; "
        f"failed {report.failed}; requests {report.calls}, retries {report.retries}",
    ]
    if report.events_path:
        lines.append(f"rating events: {report.events_path}")
    for error in report.errors:
        lines.append(f"  failed: {error}")
    if report.aborted:
        lines.append(f"stopped: {report.aborted}")
    if report.interrupted:
        lines.append(f"interrupted: {report.not_done} decision(s) not rated")
    todo = report.selected - report.rated
    if todo:
        lines.append(f"rerun the same command to rate the remaining {todo}")
    _write("\n".join(lines))


# --- export ----------------------------------------------------------------------------------


def run_export(args: argparse.Namespace) -> int:
    from simtune.decisions.curate import stream_export

    fmt = args.format or ("seed" if args.output.endswith(".json") else "jsonl")
    filters = _filters(args)
    paths = dataset_paths(args)
    with _progress(paths, "exporting") as on_bytes:
        path, scan = stream_export(
            paths, args.output, fmt, filters, force=args.force, on_bytes=on_bytes
        )
    _write(
        f"exported {filters.kept} of {scan.decisions} decision(s) "
        f"({fmt}) to {path}{_dropped(filters.dropped)}"
    )
    return 0


# --- split -----------------------------------------------------------------------------------


def run_split(args: argparse.Namespace) -> int:
    from simtune.decisions.curate import check_split, stream_split

    check_split(args.by, args.held_out)  # before reading: a bad flag needs no data
    filters = _filters(args)
    paths = dataset_paths(args)
    out = Path(args.out)
    with _progress(paths, "splitting") as on_bytes:
        split = stream_split(
            paths,
            out,
            filters,
            by=args.by,
            held_out=args.held_out,
            seed=args.seed,
            force=args.force,
            on_bytes=on_bytes,
        )
    n = split.train + split.heldout
    _write(
        f"train: {split.train} decision(s) from {split.train_groups} {args.by}(s) "
        f"-> {out / 'train.jsonl'}\n"
        f"held-out: {split.heldout} decision(s) from {split.heldout_groups} {args.by}(s) "
        f"({100 * split.heldout / n:.0f}%) -> {out / 'heldout.jsonl'}"
        + _dropped(filters.dropped)
        + (
            f"\n{split.keyless} decision(s) without a {args.by} id were grouped by file"
            if split.keyless
            else ""
        )
    )
    return 0


def run_import_traces(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from simtune.tracking.traces import import_traces

    opts = namespace_to(ImportTracesArgs, args)
    report = import_traces(
        experiment_name=opts.experiment_name,
        env=opts.env,
        workspace=opts.workspace,
        tracking_uri=opts.tracking_uri,
        run_id=opts.run_id,
        feedback=opts.feedback,
    )
    if opts.json:
        _write(json.dumps(asdict(report), indent=2) + "\n")
        return 0
    _write(
        f"imported {report.imported} trace(s) ({report.with_reward} with a reward, "
        f"{report.with_rating} with a rating)"
        + (f" into {report.path}" if report.path else "")
        + f"; skipped {report.already} already imported, {report.not_chat} without a chat "
        "span\n"
    )
    return 0


def run_mirror_traces(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from simtune.tracking.traces import mirror_traces

    opts = namespace_to(MirrorTracesArgs, args)
    report = mirror_traces(
        env=opts.env,
        experiment_name=opts.experiment_name,
        workspace=opts.workspace,
        tracking_uri=opts.tracking_uri,
    )
    if opts.json:
        _write(json.dumps(asdict(report), indent=2) + "\n")
        return 0
    _write(
        f"mirrored {report.mirrored} decision(s) as traces in experiment "
        f"{opts.experiment_name} ({report.experiment_id}); skipped {report.already} already "
        f"mirrored, {report.from_traces} imported from traces\n"
    )
    return 0
