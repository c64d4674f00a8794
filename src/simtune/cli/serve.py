"""`simtune serve`: base model + LoRA adapters as an OpenAI-compatible endpoint.

Parsing only; the work is `simtune.serving.server.serve`, imported when the command runs
(nothing heavy at import time: `simtune --help` must stay fast).
"""

from __future__ import annotations

import argparse
from typing import Any

from simtune.config import add_cli_args
from simtune.config.serve import ServeArgs

DESCRIPTION = """\
Serve a base model and one or more LoRA adapters (sharing that base) as an
OpenAI-compatible endpoint: /v1/models, /v1/chat/completions and /v1/completions
(streaming too), plus /health. The request's "model" field picks the adapter; the base
model itself is served as "base". Requests that arrive together are generated in one
batch, mixed adapters included.

--model takes (repeatable):
  a local model id        sft-tiny-20250101-120000-ab12cd   (models/registry.json)
  an MLflow model         NAME (latest), NAME/VERSION, NAME@ALIAS,
                          models:/NAME/VERSION or models:/NAME@ALIAS
                          ('/' names a version, '@' an alias; NAME@2 for version 2
                          is deprecated: write NAME/2)
  a directory             an adapter (adapter_config.json) or a base model
Served names: the model id, NAME/VERSION for MLflow models, the directory's name for
an adapter directory, and "base".

Backends: transformers (in-process, CPU or GPU, always available) or vllm (vLLM's
own server as a subprocess; needs vllm installed and a CUDA GPU). auto picks vllm
when both are there. Stop with Ctrl-C or SIGTERM."""

EPILOG = """\
example:
  simtune serve --model sft-tiny-20250101-120000-ab12cd --model llm_tuning@champion
  # then:  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")
  #        .chat.completions.create(model="llm_tuning/3", messages=[...])
  # (the served name is NAME/VERSION of the version the alias pointed to; GET /v1/models
  # lists it)"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve base + LoRA adapters as an OpenAI-compatible endpoint",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cli_args(p, ServeArgs)
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
