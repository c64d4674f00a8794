"""Reward sources for online PPO: a Python function, a reward model, or an LLM judge.

Each source scores a batch of (prompt, completion) pairs with one finite float per
completion (`RewardSource.score`) and counts what happened (`stats`). What the user
can get wrong -- a bad `--reward_fn` spec, a `--reward_model` that is not a
sequence-classification model, an unreachable `--judge_url` -- fails fast with a
`SimtuneError` naming the flag: `load_reward_fn`, `check_reward_model` and
`check_judge` only read files or send one request, so they run before training.

`normalise_scores` (also used by PPO for offline rewards) and `reward_input_ids` (the
tokenization shared by reward-model training and scoring) live here too. Heavy imports
(torch, transformers, peft) happen inside the reward-model code only.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import numbers
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from simtune.config import NORMALISATIONS
from simtune.decisions.schema import Decision
from simtune.errors import ConfigError, SimtuneError
from simtune.openai.client import ChatClient, LLMError, check_endpoint
from simtune.util import load_object

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class RewardError(SimtuneError):
    """A reward source failed while scoring (the user's function, model or judge)."""


@runtime_checkable
class RewardSource(Protocol):
    """Scores completions: one finite float per completion, in order."""

    name: str

    def score(
        self, prompts: list[Messages], completions: list[str], records: list[Decision]
    ) -> list[float]: ...

    def stats(self) -> dict[str, float]: ...


# --- score normalisation -----------------------------------------------------------------


def normalise_scores(values: Sequence[float], method: str = "zscore") -> list[float]:
    """'zscore': (v - mean) / std (population std; all 0 when std is 0);
    'minmax': linearly onto [-1, 1] (all 0 when constant); 'none': unchanged."""
    if method not in NORMALISATIONS:
        raise ConfigError(
            f"unknown score normalisation {method!r} (choose from {', '.join(NORMALISATIONS)})"
        )
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"scores must be finite numbers, got {values!r}")
    if method == "none" or not out:
        return out
    if method == "zscore":
        mean = sum(out) / len(out)
        std = math.sqrt(sum((v - mean) ** 2 for v in out) / len(out))
        if std <= 1e-12 * max(1.0, abs(mean)):
            return [0.0] * len(out)
        return [(v - mean) / std for v in out]
    lo, hi = min(out), max(out)
    if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)):
        return [0.0] * len(out)
    return [2.0 * (v - lo) / (hi - lo) - 1.0 for v in out]


# --- prompts as text ---------------------------------------------------------------------


