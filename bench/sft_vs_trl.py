"""Benchmark: simtune SFT vs. a plain TRL SFTTrainer script, same model/data/hyper-parameters.

What is compared
    simtune: ``simtune.run_tuning(...)`` -- reads the decision file, tokenizes it itself,
        trains LoRA with TRL's SFTTrainer, logs every step to an embedded MLflow sqlite
        store and registers the adapter in the MLflow Model Registry.
    trl: what a TRL user writes by hand -- ``Dataset.from_list`` of conversational
        prompt/completion rows, ``SFTConfig`` + ``LoraConfig``, ``SFTTrainer(...).train()``
        and ``trainer.save_model()``. It does not import anything from simtune's training
        code; only the hyper-parameter *values* are copied from simtune's defaults.

Metrics (median over ``--runs`` runs per side, each run in a fresh Python process)
    tokens/s    trained tokens / ``train_runtime``. ``train_runtime`` is the Trainer's own
                timer around the training loop only (no imports, model load, MLflow
                setup or registration). Trained tokens is the SFTTrainer's cumulative
                ``num_tokens`` (non-padding tokens fed), read from the trainer logs on
                both sides (simtune: the MLflow metric ``train/num_tokens``), so both
                sides count the same way.
    tokens per CPU-second
                the same tokens / process CPU time (all threads, MLflow's async logger
                included) in ``Trainer._inner_training_loop``; steadier than wall time
                when other work shares the machine.
    peak RSS    ``ru_maxrss`` of the worker process (whole process lifetime).
    end-to-end  wall time of the worker process, start to exit, as measured by the parent.

Runs alternate simtune, trl, trl, simtune, ... so slow drift of the machine (thermal,
other load) hits both sides alike.

simtune's MLflow store is, by default, a copy of an already-migrated one (a workspace
used before); ``--store fresh`` makes every simtune run create it (schema migrations).

Usage
    .venv/bin/python bench/sft_vs_trl.py --runs 5
    .venv/bin/python bench/sft_vs_trl.py --runs 3 --store fresh --out /tmp/bench
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

from harness import (
    SAMPLE,
    make_data,
    make_store,
    order,
    peak_rss_mib,
    run_worker,
    versions,
    warm_caches,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SIDES = ("simtune", "trl")

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


def _set_threads(n: int) -> None:
    import torch

    # Same intra-op thread count on both sides, pinned so the comparison does not depend
    # on the environment (OMP_NUM_THREADS is set to the same value by the parent).
    torch.set_num_threads(n)


def _time_train(box: dict[str, float]) -> None:
    """Record the process CPU time spent in the Trainer's training loop, on both sides alike.

    On a shared machine wall time swings with other load; CPU time of the process
    (all its threads, including MLflow's async logging thread) swings much less and is
    the honest cost of a token. `_inner_training_loop` is what `train_runtime` times
    (plus optimizer/dataloader setup); the same transformers method is wrapped in both
    workers, so neither side is measured differently."""
    from transformers import Trainer

    original = Trainer._inner_training_loop

    def loop(self: Any, *args: Any, **kwargs: Any) -> Any:
        cpu0 = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            box["train_cpu_s"] = time.process_time() - cpu0

    Trainer._inner_training_loop = loop  # type: ignore[method-assign]


def worker_simtune(a: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    _set_threads(a.threads)
    import mlflow

    import simtune

    t_import = time.perf_counter() - t0
    box: dict[str, float] = {}
    _time_train(box)
    result = simtune.run_tuning(
        llm_path=a.model,
        dataset_path=[a.data],
        workspace=a.workdir,
        max_steps=a.steps,
        per_device_train_batch_size=HP["per_device_train_batch_size"],
        learning_rate=HP["learning_rate"],
        seed=HP["seed"],
        logging_steps=HP["logging_steps"],
    )
    # The trainer's cumulative token counter, as simtune's callback logged it to MLflow.
    history = mlflow.MlflowClient(result.tracking_uri).get_metric_history(
        result.run_id, "train/num_tokens"
    )
    return {
        "import_s": t_import,
        "train_runtime_s": result.metrics["train_runtime"],
        "num_tokens": max(m.value for m in history),
        "num_log_points": len(history),
        "train_loss": result.metrics["train_loss"],
        "global_step": result.metrics["global_step"],
        "dataset_tokens_per_epoch": result.dataset.get("num_tokens"),
        **box,
    }


def worker_trl(a: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    _set_threads(a.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    t_import = time.perf_counter() - t0
    box: dict[str, float] = {}
    _time_train(box)

    class TokenCounter(TrainerCallback):
        """Keeps the trainer's cumulative `num_tokens` log, like simtune's MLflow callback."""

        def __init__(self) -> None:
            self.values: list[float] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "num_tokens" in logs:
                self.values.append(float(logs["num_tokens"]))

    # The plain way: conversational prompt/completion rows; TRL tokenizes them.
    rows = []
    with open(a.data, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                rows.append(
                    {
                        "prompt": [{"role": "user", "content": rec["prompt"]}],
                        "completion": [{"role": "assistant", "content": rec["output"]}],
                    }
                )
    train = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
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
        # TRL's SFTConfig turns bf16 on by default, which fails on a CPU without bf16
        # support; simtune's default is fp32 (bf16=False) too.
        bf16=False,
        # No mid-run checkpoints (simtune's default save_steps=0); the adapter is saved
        # once after training, below.
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
    counter = TokenCounter()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[counter],
    )
    out = trainer.train()
    trainer.save_model(str(Path(a.workdir) / "adapter"))
    return {
        "import_s": t_import,
        "train_runtime_s": float(out.metrics["train_runtime"]),
        "num_tokens": max(counter.values),
        "num_log_points": len(counter.values),
        "train_loss": float(out.training_loss),
        "global_step": float(out.global_step),
        **box,
    }


def worker_main(a: argparse.Namespace) -> None:
    fn = worker_simtune if a.worker == "simtune" else worker_trl
    res = fn(a)
    res["peak_rss_mib"] = peak_rss_mib()
    res["tokens_per_s"] = res["num_tokens"] / res["train_runtime_s"]
    res["tokens_per_cpu_s"] = res["num_tokens"] / res["train_cpu_s"]
    # Last stdout line is the result; the trainer prints its own logs before it.
    print(json.dumps(res), flush=True)


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


def summarise(results: list[dict]) -> dict[str, dict[str, float]]:
    keys = (
        "tokens_per_s",
        "tokens_per_cpu_s",
        "peak_rss_mib",
        "end_to_end_s",
        "train_runtime_s",
        "train_cpu_s",
    )
    med: dict[str, dict[str, float]] = {}
    for side in SIDES:
        rows = [r for r in results if r["side"] == side]
        med[side] = {k: statistics.median(r[k] for r in rows) for k in keys}
        med[side]["non_training_s"] = statistics.median(
            r["end_to_end_s"] - r["train_runtime_s"] for r in rows
        )
    return med


def markdown(med: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    s, t = med["simtune"], med["trl"]
    rows = [
        ("Throughput (tokens/s, training loop)", "tokens_per_s", "{:,.0f}"),
        ("Throughput (tokens per CPU-second, training)", "tokens_per_cpu_s", "{:,.0f}"),
        ("Peak RSS (MiB)", "peak_rss_mib", "{:,.0f}"),
        ("End-to-end wall time (s)", "end_to_end_s", "{:.2f}"),
        ("  of which training loop (s)", "train_runtime_s", "{:.2f}"),
        ("  of which everything else (s)", "non_training_s", "{:.2f}"),
    ]
    out = [
        f"## simtune SFT vs plain TRL SFTTrainer ({meta['date']})",
        "",
        f"Medians of {meta['runs']} runs per side, each in a fresh process; "
        f"{meta['steps']} optimizer steps, batch {HP['per_device_train_batch_size']}, "
        f"{meta['records']} records, tiny random Llama (CPU, torch threads: {meta['threads']}); "
        f"simtune's MLflow store: {meta['store']}.",
        "",
        "| metric | simtune | plain TRL | simtune / TRL |",
        "|---|---:|---:|---:|",
    ]
    for label, key, fmt in rows:
        ratio = s[key] / t[key] if t[key] else float("nan")
        out.append(f"| {label} | {fmt.format(s[key])} | {fmt.format(t[key])} | {ratio:.3f}x |")
    m = meta["machine"]
    out += [
        "",
        f"Same training on both sides: tokens {meta['check']['num_tokens']}, "
        f"final train_loss simtune {meta['check']['loss_simtune']:.6f} vs "
        f"TRL {meta['check']['loss_trl']:.6f}.",
        "",
        f"1-minute load average seen around the runs: {meta['loadavg_1m'][0]:.1f} to "
        f"{meta['loadavg_1m'][1]:.1f} (the machine has {meta['machine']['cpu_count']} CPUs).",
        "",
        f"Machine: {m['cpu_count']} CPUs, {m['platform']}, Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    return "\n".join(out)


def parent_main(a: argparse.Namespace) -> None:
    check_defaults()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="simtune-bench-") as tmp_s:
        tmp = Path(tmp_s)
        from simtune.testing import make_tiny_model

        model = make_tiny_model(tmp / "tiny-model")
        data = tmp / "decisions_bench.jsonl"
        n_records = make_data(SAMPLE, data, a.copies)
        warm_caches(a.threads)
        store = tmp / "store" / "mlflow.db"
        if a.store == "existing":
            store.parent.mkdir()
            make_store(store, a.threads)

        results: list[dict] = []
        for i, side in enumerate(order(list(SIDES), a.runs)):
            # A fresh workspace per run so runs don't see each other's models; with
            # --store existing it starts with an already-migrated MLflow store.
            workdir = tmp / f"run-{i}-{side}"
            workdir.mkdir()
            if side == "simtune" and a.store == "existing":
                shutil.copyfile(store, workdir / "mlflow.db")
            worker_args = ["--model", str(model), "--data", str(data), "--workdir", str(workdir)]
            worker_args += ["--steps", str(a.steps), "--threads", str(a.threads)]
            res = run_worker(__file__, side, a.threads, worker_args)
            results.append(res)
            print(
                f"[{i + 1}/{2 * a.runs}] {side:8s} {res['tokens_per_s']:6,.0f} tok/s "
                f"{res['tokens_per_cpu_s']:6,.0f} tok/cpu-s  "
                f"train {res['train_runtime_s']:5.2f}s  e2e {res['end_to_end_s']:5.2f}s  "
                f"rss {res['peak_rss_mib']:6.0f} MiB  loss {res['train_loss']:.6f}  "
                f"load {res['loadavg_1m_before']:.1f}->{res['loadavg_1m_after']:.1f}",
                flush=True,
            )

    med = summarise(results)
    tokens = sorted({r["num_tokens"] for r in results})
    losses = {
        side: statistics.median(r["train_loss"] for r in results if r["side"] == side)
        for side in SIDES
    }
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "runs": a.runs,
        "steps": a.steps,
        "threads": a.threads,
        "store": a.store,
        "records": n_records,
        "command": " ".join([".venv/bin/python", "bench/sft_vs_trl.py", *sys.argv[1:]]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "versions": versions(),
        "hyper_parameters": HP,
        "loadavg_1m": [
            min(min(r["loadavg_1m_before"], r["loadavg_1m_after"]) for r in results),
            max(max(r["loadavg_1m_before"], r["loadavg_1m_after"]) for r in results),
        ],
        "check": {
            "num_tokens": int(tokens[0]) if len(tokens) == 1 else tokens,
            "loss_simtune": losses["simtune"],
            "loss_trl": losses["trl"],
        },
    }
    if len(tokens) != 1:
        print(f"WARNING: the sides trained on different token counts: {tokens}", flush=True)
    md = markdown(med, meta)
    print()
    print(md)
    (a.out / "sft_vs_trl.md").write_text(md, encoding="utf-8")
    (a.out / "sft_vs_trl.json").write_text(
        json.dumps({"meta": meta, "medians": med, "runs": results}, indent=2), encoding="utf-8"
    )
    print(f"wrote {a.out / 'sft_vs_trl.md'} and {a.out / 'sft_vs_trl.json'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="measured runs per side (default 5)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument(
        "--store",
        choices=("existing", "fresh"),
        default="existing",
        help="simtune's MLflow store: 'existing' (a workspace already used before, default) "
        "or 'fresh' (first job in a new workspace: pays the store's schema migrations)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="directory for sft_vs_trl.md/.json (default bench/results)",
    )
    p.add_argument("--copies", type=int, default=8, help="times the 48-record sample is repeated")
    # 1 thread by default: with 2 OpenMP threads on a 2-core machine, any other load
    # makes the threads spin-wait for each other (measured: 20x slower steps at load 4),
    # which swamps what this benchmark is after.
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    # Internal: one measured run in this (fresh) process.
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker_main(a)
    else:
        parent_main(a)


if __name__ == "__main__":
    main()
