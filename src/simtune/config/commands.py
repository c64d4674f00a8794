"""The options of the smaller commands: models, ui, make-tiny-model, sync, sims, demo,
loop and eval. One class per (sub)command; `simtune.cli` turns each into flags with
`add_cli_args`, so their help is the docstrings below."""

from __future__ import annotations

from dataclasses import dataclass

from simtune.config.checks import positive_int
from simtune.config.common import precision_arg, workspace_arg
from simtune.config.fields import arg
from simtune.config.names import alias_problem, mlflow_name_problem
from simtune.config.proxy import CREDIT_RULES

# --- models, ui, make-tiny-model, sync -----------------------------------------------------


@dataclass
class WorkspaceArgs:
    """Commands that only need the workspace (`simtune models`)."""

    workspace: str | None = workspace_arg()


@dataclass
class JsonListArgs:
    """`models list`, `sims list`."""

    json: bool = False
    """print JSON"""


@dataclass
class ModelIdArgs:
    """`models show`."""

    model_id: str = arg("", positional=True)


@dataclass
class ModelsDeleteArgs(ModelIdArgs):
    """`models delete`."""

    keep_files: bool = arg(False, flag="--keep-files", variants=False)
    """keep models/<model_id>/ on disk"""


@dataclass
class ModelsPromoteArgs:
    """`models promote NAME VERSION --alias ALIAS`: point an MLflow alias at a version."""

    name: str = arg("", positional=True, metavar="NAME")
    """registered MLflow model (default name of a job's model: its experiment)"""

    version: str = arg("", positional=True, metavar="VERSION")
    """version number to point the alias at"""

    alias: str = arg("", required=True, metavar="ALIAS")
    """alias to set or move, e.g. champion (letters, digits, '_', '-'; not a number)"""

    tracking_uri: str | None = arg(None, metavar="URI")
    """MLflow store (default: $MLFLOW_TRACKING_URI, else the workspace's mlflow.db)"""

    json: bool = False
    """print the result as JSON"""

    def problems(self) -> list[str]:
        out = [
            mlflow_name_problem(self.name, "NAME"),
            alias_problem(self.alias),
            None
            if self.version.isdigit() and int(self.version) > 0
            else f"VERSION {self.version!r}: a version number (1, 2, ...)",
        ]
        if any(c in self.name for c in "/:@"):
            out.append(f"NAME {self.name!r}: a registered model name (no '/', ':' or '@')")
        return [p for p in out if p]


@dataclass
class UiArgs(WorkspaceArgs):
    """`simtune ui`: the MLflow UI on the workspace's store."""

    tracking_uri: str | None = None
    """backend store (default: the workspace's mlflow.db)"""

    host: str = "127.0.0.1"
    """address to bind (default: 127.0.0.1, loopback only)"""

    port: int = 5000
    """port (default: 5000)"""

    workers: int = 1
    """server worker processes (default: 1; MLflow's own default of 4 takes much longer to
    start and one user needs one)"""


@dataclass
class TinyModelArgs:
    """`simtune make-tiny-model`."""

    dir: str = arg("", positional=True)
    """output directory"""


@dataclass
class SyncArgs(WorkspaceArgs):
    """`simtune sync`."""

    tracking_uri: str | None = None
    """send to this MLflow server instead of the one each job used"""

    json: bool = False
    """print the results as JSON"""


# --- sims, demo, loop ----------------------------------------------------------------------

POLICY = "policy (exactly one)"
ENDPOINT = "model endpoint options (with --model-url)"


