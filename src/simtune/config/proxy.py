"""`simtune collect proxy`: the recording proxy's upstream, log and call rules.

The single source of the proxy defaults (port, fsync policies, credit rules):
`simtune.collect.proxy` should import DEFAULT_PORT from here, and
`simtune.decisions.writer` does import FSYNC_POLICIES and CREDIT_RULES.
"""

from __future__ import annotations

from dataclasses import dataclass

from simtune.config.common import ListenArgs, workspace_arg
from simtune.config.fields import arg

DEFAULT_PORT = 8100
FSYNC_POLICIES = ("none", "always", "close")
CREDIT_RULES = ("uniform", "last", "discounted")
KEY_ENV = "SIMTUNE_PROXY_API_KEY"
UPSTREAM_KEY_ENV = "SIMTUNE_UPSTREAM_API_KEY"


@dataclass
class ProxyTarget:
    """What the proxy forwards to and records for (its first flags)."""

    upstream: str | None = arg(None, required=True, metavar="URL")
    """base URL of the OpenAI-compatible model server to forward to, e.g.
    http://127.0.0.1:8000/v1 (vLLM); '/v1' is added when the URL has no path"""

    env: str | None = arg(None, required=True, metavar="NAME")
    """simulation (env) name: decisions go to <workspace>/envs/NAME/datasets/"""


@dataclass
class ProxyArgs(ListenArgs, ProxyTarget):
    """The options of `simtune collect proxy`."""

    port: int = DEFAULT_PORT

    api_key: str | None = arg(None, flag="--api-key", metavar="KEY", env=KEY_ENV)

    upstream_api_key: str | None = arg(
        None, flag="--upstream-api-key", metavar="KEY", env=UPSTREAM_KEY_ENV
    )
    """key sent to the upstream (default: ${env}; without one the client's
    Authorization header is forwarded, unless it is --api-key)"""

    workspace: str | None = workspace_arg()

    run_id: str | None = arg(None, flag="--run-id")
    """run id of calls that name none by header or path (default: a fresh
    run-<utc>-<hex> per proxy start)"""

    fsync: str = arg("none", choices=FSYNC_POLICIES)
    """none: a record survives the proxy being killed (default); always: also a power cut
    (one disk flush per record); close: flush when the proxy stops"""

    credit: str = arg("uniform", choices=CREDIT_RULES)
    """how an episode reward is spread over the episode's decisions: uniform (R/n each,
    default), last (all to the last one), discounted (gamma^(n-1-i) R)"""

    gamma: float = 0.9
    """discount for --credit discounted (default: 0.9)"""

    max_body_mb: float = arg(16.0, flag="--max-body-mb")
    """largest request body accepted, in MiB; larger ones get 413 (default: 16)"""

    timeout: float = 600.0
    """seconds the upstream may stay silent before the call fails with 504 (default: 600;
    no limit on a whole generation or stream)"""

    skip_calls: list[str] = arg([], flag="--skip-calls", action="append", metavar="[WHERE=]REGEX")
    """do not record calls matching REGEX (WHERE: system, prompt (default) or output);
    repeatable. E.g. a simulation's planning or memory calls"""

    label_calls: list[str] = arg(
        [], flag="--label-calls", action="append", metavar="NAME=[WHERE=]REGEX"
    )
    """set metadata.call=NAME on recorded calls matching REGEX; repeatable"""

    require_output: str | None = arg(None, flag="--require-output", metavar="REGEX")
    """record only answers matching REGEX (YuLan-OneSim's decisions: '```json')"""
