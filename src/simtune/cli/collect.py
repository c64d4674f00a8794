"""`simtune collect ...`: capture decisions from a running simulation.

``simtune collect proxy`` runs the recording proxy (`simtune.collect.proxy`): an
OpenAI-compatible server the simulation uses as its model endpoint, which forwards to
the real model server and records every exchange. Nothing heavy is imported until the
command runs.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from simtune.cli.common import add_listen_flags, add_workspace_flag

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

# Copies of simtune.collect.proxy.DEFAULT_PORT and simtune.decisions.writer's
# FSYNC_POLICIES / CREDIT_RULES: importing those modules here would add ~40 ms to every
# `simtune --help` (tests/test_proxy.py checks the copies still match).
DEFAULT_PORT = 8100
FSYNC_POLICIES = ("none", "always", "close")
CREDIT_RULES = ("uniform", "last", "discounted")

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
    p.add_argument(
        "--upstream",
        required=True,
        metavar="URL",
        help="base URL of the OpenAI-compatible model server to forward to, e.g. "
        "http://127.0.0.1:8000/v1 (vLLM); '/v1' is added when the URL has no path",
    )
    p.add_argument(
        "--env",
        required=True,
        metavar="NAME",
        help="simulation (env) name: decisions go to <workspace>/envs/NAME/datasets/",
    )
    add_listen_flags(p, default_port=DEFAULT_PORT, key_env="SIMTUNE_PROXY_API_KEY")
    p.add_argument(
        "--upstream-api-key",
        "--upstream_api_key",
        dest="upstream_api_key",
        metavar="KEY",
        default=os.environ.get("SIMTUNE_UPSTREAM_API_KEY"),
        help="key sent to the upstream (default: $SIMTUNE_UPSTREAM_API_KEY; without one "
        "the client's Authorization header is forwarded, unless it is --api-key)",
    )
    add_workspace_flag(p)
    p.add_argument(
        "--run-id",
        "--run_id",
        dest="run_id",
        help="run id of calls that name none by header or path (default: a fresh "
        "run-<utc>-<hex> per proxy start)",
    )
    p.add_argument(
        "--fsync",
        choices=FSYNC_POLICIES,
        default="none",
        help="none: a record survives the proxy being killed (default); always: also a "
        "power cut (one disk flush per record); close: flush when the proxy stops",
    )
    p.add_argument(
        "--credit",
        choices=CREDIT_RULES,
        default="uniform",
        help="how an episode reward is spread over the episode's decisions: uniform "
        "(R/n each, default), last (all to the last one), discounted (gamma^(n-1-i) R)",
    )
    p.add_argument(
        "--gamma",
        type=float,
        default=0.9,
        help="discount for --credit discounted (default: 0.9)",
    )
    p.add_argument(
        "--max-body-mb",
        "--max_body_mb",
        dest="max_body_mb",
        type=float,
        default=16.0,
        help="largest request body accepted, in MiB; larger ones get 413 (default: 16)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds the upstream may stay silent before the call fails with 504 "
        "(default: 600; no limit on a whole generation or stream)",
    )
    p.add_argument(
        "--skip-calls",
        "--skip_calls",
        dest="skip_calls",
        action="append",
        default=[],
        metavar="[WHERE=]REGEX",
        help="do not record calls matching REGEX (WHERE: system, prompt (default) or "
        "output); repeatable. E.g. a simulation's planning or memory calls",
    )
    p.add_argument(
        "--label-calls",
        "--label_calls",
        dest="label_calls",
        action="append",
        default=[],
        metavar="NAME=[WHERE=]REGEX",
        help="set metadata.call=NAME on recorded calls matching REGEX; repeatable",
    )
    p.add_argument(
        "--require-output",
        "--require_output",
        dest="require_output",
        metavar="REGEX",
        help="record only answers matching REGEX (YuLan-OneSim's decisions: '```json')",
    )
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