@dataclass
class SimsRunArgs:
    """`simtune sims run NAME`."""

    name: str = arg("", positional=True, metavar="NAME")
    """simulation (see `simtune sims list`)"""

    model_url: str | None = arg(None, flag="--model-url", metavar="URL", exclusive=POLICY)
    """agents ask this OpenAI-compatible endpoint (e.g. `simtune serve`, vLLM)"""

    expert: bool = arg(False, exclusive=POLICY)
    """the simulation's rule-based expert (not an LLM; bootstraps demonstrations)"""

    random: bool = arg(False, exclusive=POLICY)
    """random valid answers (a baseline)"""

    model: str | None = arg(None, group=ENDPOINT)
    """model name to request (default: the first one listed)"""

    api_key: str | None = arg(None, flag="--api-key", group=ENDPOINT)
    """bearer token (default: $SIMTUNE_API_KEY, else $OPENAI_API_KEY)"""

    temperature: float = arg(0.0, group=ENDPOINT)
    """sampling temperature (default: 0)"""

    concurrency: int = arg(4, type=positive_int, group=ENDPOINT)
    """simultaneous requests for agents deciding at once (default: 4)"""

    episodes: int = arg(5, type=positive_int, metavar="N")
    """episodes (default: 5)"""

    steps: int | None = arg(None, type=positive_int, metavar="S")
    """steps per episode (default: the simulation's)"""

    seed: int = 0
    """environment seed (default: 0)"""

    env_name: str | None = arg(None, flag="--env", aliases=["--env-name"], metavar="NAME")
    """env name, i.e. the folder envs/<env>/datasets (default: the simulation's name)"""

    workspace: str | None = workspace_arg()

    run_id: str | None = arg(None, flag="--run-id")
    """run id (default: a fresh one)"""

    credit: str = arg("uniform", choices=CREDIT_RULES)
    """how an episode return is spread over the agent's decisions (default: uniform)"""

    json: bool = False
    """print the result as JSON"""


@dataclass
class DemoArgs:
    """`simtune demo`."""

    workspace: str = "demo-workspace"
    """workspace to use (default: ./demo-workspace)"""

    quick: bool = False
    """the tiny random model and fewer episodes and steps (~1 minute): for tests and CI"""

    llm_path: str | None = None
    """base model instead of SmolLM2-135M-Instruct: a model directory, hub id or .gguf
    file (trained with the demo's real-model options)"""

    episodes: int | None = arg(None, type=positive_int)
    """expert episodes to collect demonstrations from (default: 40, --quick 12)"""

    seed: int = 0
    """shifts every simulation and training seed (default: 0)"""


@dataclass
class LoopArgs:
    """`simtune loop`."""

    sim: str = "job_market"
    """simulation: a registered name (`simtune sims list`) or module:Class / file.py:Class
    of your own (default: job_market)"""

    rounds: int = arg(2, type=positive_int)
    """rounds, round 0 included (default: 2)"""

    llm_path: str | None = None
    """base model to tune (directory, hub id, adapter or model id; default: the demo's tiny
    model, built in the workspace -- only to try the loop)"""

    expert: bool = arg(False, exclusive="")
    """round 0 collects with the simulation's expert policy (the default)"""

    model_url: str | None = arg(None, flag="--model-url", exclusive="")
    """round 0 collects with this OpenAI-compatible endpoint instead"""

    model: str | None = None
    """model name to ask --model-url for"""

    episodes: int = arg(20, type=positive_int)
    """episodes collected per round (default: 20)"""

    eval_episodes: int = arg(4, flag="--eval-episodes", type=positive_int)
    """held-out episodes each new model is evaluated on (default: 4)"""

    steps: int | None = arg(None, type=positive_int)
    """steps per episode (default: the sim's own)"""

    config: str | None = None
    """YAML of training options for both modes; `sft:` / `ppo:` sections for one (default:
    the demo's options for tiny models)"""

    temperature: float = 1.0
    """sampling temperature of the served model while collecting (default: 1.0; evaluation
    is greedy)"""

    workspace: str | None = None
    """workspace (default: current directory)"""

    experiment_name: str = "simtune-loop"
    """MLflow experiment (default: simtune-loop)"""

    seed: int = 0
    """base seed (default: 0)"""


# --- eval ----------------------------------------------------------------------------------

TARGET = "what to evaluate on (exactly one)"
HELD_OUT = "held-out decisions (with --dataset_path)"
SIM = "simulation (with --sim)"
GENERATION = "generation and serving"
TRACKING = "tracking"


