"""The MLflow pyfunc flavour of a simtune adapter: adapter files + a base-model reference.

MLflow's transformers flavour would copy the full base weights (and reach for the hub
when the base is local), so registered simtune models hold only the LoRA adapter and
tokenizer; `load_context` loads the base from the recorded path or hub id.
`mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(["prompt", ...])` returns
one generated string per prompt.

This file is logged as MLflow "model code" (no pickling), and imports nothing from
simtune, so a registered model loads wherever torch, transformers and peft are
installed, simtune or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc


class AdapterModel(mlflow.pyfunc.PythonModel):
    """Generates with base + LoRA adapter. Inputs: a prompt string, a list of prompts,
    chat message lists, or a DataFrame with a 'prompt' column."""

    def load_context(self, context: Any) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = context.model_config or {}
        adapter = context.artifacts["adapter"]
        base = cfg["base_model"]
        local = Path(base).is_dir()
        if not local and cfg.get("base_model_is_local"):
            raise FileNotFoundError(f"base model {base} of this adapter is missing")
        self.tokenizer = AutoTokenizer.from_pretrained(adapter, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            base, use_safetensors=True, local_files_only=local, dtype=torch.float32
        )
        self.model = PeftModel.from_pretrained(model, adapter).eval()
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))

    # No type hints on model_input: MLflow would turn them into a strict input schema.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import torch

        params = params or {}
        prompts = _as_prompts(model_input)
        out = []
        for prompt in prompts:
            messages = (
                prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            )
            enc = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=int(params.get("max_new_tokens", self.max_new_tokens)),
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            out.append(
                self.tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            )
        return out


def _as_prompts(model_input: Any) -> list[Any]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # pandas DataFrame
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return list(model_input[col])
    if isinstance(model_input, dict):
        value = model_input.get("prompt", model_input.get("messages"))
        return (
            value
            if isinstance(value, list) and value and not isinstance(value[0], dict)
            else [value]
        )
    return list(model_input)


mlflow.models.set_model(AdapterModel())