def prompt_text(prompt: Messages | str) -> str:
    """The text a reward function sees: the last user message, else the whole prompt."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return "\n".join(str(m.get("content") or "") for m in prompt)


def _as_messages(prompt: Messages | str) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _check_lengths(prompts: Sequence[Any], completions: Sequence[Any]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


# --- a Python function -------------------------------------------------------------------


def load_reward_fn(spec: str) -> Callable[..., Any]:
    """Import `module:function` or `path/to/file.py:function` (dotted attributes work:
    `module:Class.method`). Raises ConfigError naming --reward_fn and what failed."""
    obj = load_object(spec, "--reward_fn", "function")
    if not callable(obj):
        raise ConfigError(f"--reward_fn: {spec!r} is not callable (it is a {type(obj).__name__})")
    return obj


def _as_score(value: Any) -> float | None:
    """A finite float, or None for anything that is not one (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    if not isinstance(value, numbers.Real):
        size = getattr(value, "numel", None) or getattr(value, "size", None)
        size = size() if callable(size) else size
        if size != 1 or not hasattr(value, "item"):  # one-element numpy/torch values
            return None
        value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return number if math.isfinite(number) else None


class FunctionReward:
    """Calls `fn(prompt=..., completion=..., record=...)` once per sample.

    `prompt` is the text of the last user message (else the whole prompt); `record`
    is the Decision the prompt came from (None when there is none). Keywords the
    function does not declare are not passed, so `def reward(completion, **_)` works.
    """

    def __init__(self, fn: Callable[..., Any], spec: str | None = None) -> None:
        self.fn = fn
        self.name = spec or getattr(fn, "__qualname__", repr(fn))
        self._kwargs = _accepted_kwargs(fn, ("prompt", "completion", "record"))
        self._calls = 0
        self._failures = 0

    def score(
        self, prompts: list[Messages], completions: list[str], records: list[Decision]
    ) -> list[float]:
        _check_lengths(prompts, completions)
        scores: list[float] = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            record = records[i] if i < len(records) else None
            kwargs = {"prompt": prompt_text(prompt), "completion": completion, "record": record}
            self._calls += 1
            try:
                value = self.fn(**{k: v for k, v in kwargs.items() if k in self._kwargs})
            except Exception as exc:
                self._failures += 1
                raise RewardError(
                    f"--reward_fn {self.name} raised {type(exc).__name__}: {exc} on sample {i}"
                ) from exc
            number = _as_score(value)
            if number is None:
                self._failures += 1
                raise RewardError(
                    f"--reward_fn {self.name} returned {value!r} (a {type(value).__name__}) on "
                    f"sample {i}; it must return a finite number"
                )
            scores.append(number)
        return scores

    def stats(self) -> dict[str, float]:
        return {"calls": float(self._calls), "failures": float(self._failures)}


def _accepted_kwargs(fn: Callable[..., Any], names: tuple[str, ...]) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return set(names)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return set(names)
    named = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return set(names) & named


# --- a reward model ----------------------------------------------------------------------


def _read_json(path: Path, flag: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{flag}: {path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag}: {path} is not a JSON object")
    return data


def _adapter_base(adapter_dir: Path) -> str | None:
    """Base model of an adapter: simtune.json's absolute path, else PEFT's record."""
    base = _read_json(adapter_dir / "adapter_config.json", "--reward_model").get(
        "base_model_name_or_path"
    )
    meta = adapter_dir / "simtune.json"
    if meta.is_file():
        try:
            recorded = json.loads(meta.read_text(encoding="utf-8")).get("base_model", {})
            base = (recorded.get("path") if isinstance(recorded, dict) else None) or base
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    return base or None


def check_reward_model(path: str) -> None:
    """Fail fast (json files only, no weights) unless `path` is a sequence-classification
    checkpoint with one label or a SEQ_CLS LoRA adapter on an existing base."""
    p = Path(path).expanduser()
    not_rm = f"--reward_model: {path} is not a sequence-classification model"
    if not p.is_dir():
        raise ConfigError(f"{not_rm} (no such directory)")
    if (p / "adapter_config.json").is_file():
        task = _read_json(p / "adapter_config.json", "--reward_model").get("task_type")
        if task != "SEQ_CLS":
            raise ConfigError(
                f"{not_rm} (its adapter has task_type {task!r}, not 'SEQ_CLS'; train one with "
                "--tuning_mode reward)"
            )
        if not (p / "adapter_model.safetensors").is_file():
            raise ConfigError(f"--reward_model: {path} has no adapter_model.safetensors")
        base = _adapter_base(p)
        if not base:
            raise ConfigError(f"--reward_model: adapter {path} does not name its base model")
        bp = Path(base).expanduser()
        if bp.is_dir():
            if not (bp / "config.json").is_file():
                raise ConfigError(
                    f"--reward_model: base model {base} of adapter {path} has no config.json"
                )
        elif base.startswith((".", "/", "~")) or base.count("/") > 1:
            raise ConfigError(f"--reward_model: base model of adapter {path} is missing: {base}")
        return
    if not (p / "config.json").is_file():
        raise ConfigError(f"{not_rm} (no config.json or adapter_config.json)")
    cfg = _read_json(p / "config.json", "--reward_model")
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(
            f"{not_rm} (architectures {archs}; expected a *ForSequenceClassification model, "
            "e.g. one trained with --tuning_mode reward)"
        )
    labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 1
    if labels != 1:
        raise ConfigError(
            f"--reward_model: {path} has {labels} labels; a reward model has one output"
        )
    if not any(p.glob("*.safetensors")):
        raise ConfigError(
            f"--reward_model: {path} holds no *.safetensors weights (simtune loads safetensors only)"
        )


def reward_input_ids(
    tokenizer: Any,
    prompt: Messages | str,
    completion: str,
    max_length: int,
    system_prompt: str | None = None,
) -> tuple[list[int], bool]:
    """Token ids of chat-template(prompt + assistant completion), and whether it was cut.

    The reward head reads the last token, so a too-long text keeps its end: the prompt
    is cut from the left (as SFT does) and the answer survives."""
    messages = _as_messages(prompt)
    if system_prompt and (not messages or messages[0].get("role") != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    ids = list(
        tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": completion}],
            tokenize=True,
            return_dict=False,
        )
    )
    if len(ids) > max_length:
        return ids[len(ids) - max_length :], True
    return ids, False


class RewardModelScorer:
    """Scores with a sequence-classification model (num_labels=1): a full checkpoint or
    a SEQ_CLS LoRA adapter (as `--tuning_mode reward` writes it)."""

    def __init__(
        self,
        path: str,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        system_prompt: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        check_reward_model(path)
        import torch
        import transformers
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        p = Path(path).expanduser().resolve()
        self.name = str(p)
        self.batch_size = max(1, int(batch_size))
        meta_cfg: dict[str, Any] = {}
        if (p / "simtune.json").is_file():
            try:
                meta_cfg = json.loads((p / "simtune.json").read_text()).get("config") or {}
            except (OSError, json.JSONDecodeError, AttributeError):
                meta_cfg = {}
        # Score texts the way they were trained (simtune.json records the options).
        self.max_length = int(max_length or meta_cfg.get("max_length") or 1024)
        self.system_prompt = system_prompt or meta_cfg.get("system_prompt")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        is_adapter = (p / "adapter_config.json").is_file()
        base = _adapter_base(p) if is_adapter else str(p)
        assert base is not None  # check_reward_model made sure
        base_local = Path(base).expanduser().is_dir()
        tok_source = str(p) if (p / "tokenizer_config.json").is_file() else base
        self.tokenizer = AutoTokenizer.from_pretrained(
            tok_source,
            local_files_only=Path(tok_source).is_dir(),
            trust_remote_code=trust_remote_code,
        )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        verbosity = transformers.logging.get_verbosity()
        # Loading a causal base as a classifier "newly initialises" the score head that
        # the adapter then replaces: not worth a warning.
        transformers.logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                base,
                num_labels=1,
                pad_token_id=self.tokenizer.pad_token_id,
                use_safetensors=True,
                local_files_only=base_local,
                trust_remote_code=trust_remote_code,
                dtype=torch.float32,
            )
            if is_adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(p))
        except SimtuneError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"--reward_model: cannot load {path}: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            ) from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        self.model = model.to(self.device).eval()
        self._calls = 0
        self._samples = 0
        self._truncated = 0

    def score(
        self, prompts: list[Messages], completions: list[str], records: list[Decision]
    ) -> list[float]:
        import torch

        _check_lengths(prompts, completions)
        self._calls += 1
        pad = self.tokenizer.pad_token_id
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = []
            for prompt, completion in zip(
                prompts[start : start + self.batch_size],
                completions[start : start + self.batch_size],
                strict=True,
            ):
                ids, cut = reward_input_ids(
                    self.tokenizer, prompt, completion, self.max_length, self.system_prompt
                )
                self._truncated += cut
                batch.append(ids)
            width = max(len(ids) for ids in batch)
            # Right padding; the model finds each row's last non-pad token itself.
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            with torch.no_grad():
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits
            scores.extend(float(v) for v in logits[:, 0].float().cpu())
        self._samples += len(scores)
        return scores

    def stats(self) -> dict[str, float]:
        return {
            "calls": float(self._calls),
            "samples": float(self._samples),
            "truncated": float(self._truncated),
        }


# --- an LLM judge ------------------------------------------------------------------------

JUDGE_SYSTEM = (
    "You are a careful, strict evaluator of decisions made by an AI agent in a simulation."
)
JUDGE_TEMPLATE = """Rate the quality of the agent's answer to the prompt below: does it follow the \
instructions and the required format, is it consistent with the agent's situation, and is it a \
sensible decision?

[AGENT PROMPT]
{prompt}

[AGENT ANSWER]
{completion}

Give one or two sentences of reasoning, then end with a final line of the form "Score: N", \
where N is an integer from 1 (very poor) to 5 (excellent)."""

_SCORE_AFTER_WORD = re.compile(r"score[^0-9\n]{0,20}?(\d+)", re.IGNORECASE)
_LONE_DIGIT = re.compile(r"^\W*([1-5])\W*$")


def parse_judge_score(text: str) -> int | None:
    """The first integer 1-5 after 'score' (case-insensitive), or a lone digit; else None."""
    for match in _SCORE_AFTER_WORD.finditer(text):
        value = int(match.group(1))
        if 1 <= value <= 5:
            return value
    lone = _LONE_DIGIT.match(text.strip())
    return int(lone.group(1)) if lone else None


def check_judge(url: str, timeout: float = 10.0, api_key: str | None = None) -> None:
    """One `GET {url}/models` before training; raises SimtuneError naming --judge_url when
    the judge cannot be reached (no connection, timeout, 5xx) or rejects the key."""
    check_endpoint(url, "--judge_url", timeout=timeout, api_key=api_key, label="judge")


class JudgeReward:
    """Asks an OpenAI-compatible chat endpoint to rate each answer 1-5, mapped to
    [-1, 1] by (s - 3) / 2. Unparsable answers score 0.0 (neutral) and are counted.

    Transport failures (no connection, timeouts, HTTP 408, 409, 429, 5xx) are retried
    with jittered exponential backoff (`backoff * 2**attempt` seconds times a draw from
    [1/2, 1]) up to `max_retries` times, then raise. stats(): calls (requests that got an answer), retries, unparsable,
    failures (failed attempts)."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 30,
        max_retries: int = 3,
        *,
        backoff: float = 1.0,
        max_workers: int = 4,
        max_tokens: int = 256,
        temperature: float = 0.0,
    ) -> None:
        if not model or not str(model).strip():
            raise ConfigError("--judge_model: the judge's model name is required")
        self.client = ChatClient(
            url,
            model,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            what="--judge_url",
            label="judge",
        )
        self.base, self.model = self.client.base, model
        self.name = f"judge:{model}@{self.base}"
        self.max_workers = max(1, int(max_workers))
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self._lock = threading.Lock()
        self._unparsable = 0

    def messages(self, prompt: Messages | str, completion: str) -> Messages:
        text = (
            prompt
            if isinstance(prompt, str)
            else "\n\n".join(f"[{m.get('role', 'user')}]\n{m.get('content') or ''}" for m in prompt)
        )
        return [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(prompt=text, completion=completion)},
        ]

    def _ask(self, messages: Messages) -> str:
        try:
            return self.client.chat(
                messages, temperature=self.temperature, max_tokens=self.max_tokens
            )
        except LLMError as exc:
            raise RewardError(str(exc)) from None

    def _score_one(self, item: tuple[int, Messages | str, str]) -> float:
        i, prompt, completion = item
        text = self._ask(self.messages(prompt, completion))
        value = parse_judge_score(text)
        if value is None:
            with self._lock:
                self._unparsable += 1
            log.warning(
                "judge answer for sample %d has no score 1-5 (scored 0.0): %r", i, text[:200]
            )
            return 0.0
        return (value - 3) / 2

    def score(
        self, prompts: list[Messages], completions: list[str], records: list[Decision]
    ) -> list[float]:
        _check_lengths(prompts, completions)
        items = [(i, p, c) for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]
        if self.max_workers == 1 or len(items) <= 1:
            return [self._score_one(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items))) as pool:
            return list(pool.map(self._score_one, items))

    def stats(self) -> dict[str, float]:
        counts = self.client.stats()
        with self._lock:
            unparsable = float(self._unparsable)
        return {
            "calls": counts["calls"],
            "retries": counts["retries"],
            "unparsable": unparsable,
            "failures": counts["failures"],
        }


# --- from the job config -----------------------------------------------------------------

JUDGE_KEY_ENV = ("SIMTUNE_JUDGE_API_KEY", "OPENAI_API_KEY")


def resolve_reward_model(path: str, workspace: Path | None = None) -> str:
    """A directory as given, or a simtune model id under <workspace>/models/."""
    p = Path(path).expanduser()
    if not p.exists() and workspace is not None and re.fullmatch(r"[\w.-]+", path):
        candidate = workspace / "models" / path
        if candidate.is_dir():
            return str(candidate)
    return str(p)


def make_reward_source(cfg: Any) -> RewardSource:
    """The online reward source the config names (exactly one of --reward_fn,
    --reward_model, --judge_url; config.validate checks that), checked fail-fast.

    The judge's API key comes from $SIMTUNE_JUDGE_API_KEY, else $OPENAI_API_KEY."""
    if getattr(cfg, "reward_fn", None):
        return FunctionReward(load_reward_fn(cfg.reward_fn), cfg.reward_fn)
    if getattr(cfg, "reward_model", None):
        path = resolve_reward_model(cfg.reward_model, cfg.workspace_path())
        check_reward_model(path)
        return RewardModelScorer(path, trust_remote_code=bool(cfg.trust_remote_code))
    if getattr(cfg, "judge_url", None):
        api_key = next((os.environ[k] for k in JUDGE_KEY_ENV if os.environ.get(k)), None)
        timeout = float(getattr(cfg, "judge_timeout", 30.0))
        check_judge(cfg.judge_url, timeout=min(timeout, 10.0), api_key=api_key)
        return JudgeReward(
            cfg.judge_url,
            getattr(cfg, "judge_model", None) or "",
            api_key=api_key,
            timeout=timeout,
            max_retries=int(getattr(cfg, "judge_max_retries", 3)),
        )
    raise ConfigError(
        "--rollout online needs a reward source: --reward_fn, --reward_model or --judge_url"
    )
