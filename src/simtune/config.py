"""Typed job configuration: the single source of truth for every option.

Each field's docstring (the string literal right below it) is its documentation: the
CLI turns it into ``--help`` text, and the resolved config is saved beside every model
(``simtune.json``) and logged to MLflow as params. Option names follow Hugging Face /
TRL / PEFT where a name exists, so YAML files and habits carry over.

Nothing heavy is imported here: the CLI builds its parser from this module on every
start, and ``simtune --help`` must answer in well under a second.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simtune.errors import ConfigError

TUNING_MODES = ("sft", "ppo", "reward")
ROLLOUTS = ("offline", "online")
NORMALISATIONS = ("zscore", "minmax", "none")
KL_ESTIMATORS = ("k1", "k3", "abs")
PPO_REFERENCES = ("init", "base")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


@dataclass
class TuningConfig:
    """Everything one `simtune train` job needs; every field is a CLI flag and a YAML key."""

    # --- job -------------------------------------------------------------------------
    tuning_mode: str = "sft"
    """Training method: 'sft' imitates the logged (or refined) decisions; 'ppo' prefers
    decisions that earned reward; 'reward' trains a reward model on rated decisions."""

    llm_path: str | None = None
    """Base model: a local Hugging Face model directory, a GGUF file (llama.cpp/Ollama;
    dequantized once into <workspace>/cache/models/<sha256>/, which adapters then name as
    their base), a hub id (needs network), a LoRA adapter directory (training continues
    from it), or a simtune model id from models/."""

    dataset_path: list[str] = field(default_factory=list)
    """Decision files (.jsonl or JSON list) or directories (all decisions_*.json[l] in
    them, recursively); several may be given."""

    env: str | None = None
    """Simulation environment name: with no --dataset_path, train on its datasets folder
    <workspace>/envs/<env>/datasets (YuLan-OneSim's and simtune's layout)."""

    workspace: str | None = None
    """Workspace root holding models/, envs/ and the embedded MLflow store (default:
    $SIMTUNE_HOME, else the current directory)."""

    output_dir: str | None = None
    """Where the finished adapter goes (default: <workspace>/models/<model_id>)."""

    experiment_name: str = "llm_tuning"
    """MLflow experiment the run is logged to."""

    tracking_uri: str | None = None
    """MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the embedded
    sqlite:///<workspace>/mlflow.db)."""

    run_name: str | None = None
    """MLflow run name (default: the model id)."""

    registered_model_name: str | None = None
    """Name in the MLflow Model Registry (default: <experiment_name>-<tuning_mode>)."""

    devices: str | None = None
    """CUDA devices to use, e.g. '0' or '0,1' (sets CUDA_VISIBLE_DEVICES); CPU is used
    when no GPU is present."""

    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code (off: only trust what you
    read)."""

    # --- several processes (data-parallel) ---------------------------------------------
    nproc: int | None = None
    """Training processes on this node, data-parallel through torchrun (default: one
    per --devices entry, else 1). The global batch is per_device_train_batch_size x
    processes x gradient_accumulation_steps. Without a GPU the processes use the gloo
    backend on CPU. Only rank 0 logs to MLflow, writes the model and registers it."""

    nnodes: int = 1
    """Nodes taking part (torchrun --nnodes): run the same command on every node, each
    with its own --node_rank and the same --master_addr/--master_port and workspace."""

    node_rank: int = 0
    """This node's rank among --nnodes (torchrun --node_rank); 0 is the master."""

    master_addr: str = "127.0.0.1"
    """Address of the node with --node_rank 0 (torchrun --master_addr)."""

    master_port: int = 0
    """Rendezvous port on the master node (torchrun --master_port; 0: a free port on a
    single node, 29500 with several nodes)."""

    accelerate_config: str | None = None
    """Launch with `accelerate launch --config_file FILE` instead of torchrun, so the
    file's settings (DeepSpeed, FSDP, mixed precision, num_processes) apply to
    SFT, reward-model training and PPO alike."""

    device_map: str | None = None
    """'auto': load the base model sharded layer by layer over all visible GPUs (and CPU
    memory past them) through accelerate, in one process -- for SFT of a model larger
    than one GPU (YuLan-OneSim loads its 14B models so). Use
    it when the model does not fit one GPU and speed matters less than simplicity (the
    GPUs take turns); use --nproc or --devices (data parallel) when it fits one GPU, and FSDP
    or DeepSpeed ZeRO-3 through --accelerate_config / --deepspeed when it does not and
    every GPU should compute at once."""

    deepspeed: str | None = None
    """DeepSpeed JSON config for SFT and reward-model training (the Hugging Face
    Trainer's --deepspeed; needs the deepspeed package). For PPO put DeepSpeed in an
    --accelerate_config instead."""

    # --- data ------------------------------------------------------------------------
    min_rating: float | None = None
    """Keep only decisions rated at least this (unrated decisions are dropped when set)."""

    min_reward: float | None = None
    """Keep only decisions whose reward is at least this (decisions without reward are
    dropped when set)."""

    agent_types: list[str] = field(default_factory=list)
    """Keep only decisions of these agent types (default: all)."""

    system_prompt: str | None = None
    """System message put before each prompt that has none."""

    unfence_outputs: bool = False
    """Train on the answer inside a markdown code fence (```json ... ```) instead of
    the answer as the simulation produced it. Off by default: simulators whose parser
    needs the fence (YuLan-OneSim's JsonBlockParser) must keep getting it; turn on when
    the fence was only the model's habit and nothing parses it."""

    max_samples: int | None = None
    """Use at most this many training examples (a quick dry run on a subset)."""

    # --- optimisation (Hugging Face TrainingArguments names) ---------------------------
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""

    num_train_epochs: float = 3.0
    """Passes over the training set (ignored when max_steps > 0)."""

    max_steps: int = -1
    """Total optimizer steps; overrides num_train_epochs when > 0 (-1: train
    num_train_epochs)."""

    per_device_train_batch_size: int = 4
    """Examples per device per forward pass."""

    gradient_accumulation_steps: int = 1
    """Forward passes accumulated into one optimizer step."""

    max_length: int = 1024
    """Longest tokenized example; longer prompts are cut from the left so the answer
    (what the loss is on) survives, with a warning counting them. Simulation prompts can
    be long (YuLan-OneSim trains with 8192): raise it when the warning appears."""

    warmup_ratio: float = 0.03
    """Fraction of steps spent warming the learning rate up."""

    lr_scheduler_type: str = "cosine"
    """Learning-rate schedule: linear, cosine, cosine_with_restarts, polynomial,
    constant or constant_with_warmup."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    max_grad_norm: float = 1.0
    """Gradient clipping norm."""

    logging_steps: int = 1
    """Log metrics every N optimizer steps."""

    save_steps: int = 0
    """Save a resumable checkpoint (adapter, optimizer, scheduler, RNG; PPO also value
    head and KL controller) every N steps under <workspace>/jobs/<model_id>/checkpoints
    (0: none, except the one SIGTERM/Ctrl-C saves). Removed when the job succeeds."""

    resume: bool = False
    """Continue the most recent interrupted job with the same --tuning_mode, --llm_path,
    --dataset_path and --output_dir from its latest checkpoint, in the same MLflow run
    (also after SIGKILL: from the last checkpoint written); fails if there is none."""

    resume_from: str | None = None
    """Continue from this checkpoint directory (.../checkpoint-<step>), or from the
    latest checkpoint of a job directory <workspace>/jobs/<model_id>."""

    seed: int = 42
    """Random seed for data order, LoRA init and dropout."""

    precision: str = "auto"
    """Precision of the base model's weights and matmuls: 'auto' picks bf16 where the
    hardware does it fast (a CUDA GPU with bf16, or a CPU with AMX/AVX512-BF16) and fp32
    elsewhere; or bf16, fp16 (CUDA only) or fp32. LoRA weights and optimizer state stay
    fp32 in every case. The choice and its reason are logged and saved in simtune.json."""

    bf16: bool = False
    """Same as --precision bf16 (bfloat16 mixed precision; on CPU too)."""

    fp16: bool = False
    """Same as --precision fp16 (float16 mixed precision; CUDA only)."""

    gradient_checkpointing: bool = False
    """Trade compute for memory by recomputing activations."""

    padding_free: bool = False
    """Concatenate a batch without padding (needs a flash-attention model on GPU)."""

    # --- LoRA (PEFT names) -------------------------------------------------------------
    lora_r: int = 16
    """LoRA rank."""

    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""

    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""

    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: names such as q_proj v_proj, or 'all-linear'."""

    # --- PPO (TRL names) ---------------------------------------------------------------
    rollout: str = "offline"
    """PPO rollouts: 'offline' scores the logged outputs with their reward/rating;
    'online' generates answers with the policy and scores them with a reward source."""

    score_normalization: str = "zscore"
    """How scores are normalised: zscore, minmax (to [-1, 1]) or none. Offline PPO and
    reward models: the logged rewards/ratings over the whole dataset; online PPO: each
    rollout's scores by the running statistics of all scores so far, so the KL penalty
    weighs the same against rewards of any scale."""

    reward_fn: str | None = None
    """Online reward: a Python function 'module:function' or 'file.py:function' called
    with prompt, completion and record, returning a float."""

    reward_model: str | None = None
    """Online reward: a sequence-classification checkpoint or a simtune reward model
    (--tuning_mode reward)."""

    judge_url: str | None = None
    """Online reward: base URL of an OpenAI-compatible endpoint asked to score 1-5."""

    judge_model: str | None = None
    """Model name sent to --judge_url."""

    judge_timeout: float = 30.0
    """Seconds to wait for one judge answer."""

    judge_max_retries: int = 3
    """Retries for judge calls that fail in transport (with exponential backoff)."""

    ppo_epochs: int = 4
    """Optimisation passes over each rollout batch."""

    num_mini_batches: int = 1
    """Minibatches per rollout batch (one optimizer step each)."""

    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty to the reference policy (--ppo_reference)."""

    ppo_reference: str = "init"
    """What the KL penalty pulls toward: 'init', the policy PPO starts from (the adapter of
    --llm_path when it is one, as a frozen copy; else the base model), or 'base', the base
    model with the adapter disabled."""

    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al. 2019) instead of keeping it fixed."""

    target_kl: float = 6.0
    """KL the adaptive controller aims for (per sequence)."""

    kl_horizon: int = 10000
    """Adaptive KL controller horizon, in samples."""

    kl_estimator: str = "k1"
    """Per-token KL estimate in the reward: k1 (log ratio), k3 (always >= 0) or abs."""

    cliprange: float = 0.2
    """PPO policy ratio clip range."""

    cliprange_value: float = 0.2
    """Value function clip range."""

    vf_coef: float = 0.1
    """Weight of the value loss."""

    gamma: float = 1.0
    """Discount factor of GAE."""

    lam: float = 0.95
    """lambda of GAE."""

    whiten_advantages: bool = True
    """Normalise advantages to mean 0, variance 1 per rollout batch."""

    max_new_tokens: int = 64
    """Online rollouts: most tokens generated per answer (an answer ends earlier at any of
    the model's stop tokens)."""

    temperature: float = 1.0
    """Online rollouts: sampling temperature; PPO's log-probs (policy and reference) use the
    same temperature."""

    top_p: float = 1.0
    """Online rollouts: nucleus sampling threshold (1: off); the policy's log-probs use the
    same truncated distribution."""

    top_k: int = 0
    """Online rollouts: sample among the k most likely tokens only (0: off, the whole
    vocabulary); the policy's log-probs use the same truncated distribution. The model's
    own generation_config is never used for rollouts."""

    def validate(self) -> TuningConfig:
        """Check values without touching the disk's models or importing torch."""
        if self.tuning_mode not in TUNING_MODES:
            raise ConfigError(
                f"--tuning_mode: unknown mode {self.tuning_mode!r} (choose from {', '.join(TUNING_MODES)})"
            )
        choices = (
            ("rollout", ROLLOUTS),
            ("score_normalization", NORMALISATIONS),
            ("kl_estimator", KL_ESTIMATORS),
            ("ppo_reference", PPO_REFERENCES),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"--{name}: unknown value {getattr(self, name)!r} (choose from {', '.join(allowed)})"
                )
        if self.tuning_mode == "ppo" and self.rollout == "online":
            sources = [n for n in ("reward_fn", "reward_model", "judge_url") if getattr(self, n)]
            if len(sources) != 1:
                raise ConfigError(
                    "--rollout online needs exactly one reward source: --reward_fn, --reward_model "
                    f"or --judge_url (got {', '.join('--' + s for s in sources) or 'none'})"
                )
            if self.judge_url and not self.judge_model:
                raise ConfigError("--judge_model is required with --judge_url")
        if not self.llm_path:
            raise ConfigError("--llm_path is required (a model directory, adapter or model id)")
        if self.device_map is not None:
            if self.device_map != "auto":
                raise ConfigError(
                    f"--device_map: only 'auto' is supported, got {self.device_map!r}"
                )
            if self.tuning_mode != "sft":
                raise ConfigError(
                    "--device_map auto: SFT only; for PPO or a reward model larger than one "
                    "GPU use FSDP through --accelerate_config"
                )
            if self.distributed() or self.deepspeed:
                raise ConfigError(
                    "--device_map auto shards one process's model over the GPUs; it cannot "
                    "be combined with --nproc/--devices (several)/--nnodes/--accelerate_config/--deepspeed"
                )
        if not self.dataset_path and self.env:
            from simtune.util import check_name

            folder = self.workspace_path() / "envs" / check_name(self.env, "--env") / "datasets"
            self.dataset_path = [str(folder)]
        if not self.dataset_path:
            raise ConfigError(
                "--dataset_path is required (one or more files or directories), or --env NAME "
                "for <workspace>/envs/NAME/datasets"
            )
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ConfigError(
                f"--lr_scheduler_type: unknown schedule {self.lr_scheduler_type!r} "
                f"(choose from {', '.join(LR_SCHEDULERS)})"
            )
        positive = (
            "ppo_epochs",
            "num_mini_batches",
            "max_new_tokens",
            "temperature",
            "top_p",
            "judge_timeout",
            "kl_horizon",
            "target_kl",
            "cliprange",
            "cliprange_value",
            "learning_rate",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "lora_r",
            "lora_alpha",
            "logging_steps",
            "max_grad_norm",
        )
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name}: must be a positive number, got {value!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(
                f"--max_steps: must be a positive number of steps (or -1: train "
                f"--num_train_epochs), got {self.max_steps!r}"
            )
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed: must be in [0, 2**32), got {self.seed!r}")
        if self.max_steps <= 0 and not (
            math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0
        ):
            raise ConfigError(
                "--num_train_epochs: must be a finite number > 0 (or set --max_steps)"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight_decay: must be >= 0, got {self.weight_decay!r}")
        for name in ("min_rating", "min_reward"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"--{name}: must be a finite number, got {value!r}")
        for name in ("kl_coef", "vf_coef", "judge_max_retries"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name}: must be >= 0, got {value!r}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name}: must be in [0, 1], got {getattr(self, name)!r}")
        if self.top_p > 1.0:
            raise ConfigError(f"--top_p: must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ConfigError(f"--top_k: must be >= 0 (0: off), got {self.top_k!r}")
        for name in ("warmup_ratio", "lora_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"--{name}: must be in [0, 1), got {value!r}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ConfigError(f"--max_samples: must be positive, got {self.max_samples!r}")
        if self.save_steps < 0:
            raise ConfigError(f"--save_steps: must be >= 0, got {self.save_steps!r}")
        if self.resume and self.resume_from:
            raise ConfigError("--resume and --resume_from exclude each other")
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 exclude each other")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision: unknown value {self.precision!r} (choose from {', '.join(PRECISIONS)})"
            )
        for flag in ("bf16", "fp16"):
            if getattr(self, flag) and self.precision not in ("auto", flag):
                raise ConfigError(f"--{flag} contradicts --precision {self.precision}")
        if self.devices is not None:
            parts = [p.strip() for p in self.devices.split(",")]
            if not all(p.isdigit() for p in parts):
                raise ConfigError(
                    f"--devices: expected GPU indices like '0' or '0,1', got {self.devices!r}"
                )
        self._check_launch()
        for name in ("experiment_name", "registered_model_name", "run_name"):
            check_mlflow_name(getattr(self, name), f"--{name}")
        return self

    def _check_launch(self) -> None:
        devices = self.devices.split(",") if self.devices else []
        if self.nproc is not None and self.nproc < 1:
            raise ConfigError(f"--nproc: must be >= 1, got {self.nproc!r}")
        if self.nproc is not None and len(devices) > 1 and self.nproc != len(devices):
            raise ConfigError(
                f"--nproc {self.nproc} does not match --devices {self.devices!r} "
                f"({len(devices)} devices: one process each)"
            )
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes: must be >= 1, got {self.nnodes!r}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(
                f"--node_rank: must be in [0, --nnodes), got {self.node_rank!r} "
                f"with --nnodes {self.nnodes}"
            )
        if not 0 <= self.master_port <= 65535:
            raise ConfigError(f"--master_port: must be a port number, got {self.master_port!r}")
        if not str(self.master_addr).strip():
            raise ConfigError("--master_addr: must not be empty")
        for name in ("accelerate_config", "deepspeed"):
            value = getattr(self, name)
            if value is not None and not Path(value).expanduser().is_file():
                raise ConfigError(f"--{name}: {value} is not a file")
        if self.deepspeed and self.tuning_mode == "ppo":
            raise ConfigError(
                "--deepspeed applies to SFT and reward-model training; for PPO put the "
                "DeepSpeed settings in an --accelerate_config file"
            )

    def requested_precision(self) -> str:
        """--precision with the --bf16/--fp16 flags folded in: 'auto', 'bf16', 'fp16' or
        'fp32' (what `simtune.training.model.resolve_precision` takes)."""
        if self.bf16:
            return "bf16"
        if self.fp16:
            return "fp16"
        return self.precision

    def processes(self) -> int:
        """Processes on this node: --nproc, else one per --devices entry, else 1."""
        if self.nproc is not None:
            return self.nproc
        return len(self.devices.split(",")) if self.devices else 1

    def distributed(self) -> bool:
        """Whether this job runs as several processes (launched by simtune)."""
        return self.processes() > 1 or self.nnodes > 1 or self.accelerate_config is not None

    def workspace_path(self) -> Path:
        return resolve_workspace(self.workspace)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_workspace(workspace: str | os.PathLike[str] | None = None) -> Path:
    """The workspace root, absolute: `workspace`, else $SIMTUNE_HOME, else the current
    directory. Every command and API that takes a workspace resolves it here."""
    return Path(workspace or os.environ.get("SIMTUNE_HOME") or os.getcwd()).resolve()


@functools.cache
def field_docs(cls: type = TuningConfig) -> dict[str, str]:
    """Map field name -> its docstring, read from the class source (litgpt style)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.cache
def field_types(cls: type = TuningConfig) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, is_list) of an annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return base_type(args[0])
    return tp, False


def coerce(name: str, value: Any, *, source: str = "") -> Any:
    """Convert a YAML/CLI/keyword value to the field's type, or raise naming the option."""
    where = f"{source}: " if source else ""
    annotation = field_types()[name]
    tp, is_list = base_type(annotation)
    if value is None:
        if is_list:
            return []
        if type(None) not in typing.get_args(annotation):
            raise ConfigError(f"{where}--{name}: needs a value (got null/empty)")
        return None
    if is_list:
        items = value if isinstance(value, (list, tuple)) else [value]
        out: list[Any] = []
        for item in items:
            # "q_proj,v_proj" and ["q_proj", "v_proj"] both work.
            parts = str(item).split(",") if isinstance(item, str) else [item]
            out.extend(
                coerce_scalar(name, tp, p.strip() if isinstance(p, str) else p, where)
                for p in parts
                if not (isinstance(p, str) and not p.strip())
            )
        return out
    return coerce_scalar(name, tp, value, where)


def coerce_scalar(name: str, tp: type, value: Any, where: str) -> Any:
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}--{name}: expected {tp.__name__}, got {value!r}") from None
    return value


def load_yaml(path: str) -> dict[str, Any]:
    import yaml  # small; only needed with --config

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return data


_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f\\]|(^|/)\.\.?(/|$)")


