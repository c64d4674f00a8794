"""The vLLM backend: `simtune serve --backend vllm` launches vLLM's own OpenAI server as a
subprocess with the base model and the adapters as `--lora-modules`.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from simtune.config.serve import BACKENDS  # declared with ServeArgs (--backend's choices)
from simtune.errors import ConfigError, SimtuneError
from simtune.serving.models import BASE_NAME, ServedModel

log = logging.getLogger(__name__)


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def choose_backend(backend: str) -> str:
    """``auto`` -> ``vllm`` when vllm is importable and a CUDA GPU is present."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "vllm":
        if not vllm_installed():
            raise ConfigError(
                "--backend vllm: vllm is not installed (pip install vllm; it needs a CUDA GPU); "
                "use --backend transformers"
            )
        return "vllm"
    if backend == "auto" and vllm_installed():
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The only ``--max-lora-rank`` values vLLM accepts."""


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank` (adapters of lower rank load fine)."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ConfigError(
        f"--backend vllm: an adapter has LoRA rank {rank}; vLLM serves ranks up to "
        f"{VLLM_LORA_RANKS[-1]} (use --backend transformers)"
    )


def vllm_env(api_key: str | None, device: str | None, base: dict[str, str]) -> dict[str, str]:
    """The environment of vLLM's server: the API key goes here (``VLLM_API_KEY``, which
    vLLM reads), never on the command line where ``ps`` shows it to every user."""
    env = dict(base)
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if device and device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    return env


def vllm_command(
    served: dict[str, ServedModel],
    *,
    host: str,
    port: int,
    max_batch_size: int,
    trust_remote_code: bool = False,
) -> list[str]:
    """The argument list (no shell) of vLLM's OpenAI server for base + adapters (the API
    key is passed in the environment: `vllm_env`)."""
    base = served[BASE_NAME].base_model
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base]
    cmd += ["--served-model-name", BASE_NAME, "--host", host, "--port", str(port)]
    cmd += ["--max-num-seqs", str(max_batch_size)]
    adapters = [s for s in served.values() if s.adapter_dir]
    if adapters:
        ranks = []
        for s in adapters:
            try:
                cfg = json.loads((Path(str(s.adapter_dir)) / "adapter_config.json").read_text())
                ranks.append(int(cfg.get("r") or 16))
            except (OSError, ValueError, TypeError):
                ranks.append(16)
        cmd += ["--enable-lora", "--max-loras", str(len(adapters))]
        cmd += ["--max-lora-rank", str(vllm_lora_rank(max(ranks)))]
        cmd += ["--lora-modules", *(f"{s.name}={s.adapter_dir}" for s in adapters)]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def run_vllm(cmd: list[str], env: dict[str, str]) -> None:
    """Run vLLM's server in the foreground; SIGINT/SIGTERM are passed on to it."""
    log.info("starting vLLM: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)  # noqa: S603 (argument list, no shell)

    def forward(signum: int, frame: Any) -> None:
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if code not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise SimtuneError(f"--backend vllm: vLLM exited with status {code} (see its log above)")
