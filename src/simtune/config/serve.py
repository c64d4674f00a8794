"""`simtune serve`: which models to serve, how, and where.

The single source of the serve defaults (port, backends): `simtune.serving` should
import them from here rather than keep its own copies.
"""

from __future__ import annotations

from dataclasses import dataclass

from simtune.config.common import ListenArgs, precision_arg, workspace_arg
from simtune.config.fields import arg

DEFAULT_PORT = 8000
BACKENDS = ("auto", "transformers", "vllm")
KEY_ENV = "SIMTUNE_SERVE_API_KEY"


@dataclass
class ServedModels:
    """What `simtune serve` serves (its first flag, before the listening ones)."""

    models: list[str] | None = arg(
        None,
        flag="--model",
        aliases=["-m"],
        action="append",
        required=True,
        metavar="ID|NAME[/VERSION|@ALIAS]|PATH",
    )
    """model to serve (repeat for several adapters on one base): a model id, an MLflow
    NAME (latest version), NAME/VERSION, NAME@ALIAS or models:/ URI, an adapter or base
    model directory, or a .gguf file (dequantized once into the workspace's
    cache/models/)"""


@dataclass
class ServeArgs(ListenArgs, ServedModels):
    """The options of `simtune serve` (and keywords of `simtune.serving.server.serve`)."""

    port: int = DEFAULT_PORT

    api_key: str | None = arg(None, flag="--api-key", metavar="KEY", env=KEY_ENV)

    backend: str = arg("auto", choices=BACKENDS)
    """auto (default): vllm when installed and a CUDA GPU is present, else transformers"""

    workspace: str | None = workspace_arg()

    tracking_uri: str | None = None
    """MLflow store for registered (NAME/VERSION, NAME@ALIAS) models (default: $MLFLOW_TRACKING_URI or the
    workspace's mlflow.db)"""

    max_batch_size: int = arg(8, flag="--max-batch-size")
    """most requests generated together (default: 8)"""

    max_new_tokens: int | None = arg(None, flag="--max-new-tokens")
    """default and upper bound of a request's max_tokens; longer requests are clipped
    and end with finish_reason 'length' (default: none but the model's context window,
    as in vLLM: OneSim and other clients send no max_tokens)"""

    served_model_names: list[str] = arg([], flag="--served-model-name", metavar="NAME")
    """more names clients may put in 'model' for the first --model, as vLLM's flag (e.g.
    the 'model_name' in YuLan-OneSim's config/model_config.json: Qwen2.5-14B-Instruct,
    or lora)"""

    device: str | None = None
    """torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)"""

    precision: str = precision_arg()

    trust_remote_code: bool = False
    """allow the base model's repository code to run (off by default)"""