def check_mlflow_name(value: str | None, flag: str) -> None:
    """An MLflow experiment, registered-model or run name: refused before any work when
    empty, holding control characters or backslashes, or with a '.'/'..' path segment
    (MLflow turns experiment and model names into artifact paths, and a traversal there
    failed only after training). A registered model name also may not hold '/' or ':'
    (it is one segment of `models:/<name>/<version>`)."""
    if value is None:
        return
    if not str(value).strip():
        raise ConfigError(f"{flag}: must not be empty")
    if value != value.strip() or _UNSAFE_NAME.search(value):
        raise ConfigError(
            f"{flag}: {value!r} is not a usable name (no leading/trailing spaces, control "
            "characters, backslashes or '.'/'..' path segments)"
        )
    if flag == "--registered_model_name" and any(c in value for c in "/:"):
        raise ConfigError(f"{flag}: {value!r} may not contain '/' or ':'")


def build_config(
    yaml_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    base: TuningConfig | None = None,
) -> TuningConfig:
    """Defaults < YAML file < overrides (CLI flags or run_tuning keywords), then validate."""
    cfg = dataclasses.replace(base) if base is not None else TuningConfig()
    known = {f.name for f in dataclasses.fields(TuningConfig)}
    layers: list[tuple[str, dict[str, Any]]] = []
    if yaml_path:
        layers.append((yaml_path, load_yaml(yaml_path)))
    if overrides:
        layers.append(("", overrides))
    for source, layer in layers:
        for raw_key, value in layer.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                where = f"{source}: " if source else ""
                hint = _closest(key, known)
                raise ConfigError(f"{where}unknown option {raw_key!r}{hint}")
            setattr(cfg, key, coerce(key, value, source=source))
    return cfg.validate()


def _closest(key: str, known: set[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean --{match[0]}?)" if match else ""
