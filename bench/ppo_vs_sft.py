"""Benchmark: simtune's offline PPO vs. simtune's SFT, same tiny model, data and batch size.

What is compared (both through ``simtune.run_tuning``, each run in a fresh process)
    sft     ``tuning_mode="sft"``: TRL's SFTTrainer, LoRA, batch B, ``max_steps`` N.
    ppo     ``tuning_mode="ppo"`` (offline rollouts from the logged rewards) configured so
            that one rollout is one optimizer step on the same B samples:
            ``ppo_epochs=1, num_mini_batches=1, gradient_accumulation_steps=1``,
            ``per_device_train_batch_size`` B, ``max_steps`` N rollouts.
    ppo4    the same with PPO's default ``ppo_epochs=4``: 4 optimizer steps per rollout
            (throughput and memory of the default recipe; ``--sides sft,ppo`` skips it).

A PPO step *includes* its rollout: the two no-grad passes over the batch (policy with the
value head, and the reference = the base with the adapter disabled), the KL-shaped
rewards and GAE, then the forward/backward with gradients and the optimizer step. That is
the honest price of a PPO update next to an SFT update on the same batch, whose step is
one forward/backward and the optimizer step.

Metrics (medians over ``--runs`` runs per side)
    samples/s       samples trained / training-loop time. Samples = N x B on every side
                    (for PPO: rollout samples; ppo4 optimises on each 4 times).
    loop time       from the start of the training loop (SFT: the Trainer's
                    ``on_train_begin``; PPO: the first rollout forward pass) to the end of
                    the last optimizer step. Excludes imports, model load, LoRA wrapping,
                    optimizer set-up, saving and MLflow registration on both sides.
    time/step       loop time / optimizer steps, and the median interval between
                    consecutive optimizer steps (steady state, no first-step effects).
    breakdown       per optimizer step: no-grad rollout passes (PPO), forward with grad,
                    backward (``Accelerator.backward``, used by both), ``optimizer.step``
                    and the rest (data collation, loss maths, logging to MLflow, ...),
                    timed by wrapping those calls in the worker. Wall time; one torch
                    thread, so the calls are synchronous. Steady state: the optimizer
                    step(s) of the first rollout are left out (the first forward pass of
                    a process pays one-time warm-up); the JSON also has all-step means.
    peak RSS        ``ru_maxrss`` of the whole worker (imports, MLflow, model load, ...).
    RSS growth      training only: the worker resets its high-water mark
                    (``/proc/self/clear_refs`` = 5) right before the training function and
                    reads ``VmHWM`` right after; growth = that peak - ``VmRSS`` at the reset.

Targets checked (from the PPO issue): PPO peak RSS <= 1.3x SFT's, and a PPO step (same
batch) <= 3x an SFT step.

Usage
    .venv/bin/python bench/ppo_vs_sft.py --runs 3
    .venv/bin/python bench/ppo_vs_sft.py --runs 5 --steps 30 --batch 8 --sides sft,ppo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
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
ALL_SIDES = ("sft", "ppo", "ppo4")
PPO_EPOCHS = {"ppo": 1, "ppo4": 4}
TARGET_RSS = 1.3
TARGET_STEP = 3.0
CATEGORIES = (
    "rollout_policy_value",
    "rollout_reference",
    "train_forward",
    "backward",
    "optimizer",
)


# --------------------------------------------------------------------------- worker
def _status_kib() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(Vm\w+):\s+(\d+) kB", text, re.M)}


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Probe:
    """Timestamps and durations collected in the worker by the wrappers below."""

    def __init__(self) -> None:
        self.loop_start: float | None = None
        self.step_ends: list[float] = []
        self.snapshots: list[dict[str, float]] = []
        self.totals = dict.fromkeys(CATEGORIES, 0.0)
        self.train_tokens = 0
        self.train_padded = 0
        self.train_rows = 0
        self._opt_t0 = 0.0

    def add(self, cat: str, dt: float) -> None:
        self.totals[cat] += dt

    def count(self, attention_mask: Any) -> None:
        self.train_tokens += int(attention_mask.sum())
        self.train_padded += int(attention_mask.numel())
        self.train_rows += int(attention_mask.shape[0])


def _install_common(probe: Probe) -> None:
    """Hooks that are the same on both sides: optimizer steps and Accelerator.backward."""
    from accelerate import Accelerator
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    def pre(opt: Any, args: Any, kwargs: Any) -> None:
        probe._opt_t0 = time.perf_counter()

    def post(opt: Any, args: Any, kwargs: Any) -> None:
        t = time.perf_counter()
        probe.add("optimizer", t - probe._opt_t0)
        probe.step_ends.append(t)
        probe.snapshots.append(dict(probe.totals))

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)

    original = Accelerator.backward

    def backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            probe.add("backward", time.perf_counter() - t0)

    Accelerator.backward = backward  # type: ignore[method-assign]


def _install_ppo(probe: Probe) -> None:
    import torch

    from simtune.training import ppo

    build = ppo._PolicyAndValue.build

    def timed_build(*build_args: Any) -> Any:
        module = build(*build_args)
        forward = module.forward

        def timed_forward(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            if probe.loop_start is None:
                probe.loop_start = t0
            grad = torch.is_grad_enabled()
            try:
                return forward(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                if grad:
                    probe.add("train_forward", dt)
                    # (query_ids, query_mask, response_ids, response_mask, ...)
                    probe.count(torch.cat([args[1], args[3]], dim=1))
                elif kwargs.get("reference"):
                    probe.add("rollout_reference", dt)
                else:
                    probe.add("rollout_policy_value", dt)

        module.forward = timed_forward  # nn.Module.__call__ looks up self.forward
        return module

    ppo._PolicyAndValue.build = staticmethod(timed_build)  # type: ignore[method-assign]


def _install_sft(probe: Probe) -> Any:
    from transformers import TrainerCallback
    from trl import SFTTrainer

    original = SFTTrainer.compute_loss

    def compute_loss(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, model, inputs, *args, **kwargs)
        finally:
            probe.add("train_forward", time.perf_counter() - t0)
            probe.count(inputs["attention_mask"])

    SFTTrainer.compute_loss = compute_loss  # type: ignore[method-assign]

    class LoopStart(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            probe.loop_start = time.perf_counter()

    return LoopStart()


def _wrap_train(module: Any, name: str, box: dict[str, Any], extra_callback: Any = None) -> None:
    """Time the training function and measure RSS growth during it only."""
    import gc

    original = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if extra_callback is not None:
            # train_sft(cfg, examples, model, tokenizer, work_dir, callbacks)
            args[5].append(extra_callback)
        gc.collect()
        box["hwm_reset"] = _reset_hwm()
        st = _status_kib()
        box["rss_before_train_mib"] = st["VmRSS"] / 1024
        box["maxrss_before_train_mib"] = peak_rss_mib()
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            box["train_fn_s"] = time.perf_counter() - t0
            box["rss_peak_train_mib"] = _status_kib()["VmHWM"] / 1024

    setattr(module, name, wrapped)


def worker_main(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    import torch

    # Same intra-op thread count on both sides (see sft_vs_trl.py: 2 OpenMP threads on a
    # 2-core box spin-wait for each other under any other load).
    torch.set_num_threads(a.threads)
    import simtune
    import simtune.training.ppo as ppo_mod
    import simtune.training.sft as sft_mod

    t_import = time.perf_counter() - t0
    probe = Probe()
    box: dict[str, Any] = {}
    _install_common(probe)
    options: dict[str, Any] = {}
    if a.worker == "sft":
        _wrap_train(sft_mod, "train_sft", box, _install_sft(probe))
    else:
        _install_ppo(probe)
        _wrap_train(ppo_mod, "train_ppo", box)
        options = {
            "ppo_epochs": PPO_EPOCHS[a.worker],
            "num_mini_batches": 1,
            "gradient_accumulation_steps": 1,
        }
    result = simtune.run_tuning(
        tuning_mode="ppo" if a.worker.startswith("ppo") else "sft",
        llm_path=a.model,
        dataset_path=[a.data],
        workspace=a.workdir,
        max_steps=a.steps,
        per_device_train_batch_size=a.batch,
        logging_steps=1,
        seed=0,
        **options,
    )
    n_opt = len(probe.step_ends)
    assert probe.loop_start is not None and n_opt > 0
    loop_s = probe.step_ends[-1] - probe.loop_start
    intervals = [b - a_ for a_, b in zip(probe.step_ends, probe.step_ends[1:], strict=False)]
    samples = a.steps * a.batch
    per_step = {k: 1000 * v / n_opt for k, v in probe.totals.items()}
    per_step["other"] = 1000 * loop_s / n_opt - sum(per_step.values())
    # Steady state: skip the first rollout's optimizer step(s), whose first forward pass
    # pays the process's one-time warm-up (lazy init, first allocations).
    k0 = PPO_EPOCHS.get(a.worker, 1)
    first, last = probe.snapshots[k0 - 1], probe.snapshots[-1]
    span = n_opt - k0
    steady = {k: 1000 * (last[k] - first[k]) / span for k in CATEGORIES}
    steady_step = 1000 * (probe.step_ends[-1] - probe.step_ends[k0 - 1]) / span
    steady["other"] = steady_step - sum(steady.values())
    res = {
        "side": a.worker,
        "import_s": t_import,
        "optimizer_steps": n_opt,
        "rollouts": a.steps if a.worker != "sft" else 0,
        "samples": samples,
        "loop_s": loop_s,
        "samples_per_s": samples / loop_s,
        "step_ms": 1000 * loop_s / n_opt,
        "step_interval_median_ms": 1000 * statistics.median(intervals) if intervals else None,
        "breakdown_ms_per_step": per_step,
        "steady_step_ms": steady_step,
        "steady_breakdown_ms_per_step": steady,
        "tokens_per_step": probe.train_tokens / n_opt,
        "padded_tokens_per_step": probe.train_padded / n_opt,
        "rows_per_step": probe.train_rows / n_opt,
        "metrics": result.metrics,
        **box,
    }
    if a.worker == "sft":
        res["trainer_train_runtime_s"] = result.metrics.get("train_runtime")
        res["trainer_samples_per_s"] = result.metrics.get("train_samples_per_second")
    res["peak_rss_mib"] = peak_rss_mib()
    res["rss_growth_train_mib"] = res["rss_peak_train_mib"] - res["rss_before_train_mib"]
    print(json.dumps(res), flush=True)


# --------------------------------------------------------------------------- parent


SCALARS = (
    "samples_per_s",
    "loop_s",
    "step_ms",
    "step_interval_median_ms",
    "steady_step_ms",
    "tokens_per_step",
    "padded_tokens_per_step",
    "peak_rss_mib",
    "rss_before_train_mib",
    "rss_peak_train_mib",
    "rss_growth_train_mib",
    "train_fn_s",
    "end_to_end_s",
)


def summarise(results: list[dict], sides: list[str]) -> dict[str, dict[str, float]]:
    med: dict[str, dict[str, float]] = {}
    for side in sides:
        rows = [r for r in results if r["side"] == side]
        med[side] = {k: statistics.median(r[k] for r in rows) for k in SCALARS}
        for k in (*CATEGORIES, "other"):
            med[side][f"ms_{k}"] = statistics.median(
                r["steady_breakdown_ms_per_step"][k] for r in rows
            )
        med[side]["optimizer_steps"] = rows[0]["optimizer_steps"]
    return med


def markdown(med: dict[str, dict[str, float]], meta: dict[str, Any], sides: list[str]) -> str:
    s = med["sft"]
    rows = [
        ("Throughput (samples/s, training loop)", "samples_per_s", "{:,.1f}"),
        ("Optimizer steps per run", "optimizer_steps", "{:.0f}"),
        ("Time per optimizer step (ms): loop time / steps", "step_ms", "{:.1f}"),
        ("Time per optimizer step (ms): median step-to-step", "step_interval_median_ms", "{:.1f}"),
        ("Time per optimizer step (ms): steady state, mean", "steady_step_ms", "{:.1f}"),
        ("  rollout: policy + values, no grad (ms/step)", "ms_rollout_policy_value", "{:.1f}"),
        ("  rollout: reference, no grad (ms/step)", "ms_rollout_reference", "{:.1f}"),
        ("  forward with grad (ms/step)", "ms_train_forward", "{:.1f}"),
        ("  backward (ms/step)", "ms_backward", "{:.1f}"),
        ("  optimizer.step (ms/step)", "ms_optimizer", "{:.1f}"),
        ("  everything else (ms/step)", "ms_other", "{:.1f}"),
        ("Trained tokens per step (non-padding)", "tokens_per_step", "{:,.0f}"),
        ("Peak RSS, whole worker (MiB)", "peak_rss_mib", "{:,.0f}"),
        ("RSS right before training (MiB)", "rss_before_train_mib", "{:,.0f}"),
        ("Peak RSS during training (MiB)", "rss_peak_train_mib", "{:,.0f}"),
        ("  growth during training (MiB)", "rss_growth_train_mib", "{:,.1f}"),
        ("End-to-end wall time (s)", "end_to_end_s", "{:.2f}"),
    ]
    names = {
        "sft": "SFT",
        "ppo": "PPO, ppo_epochs=1",
        "ppo4": "PPO, ppo_epochs=4 (default)",
    }
    header = "| metric | " + " | ".join(names[x] for x in sides)
    align = "|---|" + "---:|" * len(sides)
    for x in sides[1:]:
        header += f" | {x} / SFT"
        align += "---:|"
    out = [
        f"## simtune offline PPO vs SFT ({meta['date']})",
        "",
        f"Medians of {meta['runs']} runs per side, each in a fresh process; batch "
        f"{meta['batch']} on every side, max_steps {meta['steps']} (SFT: optimizer steps; PPO: "
        f"rollouts of {meta['batch']} samples, 1 optimizer step each with ppo_epochs=1, 4 with "
        f"ppo_epochs=4), num_mini_batches=1, gradient_accumulation_steps=1, {meta['records']} "
        f"records, tiny random Llama (CPU, torch threads: {meta['threads']}), logging every step "
        "to MLflow on both sides.",
        "",
        header + " |",
        align,
    ]
    for label, key, fmt in rows:
        cells = [fmt.format(med[x][key]) for x in sides]
        for x in sides[1:]:
            cells.append(f"{med[x][key] / s[key]:.2f}x" if s[key] else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "Targets (PPO with ppo_epochs=1, i.e. one optimizer step on the same batch):", ""]
    for line in meta["targets"]:
        out.append(f"- {line}")
    m = meta["machine"]
    out += [
        "",
        f"1-minute load average seen around the runs: {meta['loadavg_1m'][0]:.1f} to "
        f"{meta['loadavg_1m'][1]:.1f} ({m['cpu_count']} CPUs).",
        "",
        f"Machine: {m['cpu_count']} CPUs, {m['platform']}, Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    return "\n".join(out)


def targets(med: dict[str, dict[str, float]]) -> list[str]:
    if "ppo" not in med:
        return ["not checked (the ppo side was not run)"]
    s, p = med["sft"], med["ppo"]
    rss = p["peak_rss_mib"] / s["peak_rss_mib"]
    growth = (
        p["rss_growth_train_mib"] / s["rss_growth_train_mib"]
        if s["rss_growth_train_mib"] > 0
        else float("nan")
    )
    step = p["step_ms"] / s["step_ms"]
    step_med = p["step_interval_median_ms"] / s["step_interval_median_ms"]

    def ok(x: float, lim: float) -> str:
        return "met" if x <= lim else "MISSED"

    return [
        f"peak RSS PPO / SFT = {rss:.2f}x (target <= {TARGET_RSS}x): {ok(rss, TARGET_RSS)}; "
        f"RSS growth during training alone: {p['rss_growth_train_mib']:.1f} vs "
        f"{s['rss_growth_train_mib']:.1f} MiB ({growth:.2f}x)",
        f"step time PPO / SFT = {step:.2f}x by loop time / steps, {step_med:.2f}x by median "
        f"step-to-step (target <= {TARGET_STEP}x): {ok(max(step, step_med), TARGET_STEP)}",
    ]


def parent_main(a: argparse.Namespace) -> None:
    sides = [x.strip() for x in a.sides.split(",") if x.strip()]
    if "sft" not in sides or any(x not in ALL_SIDES for x in sides):
        raise SystemExit(f"--sides must include sft and be drawn from {', '.join(ALL_SIDES)}")
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="simtune-bench-ppo-") as tmp_s:
        tmp = Path(tmp_s)
        from simtune.training.tiny import make_tiny_model

        model = make_tiny_model(tmp / "tiny-model")
        data = tmp / "decisions_bench.jsonl"
        # Enough distinct records that SFT's N steps stay inside one epoch.
        n_records = make_data(SAMPLE, data, max(1, math.ceil(a.steps * a.batch / 48)))
        warm_caches(a.threads)
        store = tmp / "store" / "mlflow.db"
        store.parent.mkdir()
        make_store(store, a.threads)

        results: list[dict] = []
        plan = order(sides, a.runs)
        for i, side in enumerate(plan):
            workdir = tmp / f"run-{i}-{side}"
            workdir.mkdir()
            shutil.copyfile(store, workdir / "mlflow.db")
            worker_args = ["--model", str(model), "--data", str(data), "--workdir", str(workdir)]
            worker_args += [
                "--steps",
                str(a.steps),
                "--batch",
                str(a.batch),
                "--threads",
                str(a.threads),
            ]
            res = run_worker(__file__, side, a.threads, worker_args)
            results.append(res)
            print(
                f"[{i + 1}/{len(plan)}] {side:5s} {res['samples_per_s']:6.1f} samples/s  "
                f"step {res['step_ms']:6.1f} ms (median {res['step_interval_median_ms']:6.1f})  "
                f"rss {res['peak_rss_mib']:5.0f} MiB (train {res['rss_before_train_mib']:.0f}"
                f"->{res['rss_peak_train_mib']:.0f})  e2e {res['end_to_end_s']:5.2f}s  "
                f"load {res['loadavg_1m_before']:.1f}->{res['loadavg_1m_after']:.1f}",
                flush=True,
            )

    med = summarise(results, sides)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "runs": a.runs,
        "steps": a.steps,
        "batch": a.batch,
        "threads": a.threads,
        "sides": sides,
        "records": n_records,
        "command": " ".join([".venv/bin/python", "bench/ppo_vs_sft.py", *sys.argv[1:]]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "versions": versions(),
        "loadavg_1m": [
            min(min(r["loadavg_1m_before"], r["loadavg_1m_after"]) for r in results),
            max(max(r["loadavg_1m_before"], r["loadavg_1m_after"]) for r in results),
        ],
        "hwm_reset_worked": all(r.get("hwm_reset") for r in results),
    }
    meta["targets"] = targets(med)
    md = markdown(med, meta, sides)
    print()
    print(md)
    (a.out / "ppo_vs_sft.md").write_text(md, encoding="utf-8")
    (a.out / "ppo_vs_sft.json").write_text(
        json.dumps({"meta": meta, "medians": med, "runs": results}, indent=2), encoding="utf-8"
    )
    print(f"wrote {a.out / 'ppo_vs_sft.md'} and {a.out / 'ppo_vs_sft.json'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="measured runs per side (default 3)")
    p.add_argument(
        "--steps", type=int, default=20, help="max_steps: SFT steps / PPO rollouts (default 20)"
    )
    p.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size (default 4)")
    p.add_argument(
        "--sides",
        default=",".join(ALL_SIDES),
        help=f"comma-separated, from {', '.join(ALL_SIDES)} (default all)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for ppo_vs_sft.md/.json")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--worker", choices=ALL_SIDES, help=argparse.SUPPRESS)
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
