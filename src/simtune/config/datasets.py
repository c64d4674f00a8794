"""The options of `simtune data ...` (stats, validate, rate, export, split).

The training filters they share with `simtune train` (--min_rating, --min_reward,
--agent_types, --max_samples) are not here: they are `DataArgs`' fields (FILTERS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from simtune.config.common import workspace_arg
from simtune.config.fields import arg


@dataclass
class DataInputs:
    """Which decisions an action reads: paths and/or an env's datasets folder."""

    cli_group: ClassVar[str] = "input"

    paths: list[str] = arg([], positional=True, nargs="*", metavar="PATH")
    """dataset files or folders (decisions_*.json[l] inside folders, recursively)"""

    env: str | None = arg(None, metavar="NAME")
    """add <workspace>/envs/NAME/datasets"""

    workspace: str | None = workspace_arg()


@dataclass
class StatsArgs:
    json: bool = False
    """print JSON instead of a table"""


@dataclass
class ValidateArgs:
    json: bool = False
    """print problems and counts as JSON"""


JUDGE = "judge"
WHAT = "what to rate"


@dataclass
class RateArgs:
    """`simtune data rate`: the judge and what it rates."""

    judge_url: str | None = arg(None, flag="--judge-url", required=True, metavar="URL", group=JUDGE)
    """OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"""

    judge_model: str | None = arg(
        None, flag="--judge-model", required=True, metavar="NAME", group=JUDGE
    )
    """model name to ask"""

    api_key: str | None = arg(None, flag="--api-key", group=JUDGE)
    """API key (default: $SIMTUNE_JUDGE_API_KEY, else $OPENAI_API_KEY)"""

    threshold: float = arg(4, group=JUDGE)
    """scores below this get a reason and an improved answer (default: 4)"""

    concurrency: int = arg(4, group=JUDGE)
    """requests in flight at once (default: 4)"""

    max_retries: int = arg(3, flag="--max-retries", group=JUDGE)
    """retries per request on 408, 409, 429, 5xx, timeouts and lost connections, with
    jittered exponential backoff (default: 3)"""

    backoff: float = arg(1.0, group=JUDGE)
    """first retry delay in seconds, doubled each retry; a Retry-After wins (default: 1)"""

    timeout: float = arg(60.0, group=JUDGE)
    """seconds per request (default: 60)"""

    max_tokens: int = arg(1024, flag="--max-tokens", group=JUDGE)
    """max tokens per judge answer (default: 1024)"""

    rerate: bool = arg(False, group=WHAT)
    """also re-rate decisions the judge rated before (never human-rated ones)"""

    limit: int | None = arg(None, group=WHAT)
    """rate at most this many decisions in this run"""

    agent_types: list[str] | None = arg(None, flag="--agent-types", metavar="TYPE", group=WHAT)
    """rate only these agent types"""

    out: str | None = arg(None, metavar="DIR", group=WHAT)
    """folder for the new rating log (default: the first dataset folder, or the folder of
    the first dataset file)"""

    json: bool = False
    """print the summary as JSON"""


@dataclass
class ExportArgs:
    output: str | None = arg(None, flag="-o", aliases=["--output"], required=True, metavar="FILE")
    """file to write"""

    format: str | None = arg(None, choices=("seed", "jsonl"))
    """output format (default: seed when FILE ends in .json, else jsonl)"""

    force: bool = False
    """replace FILE if it exists"""


@dataclass
class SplitArgs:
    out: str | None = arg(None, required=True, metavar="DIR")
    """folder for the two files"""

    by: str = arg("run", choices=("run", "agent"))
    """what stays together (default: run)"""

    held_out: float = arg(0.2, flag="--held-out")
    """fraction of groups held out (default: 0.2)"""

    seed: int = 0
    """hash seed (default: 0)"""

    force: bool = False
    """replace existing files in DIR"""


TRACES = "MLflow traces"
SCORES = ("reward", "rating")
DEFAULT_FEEDBACK = {"reward": "reward", "rating": "rating"}


def parse_feedback_map(items: list[str] | None) -> dict[str, str]:
    """`--feedback NAME=reward|rating` (repeatable) -> {feedback name: score}; the
    defaults (feedback 'reward' -> reward, 'rating' -> rating) stay unless an item maps
    the same score or names the same feedback."""
    from simtune.errors import ConfigError

    out = dict(DEFAULT_FEEDBACK)
    for item in items or []:
        name, sep, score = item.partition("=")
        name, score = name.strip(), score.strip()
        if not sep or not name or score not in SCORES:
            raise ConfigError(f"--feedback {item!r}: write FEEDBACK_NAME=reward or =rating")
        out = {k: v for k, v in out.items() if v != score and k != name}
        out[name] = score
    return out


@dataclass
class ImportTracesArgs:
    """`simtune data import-traces`: MLflow traces (and their feedback) -> decisions."""

    env: str = arg("", flag="--env", required=True, metavar="NAME")
    """write the decisions into <workspace>/envs/NAME/datasets/ (a new file)"""

    experiment_name: str = arg("", required=True, metavar="NAME", group=TRACES)
    """MLflow experiment holding the traces"""

    run_id: str | None = arg(None, flag="--run-id", metavar="ID", group=TRACES)
    """only the traces of this MLflow run"""

    feedback: list[str] | None = arg(None, action="append", metavar="NAME=SCORE", group=TRACES)
    """map a feedback name to a score: NAME=reward or NAME=rating (repeatable; default:
    feedback 'reward' is the reward, 'rating' the rating)"""

    tracking_uri: str | None = arg(None, metavar="URI", group=TRACES)
    """MLflow store (default: $MLFLOW_TRACKING_URI, else the workspace's mlflow.db)"""

    workspace: str | None = workspace_arg()

    json: bool = False
    """print the report as JSON"""

    def problems(self) -> list[str]:
        from simtune.config.names import mlflow_name_problem
        from simtune.errors import ConfigError

        out = [mlflow_name_problem(self.experiment_name, "--experiment_name")]
        try:
            parse_feedback_map(self.feedback)
        except ConfigError as exc:
            out.append(str(exc))
        return [p for p in out if p]


@dataclass
class MirrorTracesArgs:
    """`simtune data mirror-traces`: one MLflow trace per recorded decision (opt-in)."""

    env: str = arg("", flag="--env", required=True, metavar="NAME")
    """mirror the decisions of <workspace>/envs/NAME/datasets/"""

    experiment_name: str = arg("llm_tuning", metavar="NAME", group=TRACES)
    """MLflow experiment to write the traces into (default: llm_tuning, beside the
    training runs)"""

    tracking_uri: str | None = arg(None, metavar="URI", group=TRACES)
    """MLflow store (default: $MLFLOW_TRACKING_URI, else the workspace's mlflow.db)"""

    workspace: str | None = workspace_arg()

    json: bool = False
    """print the report as JSON"""

    def problems(self) -> list[str]:
        from simtune.config.names import mlflow_name_problem

        return [p for p in [mlflow_name_problem(self.experiment_name, "--experiment_name")] if p]
