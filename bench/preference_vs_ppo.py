"""Benchmark: KTO, DPO and offline PPO on the same logged, scored decisions.

What is compared (each through ``simtune.run_tuning``, each run in a fresh process)
    kto     ``tuning_mode="kto"``: desirable = score above the mean score (the default).
    dpo     ``tuning_mode="dpo"``: one (best, worst) pair per prompt.
    ppo     ``tuning_mode="ppo"``, offline rollouts from the logged scores, with
            ``ppo_epochs=1`` so that every side makes one optimizer step per batch of B.

The data: job-seeker prompts (a skill and two job offers, one matching the skill), each
logged with three scored answers -- apply to the matching job (score 1.0), apply to the
other one (0.3), wait (0.0). Training prompts and held-out prompts use different skills
and job ids, so the held-out measure is about the preference, not memorised strings.

The metric: the held-out log-prob gap = mean over held-out prompts of
log pi(best answer) - log pi(worst answer) (summed over answer tokens, under the chat
template), before training (the base) and after (base + the trained adapter); the rise is
after - before. Higher = the model moved towards what scored well. The match gap,
log pi(best) - log pi(middle), asks the harder question: does it prefer the matching
job over the other one (an answer of the same shape)? It says nothing about
what the model *generates*; that needs the simulation (see docs/training.md).

Same for every side: LoRA defaults, learning rate (``--lr``), batch B (``--batch``),
``max_steps`` N (``--steps``), seed per run, one torch thread per worker. Medians over
``--runs`` seeds per side (alternating order).

Usage
    .venv/bin/python bench/preference_vs_ppo.py --runs 3                   # tiny model
    .venv/bin/python bench/preference_vs_ppo.py --runs 1 --model real      # SmolLM2-135M
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness import order, run_worker, versions, warm_caches

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SIDES = ("kto", "dpo", "ppo")
TRAIN_SKILLS = [
    "python",
    "sales",
    "welding",
    "nursing",
    "design",
    "cooking",
    "driving",
    "law",
    "accounting",
    "carpentry",
    "marketing",
    "biology",
]
HELD_OUT_SKILLS = ["plumbing", "teaching", "music", "farming", "painting", "physics"]


def prompt(skill: str, match: int, other: int) -> str:
    offers = [f"J{match} ({skill}, salary 50)", f"J{other} (unrelated, salary 55)"]
    if match % 2:
        offers.reverse()
    return (
        f"You are a job seeker skilled in {skill}. Jobs on offer: {'; '.join(offers)}. "
        'Apply to one job or wait. Answer in JSON: {"action": ..., "job_id": ...}.'
    )


def answers(match: int, other: int) -> list[tuple[str, float]]:
    """(answer, score), best first."""
    return [
        (json.dumps({"action": "apply", "job_id": f"J{match}"}), 1.0),
        (json.dumps({"action": "apply", "job_id": f"J{other}"}), 0.3),
        (json.dumps({"action": "wait"}), 0.0),
    ]


def write_data(path: Path) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for i, skill in enumerate(TRAIN_SKILLS):
            match, other = 10 + 2 * i, 11 + 2 * i
            for j, (ans, score) in enumerate(answers(match, other)):
                rec = {"decision_id": f"{i}-{j}", "prompt": prompt(skill, match, other)}
                fh.write(json.dumps({**rec, "output": ans, "reward": score}) + "\n")
                n += 1
    return n


def held_out() -> list[tuple[str, list[str]]]:
    """(prompt, [best, middle, worst answer]) on skills and job ids never trained on."""
    out = []
    for i, skill in enumerate(HELD_OUT_SKILLS):
        match, other = 80 + 2 * i, 81 + 2 * i
        out.append((prompt(skill, match, other), [a for a, _ in answers(match, other)]))
    return out


def logp_gap(model_dir: str, adapter: str | None) -> tuple[float, float]:
    """Mean over held-out prompts of log pi(best) - log pi(worst) (apply to the matching
    job vs wait), and of log pi(best) - log pi(middle) (the matching job vs the other)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    gaps, match_gaps = [], []
    for text, ranked in held_out():
        msgs = [{"role": "user", "content": text}]
        q = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
        total = {}
        for ans in ranked:
            full = tok.apply_chat_template(
                [*msgs, {"role": "assistant", "content": ans}], return_dict=False
            )
            ids = torch.tensor([full])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            tgt = ids[0, 1:]
            total[ans] = float(logits[torch.arange(len(tgt)), tgt][len(q) - 1 :].sum())
        gaps.append(total[ranked[0]] - total[ranked[2]])
        match_gaps.append(total[ranked[0]] - total[ranked[1]])
    return sum(gaps) / len(gaps), sum(match_gaps) / len(match_gaps)