@dataclass
class EvalArgs:
    """`simtune eval` (keywords of `simtune.evaluation.evaluate`)."""

    models: list[str] | None = arg(
        None, flag="--model", action="append", required=True, metavar="SPEC"
    )
    """a model to evaluate (repeat to compare): a simtune model id, an MLflow NAME (latest
    version), NAME/VERSION, NAME@ALIAS, models:/NAME/VERSION or models:/NAME@ALIAS, an
    adapter or model directory, a .gguf file, or 'base' (the base model of the others)"""

    dataset_path: list[str] | None = arg(None, metavar="PATH", exclusive=TARGET)
    """held-out decision files or directories (any format `simtune train` reads)"""

    sim: str | None = arg(None, metavar="NAME", exclusive=TARGET)
    """a simulation (see `simtune sims list`)"""

    reward_fn: str | None = arg(None, metavar="MODULE:FN", group=HELD_OUT)
    """score answers with fn(prompt=, completion=, record=) -> float ('module:fn' or
    'path/to/file.py:fn')"""

    judge_url: str | None = arg(None, metavar="URL", group=HELD_OUT)
    """score answers with an OpenAI-compatible LLM judge (1-5, mapped to [-1, 1]); key
    from $SIMTUNE_JUDGE_API_KEY or $OPENAI_API_KEY"""

    judge_model: str | None = arg(None, metavar="NAME", group=HELD_OUT)
    """the judge's model name (with --judge_url)"""

    max_samples: int | None = arg(None, type=positive_int, metavar="N", group=HELD_OUT)
    """evaluate on the first N decisions only"""

    system_prompt: str | None = arg(None, metavar="TEXT", group=HELD_OUT)
    """system prompt for every model (default: each adapter's training one; none for
    base)"""

    episodes: int = arg(5, type=positive_int, metavar="N", group=SIM)
    """episodes (default: 5)"""

    steps: int | None = arg(None, type=positive_int, metavar="S", group=SIM)
    """steps per episode (default: the sim's)"""

    seed: int = arg(1000, group=SIM)
    """environment seed; every model plays the same episodes (default: 1000, apart from
    the collection default 0)"""

    max_tokens: int = arg(128, type=positive_int, group=GENERATION)
    """answer cap (default: 128)"""

    temperature: float = arg(0.0, group=GENERATION)
    """sampling temperature (default: 0)"""

    backend: str = arg("auto", choices=("auto", "transformers"), group=GENERATION)
    """generation backend; evaluation runs in-process with transformers (vLLM is `simtune
    serve --backend vllm`)"""

    device: str | None = arg(None, group=GENERATION)
    """torch device for the transformers backend (default: auto)"""

    precision: str = precision_arg(group=GENERATION)

    batch_size: int = arg(8, type=positive_int, group=GENERATION)
    """prompts generated together (default: 8)"""

    trust_remote_code: bool = arg(False, group=GENERATION)
    """allow a model repository's own code to run"""

    workspace: str | None = workspace_arg(group=TRACKING)

    tracking_uri: str | None = arg(None, metavar="URI", group=TRACKING)
    """MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the workspace's
    mlflow.db)"""

    experiment_name: str | None = arg(None, metavar="NAME", group=TRACKING)
    """experiment for models without a training run here, e.g. base (default: the other
    models' training experiment, else llm_tuning)"""

    no_mlflow: bool = arg(False, group=TRACKING)
    """log nothing to MLflow"""

    json: bool = False
    """print the report as JSON"""


# --- train's own flags (the job's options are TuningConfig) --------------------------------


@dataclass
class TrainFileArgs:
    """`simtune train --config`: read before the job's flags."""

    config: str | None = arg(None, metavar="YAML")
    """YAML file of options (keys = option names); flags given here override it"""


@dataclass
class ResultJsonArgs:
    """`--json` of commands that print one result."""

    json: bool = False
    """print the result as JSON"""
