"""`simtune collect ...`: capture decisions from a running simulation.

``simtune collect proxy`` runs the recording proxy (`simtune.collect.proxy`): an
OpenAI-compatible server the simulation uses as its model endpoint, which forwards to
the real model server and records every exchange. Nothing heavy is imported until the
command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from simtune.config import add_cli_args
from simtune.config.proxy import ProxyArgs

PROXY_DESCRIPTION = """\
Serve an OpenAI-compatible endpoint (/v1/chat/completions, /v1/completions,
/v1/models; streaming included) that forwards every call to --upstream and records
each exchange as a decision in <workspace>/envs/<env>/datasets/decisions_*.jsonl.
Give the simulation the printed base URL instead of the model server's.

Attribution (agent id/type, step, run) comes from request headers
  X-Simtune-Agent-Id, X-Simtune-Agent-Type, X-Simtune-Step (integer), X-Simtune-Run-Id
or, for frameworks that only let you set a base URL, from a path prefix:
  http://HOST:PORT/agents/<agent_id>/v1
  http://HOST:PORT/runs/<run_id>/types/<agent_type>/agents/<agent_id>/v1

Each recorded answer carries its decision id (header X-Simtune-Decision-Id and JSON
field simtune_decision_id). Scores can be posted later:
  POST /v1/rewards {"decision_id": ID, "value": 1.0}
  POST /v1/rewards {"agent_id": "a1", "run_id": "r1", "value": 5.0}   (episode reward,
       spread over that agent's decisions in that run by --credit)
  POST /v1/ratings {"decision_id": ID, "rating": 4, "feedback": "...", "source": "human"}

Upstream errors are passed through unchanged and not recorded. Stop with Ctrl-C or
SIGTERM; the log is closed cleanly and every recorded decision is already on disk."""

PROXY_EPILOG = """\
example:
  simtune collect proxy --upstream http://127.0.0.1:8000/v1 --env market --port 8100
  # then, in the simulation:  OpenAI(base_url="http://127.0.0.1:8100/agents/alice/v1")"""


def register(sub: Any) -> None:
    c = sub.add_parser(
        "collect",
        help="capture decisions from a running simulation (recording proxy)",
        description="Capture the decisions a simulation's agents make.",
    )
    csub = c.add_subparsers(dest="collect_command", metavar="ACTION", required=True)
    p = csub.add_parser(
        "proxy",
        help="run an OpenAI-compatible recording proxy in front of a model server",
        description=PROXY_DESCRIPTION,
        epilog=PROXY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The subparser class is inherited from the parent's parser_class (one-line errors).
    add_cli_args(p, ProxyArgs)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from simtune.collect.proxy import serve
    from simtune.collect.rules import CallRules

    rules = CallRules.parse(args.skip_calls, args.label_calls, args.require_output)
    if args.collect_command == "proxy":
        serve(
            args.upstream,
            args.env,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            upstream_api_key=args.upstream_api_key,
            workspace=args.workspace,
            run_id=args.run_id,
            fsync=args.fsync,
            credit=args.credit,
            gamma=args.gamma,
            max_body_mb=args.max_body_mb,
            timeout=args.timeout,
            rules=rules,
        )
    return 0
