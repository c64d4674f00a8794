"""`simtune serve`: base model + LoRA adapters as an OpenAI-compatible endpoint.

Parsing only; the work is `simtune.serving.server.serve`, imported when the command runs
(nothing heavy at import time: `simtune --help` must stay fast).
"""

from __future__ import annotations

import argparse
from typing import Any

from simtune.cli.common import add_listen_flags, add_precision_flag, add_workspace_flag

# Copies of simtune.serving.server.DEFAULT_PORT and BACKENDS (importing serving here would
# slow every `simtune --help`; tests/test_serving.py checks they still match).
DEFAULT_PORT = 8000
BACKENDS = ("auto", "transformers", "vllm")

DESCRIPTION = """\
Serve a base model and one or more LoRA adapters (sharing that base) as an
OpenAI-compatible endpoint: /v1/models, /v1/chat/completions and /v1/completions
(streaming too), plus /health. The request's "model" field picks the adapter; the base
model itself is served as "base". Requests that arrive together are generated in one
batch, mixed adapters included.

--model takes (repeatable):
  a local model id        sft-tiny-20250101-120000-ab12cd   (models/registry.json)
  an MLflow model         NAME, NAME@VERSION, NAME@alias or models:/NAME/VERSION
  a directory             an adapter (adapter_config.json) or a base model
Served names: the model id, NAME@VERSION for MLflow models, the directory's name for
an adapter directory, and "base".

Backends: transformers (in-process, CPU or GPU, always available) or vllm (vLLM's
own server as a subprocess; needs vllm installed and a CUDA GPU). auto picks vllm
when both are there. Stop with Ctrl-C or SIGTERM."""

EPILOG = """\
example:
  simtune serve --model sft-tiny-20250101-120000-ab12cd --model llm_tuning-ppo@3
  # then:  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")
  #        .chat.completions.create(model="llm_tuning-ppo@3", messages=[...])"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve base + LoRA adapters as an OpenAI-compatible endpoint",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        "-m",
        dest="models",
        action="append",
        required=True,
        metavar="ID|NAME[@VERSION]|PATH",
        help="model to serve (repeat for several adapters on one base): a model id, MLflow "
        "NAME[@VERSION], an adapter or base model directory, or a .gguf file (dequantized "
        "once into the workspace's cache/models/)",
    )
    add_listen_flags(p, default_port=DEFAULT_PORT, key_env="SIMTUNE_SERVE_API_KEY")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default): vllm when installed and a CUDA GPU is present, else transformers",
    )
    add_workspace_flag(p)
    p.add_argument(
        "--tracking_uri",
        "--tracking-uri",
        dest="tracking_uri",
        help="MLflow store for NAME[@VERSION] models (default: $MLFLOW_TRACKING_URI or the "
        "workspace's mlflow.db)",
    )
    p.add_argument(
        "--max-batch-size",
        "--max_batch_size",
        dest="max_batch_size",
        type=int,
        default=8,
        help="most requests generated together (default: 8)",
    )
    p.add_argument(
        "--max-new-tokens",
        "--max_new_tokens",
        dest="max_new_tokens",
        type=int,
        default=None,
        help="default and upper bound of a request's max_tokens; longer requests are clipped "
        "and end with finish_reason 'length' (default: none but the model's context window, "
        "as in vLLM: OneSim and other clients send no max_tokens)",
    )
    p.add_argument(
        "--served-model-name",
        "--served_model_name",
        dest="served_model_names",
        nargs="+",
        metavar="NAME",
        default=[],
        help="more names clients may put in 'model' for the first --model, as vLLM's flag "
        "(e.g. the 'model_name' in YuLan-OneSim's config/model_config.json: "
        "Qwen2.5-14B-Instruct, or lora)",
    )
    p.add_argument(
        "--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)"
    )
    add_precision_flag(p)
    p.add_argument(
        "--trust_remote_code",
        "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        help="allow the base model's repository code to run (off by default)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from simtune.serving.server import serve

    serve(
        args.models,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        backend=args.backend,
        workspace=args.workspace,
        tracking_uri=args.tracking_uri,
        device=args.device,
        precision=args.precision,
        max_batch_size=args.max_batch_size,
        max_new_tokens=args.max_new_tokens,
        trust_remote_code=args.trust_remote_code,
        served_model_names=args.served_model_names,
    )
    return 0
