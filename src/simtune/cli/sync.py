"""`simtune sync`: send what an MLflow outage left in `<workspace>/outbox/` to MLflow.

Parsing and printing only; the work is `simtune.tracking.outbox.sync_outbox` (imported when
the command runs, so `simtune --help` stays fast).

Exit codes: 0 everything synced (or nothing to sync); 2 a tracking server does not
answer (one line; that record and the ones after it are untouched, earlier ones are
synced); 1 a record failed for another reason (the others are still synced; the
failed one stays in the outbox with its progress).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from simtune.config import add_cli_args
from simtune.config.commands import SyncArgs

DESCRIPTION = """\
When the MLflow server goes away during `simtune train`, training finishes anyway: the
model is published locally (models/<model_id>/, models/registry.json marked
"synced": false) and what MLflow is still owed (metrics, artifacts, the model
registration, the run's final status) is kept in <workspace>/outbox/<model_id>.json.
This command sends it once the server is back: it reopens the job's run (or creates a
new one when the run is not on that server), logs the metrics, registers the model,
uploads the adapter, ends the run and marks the registry entry synced. Safe to rerun:
an interrupted sync resumes where it stopped and never registers a model twice.

exit codes: 0 synced or nothing to sync; 1 a record failed (kept for a rerun);
2 the tracking server does not answer (the outbox is left as it is)."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sync",
        help="send models and metrics kept locally during an MLflow outage to MLflow",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cli_args(p, SyncArgs)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from simtune.config import resolve_workspace
    from simtune.tracking.outbox import sync_outbox
    from simtune.training.publication import recover_workspace

    ws = resolve_workspace(args.workspace)
    recover_workspace(ws)
    results = sync_outbox(ws, args.tracking_uri)
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    elif not results:
        sys.stdout.write(f"nothing to sync in {ws / 'outbox'}\n")
    for r in results if not args.json else []:
        if r["status"] == "synced":
            model = (
                f"; registered {r['registered_model_name']} v{r['registered_model_version']}"
                if r["registered_model_version"]
                else ""
            )
            sys.stdout.write(
                f"synced {r['model_id']}: run {r['run_id']} {r['run_status']}{model}\n"
            )
        elif r["status"] == "locked":
            sys.stdout.write(f"skipped {r['model_id']}: another `simtune sync` is sending it\n")
        else:
            sys.stdout.write(f"FAILED {r['model_id']}: {r['error']} (kept; rerun to retry)\n")
    return 1 if any(r["status"] == "failed" for r in results) else 0
