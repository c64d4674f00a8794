"""The MLflow pyfunc flavour of a simtune adapter: adapter files + a base-model reference.

MLflow's transformers flavour would copy the full base weights (and reach for the hub
when the base is local), so registered simtune models hold only the LoRA adapter and
tokenizer; `load_context` loads the base from the recorded path or hub id.
`mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(["prompt", ...])` returns
one generated string per prompt.

A reward model (`model_config["task"] == "reward"`: a SEQ_CLS adapter from
`--tuning_mode reward`) instead takes rows of {"prompt": ..., "completion": ...} (a
DataFrame, a dict, or a list of dicts; a prompt is a string or a chat message list)
and returns one float score per row. Texts are rendered exactly as in training
(simtune.rewards.reward_input_ids): chat template of prompt + assistant
answer, cut from the left to `model_config["max_length"]`.

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
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        cfg = context.model_config or {}
        adapter = context.artifacts["adapter"]
        base = cfg["base_model"]
        local = Path(base).is_dir()
        if not local and cfg.get("base_model_is_local"):
            raise FileNotFoundError(f"base model {base} of this adapter is missing")
        self.task = cfg.get("task") or "generate"
        self.tokenizer = AutoTokenizer.from_pretrained(adapter, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.task == "reward":
            import transformers

            # A causal base loaded as a classifier reports its "missing" score head,
            # which the adapter then supplies: not worth a warning.
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    base,
                    num_labels=1,
                    pad_token_id=self.tokenizer.pad_token_id,
                    use_safetensors=True,
                    local_files_only=local,
                    dtype=torch.float32,
                )
            finally:
                transformers.logging.set_verbosity(verbosity)
            self.max_length = int(cfg.get("max_length") or 1024)
            self.system_prompt = cfg.get("system_prompt")
            self.batch_size = int(cfg.get("batch_size") or 8)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                base, use_safetensors=True, local_files_only=local, dtype=torch.float32
            )
        self.model = PeftModel.from_pretrained(model, adapter).eval()
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))

    # No type hints on model_input: MLflow would turn them into a strict input schema.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import torch

        params = params or {}
        if getattr(self, "task", "generate") == "reward":
            return self._score(_as_pairs(model_input))
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

    def _score(self, pairs: list[tuple[Any, str]]) -> list[float]:
        """One float per (prompt, completion): the reward head's single logit."""
        import torch

        pad = self.tokenizer.pad_token_id
        scores: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            rows = []
            for prompt, completion in pairs[start : start + self.batch_size]:
                messages = (
                    list(prompt)
                    if isinstance(prompt, list)
                    else [{"role": "user", "content": str(prompt)}]
                )
                if self.system_prompt and (not messages or messages[0].get("role") != "system"):
                    messages.insert(0, {"role": "system", "content": self.system_prompt})
                ids = list(
                    self.tokenizer.apply_chat_template(
                        [*messages, {"role": "assistant", "content": completion}],
                        tokenize=True,
                        return_dict=False,
                    )
                )
                rows.append(ids[-self.max_length :])
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, ids in enumerate(rows):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                mask[i, : len(ids)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            scores.extend(float(v) for v in logits[:, 0].float())
        return scores


def _as_pairs(model_input: Any) -> list[tuple[Any, str]]:
    """(prompt, completion) rows from a DataFrame, a dict (of scalars or of lists) or a
    list of dicts."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # DataFrame
        missing = {"prompt", "completion"} - set(model_input.columns)
        if missing:
            raise ValueError(
                f"reward model input needs columns prompt and completion; missing {sorted(missing)}"
            )
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        prompt, completion = model_input.get("prompt"), model_input.get("completion")
        if isinstance(completion, list):  # {"prompt": [...], "completion": [...]}
            one_prompt = not isinstance(prompt, list) or (prompt and isinstance(prompt[0], dict))
            prompts = [prompt] * len(completion) if one_prompt else prompt
            if len(prompts) != len(completion):
                raise ValueError(
                    f"{len(prompts)} prompts but {len(completion)} completions in the input"
                )
            rows = [
                {"prompt": p, "completion": c} for p, c in zip(prompts, completion, strict=True)
            ]
        else:
            rows = [model_input]
    else:
        rows = list(model_input)
    pairs = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row or "completion" not in row:
            raise ValueError(f"reward model input row {i} needs 'prompt' and 'completion'")
        prompt = row["prompt"]
        if hasattr(prompt, "tolist"):  # a message list that pandas turned into an array
            prompt = prompt.tolist()
        pairs.append((prompt, str(row["completion"])))
    return pairs


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