def worker(side: str, args: argparse.Namespace) -> dict[str, Any]:
    from simtune import run_tuning

    ws = Path(tempfile.mkdtemp(prefix=f"bench-pref-{side}-"))
    try:
        data = ws / "decisions_bench.jsonl"
        write_data(data)
        extra: dict[str, Any] = {"ppo_epochs": 1} if side == "ppo" else {}
        t0 = time.perf_counter()
        result = run_tuning(
            tuning_mode=side,
            llm_path=args.model_dir,
            dataset_path=[str(data)],
            workspace=str(ws),
            learning_rate=args.lr,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            warmup_ratio=0.0,
            lr_scheduler_type="constant",
            max_length=256,
            seed=args.seed,
            logging_steps=1,
            **extra,
        )
        train_s = time.perf_counter() - t0
        after, match_after = logp_gap(args.model_dir, result.adapter_path)
        return {
            "after": after,
            "match_after": match_after,
            "train_s": train_s,
            "dataset": result.dataset,
        }
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3 tiny, 2e-4 real")
    ap.add_argument("--model", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model_dir", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lr is None:
        args.lr = 1e-3 if args.model == "tiny" else 2e-4
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    cache = Path(tempfile.gettempdir()) / "simtune-bench-pref"
    cache.mkdir(exist_ok=True)
    if args.model == "tiny":
        from simtune.training.tiny import make_tiny_model

        model_dir = cache / "tiny"
        if not model_dir.exists():
            make_tiny_model(model_dir)
    else:
        from simtune.base_models import find_real_model
        from simtune.training.model import materialize_gguf

        model_dir, _ = materialize_gguf(find_real_model(cache), cache)
    warm_caches(args.threads)
    before, match_before = logp_gap(str(model_dir), None)
    print(f"before: held-out gap {before:+.3f}, match gap {match_before:+.3f}", file=sys.stderr)
    sides = args.sides.split(",")
    runs: list[dict[str, Any]] = []
    for k, side in enumerate(order(sides, args.runs)):
        seed = k // len(sides)
        res = run_worker(
            __file__,
            side,
            args.threads,
            [
                "--model_dir",
                str(model_dir),
                "--seed",
                str(seed),
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--lr",
                str(args.lr),
                "--model",
                args.model,
            ],
        )
        res.update(
            seed=seed, rise=res["after"] - before, match_rise=res["match_after"] - match_before
        )
        print(
            f"{side} seed {seed}: gap {res['after']:+.3f} (rise {res['rise']:+.3f}), match gap "
            f"{res['match_after']:+.3f} (rise {res['match_rise']:+.3f}), "
            f"job {res['train_s']:.1f} s",
            file=sys.stderr,
        )
        runs.append(res)

    rows = []
    for side in sides:
        mine = [r for r in runs if r["side"] == side]
        rows.append(
            {
                "side": side,
                "gap_after": statistics.median(r["after"] for r in mine),
                "rise": statistics.median(r["rise"] for r in mine),
                "rise_min": min(r["rise"] for r in mine),
                "rise_max": max(r["rise"] for r in mine),
                "match_rise": statistics.median(r["match_rise"] for r in mine),
                "train_s": statistics.median(r["train_s"] for r in mine),
            }
        )
    lines = [
        f"held-out log-prob gap (best - worst answer), model {args.model}, {args.steps} steps, "
        f"batch {args.batch}, lr {args.lr:g}, {args.runs} seed(s); before: gap {before:+.3f}, "
        f"match gap {match_before:+.3f}",
        "",
        "| mode | gap after | gap rise | rise min..max | match-gap rise | job time (s) |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r['side']} | {r['gap_after']:+.3f} | {r['rise']:+.3f} | "
            f"{r['rise_min']:+.3f}..{r['rise_max']:+.3f} | {r['match_rise']:+.3f} | "
            f"{r['train_s']:.1f} |"
            for r in rows
        ),
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"preference_vs_ppo_{args.model}"
    stem.with_suffix(".md").write_text(table + "\n")
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "when": datetime.now(timezone.utc).isoformat(),
                "args": vars(args),
                "before": before,
                "match_before": match_before,
                "summary": rows,
                "runs": runs,
                "versions": versions(),
            },
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
