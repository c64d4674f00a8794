"""Benchmark: does online PPO raise a reward it has never seen, on the tiny model?

For each reward shape below, one worker process trains online PPO through
``simtune.run_tuning`` (a reward function, default PPO options plus a learning rate) and
measures, with its own sampling code (plain ``transformers.generate`` at temperature 1,
no top-k/top-p, the same stop token), the mean reward of sampled answers on held-out
prompts before and after training, and the wall time per PPO step (`train_ppo` only: rollouts,
scoring and updates; not imports, model loading or MLflow).

Reward shapes (``bench/ppo_rewards.py``, also used by the tests' checks)
    digits    share of the answer's characters that are digits (0..1)
    length    1 - |chars - 12| / 12, floored at 0: a target answer length
    keyword   1 if the answer contains the letter sequence "on" (a word piece), else 0

The same script measures the code before a change: point PYTHONPATH at the other tree
(``PYTHONPATH=/path/to/old/src python bench/ppo_online.py --label before --model-dir DIR``,
with DIR made by this tree's ``simtune make-tiny-model DIR`` so both run on the same
model); it passes only options both versions know.

Usage
    .venv/bin/python bench/ppo_online.py --runs 3                 # ~6 min on 2 cores
    .venv/bin/python bench/ppo_online.py --runs 1 --rewards digits --label smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import run_worker, versions

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
REWARDS = ("digits", "length", "keyword")
SKILLS = ["python", "sales", "welding", "nursing", "design", "cooking", "driving", "law"]
HELD_OUT = ["plumbing", "teaching", "music", "farming"]


def prompt(skill: str) -> str:
    return f"You are a job seeker skilled in {skill}. Apply or wait? Answer in JSON."


def sampled_reward(
    model_dir: Path, adapter: str | None, reward: Any, n: int, max_new_tokens: int
) -> float:
    """Mean reward of n sampled answers per held-out prompt (temperature 1, full vocab)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    gen = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(1234)
    scores = []
    for skill in HELD_OUT:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt(skill)}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**enc, generation_config=gen, num_return_sequences=n)
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            scores.append(reward(completion=tok.decode(row, skip_special_tokens=True)))
    return sum(scores) / len(scores)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import mlflow

    sys.path.insert(0, str(BENCH))
    import ppo_rewards

    from simtune import run_tuning
    from simtune.training.tiny import make_tiny_model

    reward = getattr(ppo_rewards, args.reward)
    root = Path(tempfile.mkdtemp(prefix="simtune-ppo-online-"))
    if args.model_dir:
        model = Path(args.model_dir)
    else:
        model = make_tiny_model(root / "tiny", **json.loads(args.model_kwargs))
    data = root / "decisions.jsonl"
    with data.open("w") as fh:
        for i, skill in enumerate(SKILLS):
            fh.write(json.dumps({"decision_id": str(i), "prompt": prompt(skill), "output": "{}"}))
            fh.write("\n")
    before = sampled_reward(model, None, reward, args.eval_samples, args.max_new_tokens)
    # Time the PPO recipe itself (rollouts + updates; not imports, model load, MLflow).
    from simtune.training import ppo

    original, loop = ppo.train_ppo, {}

    def timed(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            loop["s"] = time.perf_counter() - t

    ppo.train_ppo = timed
    t0 = time.perf_counter()
    result = run_tuning(
        tuning_mode="ppo",
        rollout="online",
        reward_fn=f"{BENCH / 'ppo_rewards.py'}:{args.reward}",
        llm_path=str(model),
        dataset_path=[str(data)],
        workspace=str(root / "ws"),
        max_steps=args.steps,
        max_new_tokens=args.max_new_tokens,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=8,
        seed=args.seed,
    )
    train_s = time.perf_counter() - t0
    after = sampled_reward(
        model, result.adapter_path, reward, args.eval_samples, args.max_new_tokens
    )
    client = mlflow.MlflowClient(result.tracking_uri)
    kl = [m.value for m in client.get_metric_history(result.run_id, "ppo/kl")]
    ent = [m.value for m in client.get_metric_history(result.run_id, "ppo/entropy")]
    return {
        "reward": args.reward,
        "before": before,
        "after": after,
        "kl_last": kl[-1],
        "kl_max": max(kl),
        "entropy_first": ent[0],
        "entropy_last": ent[-1],
        "job_s": train_s,
        "ms_per_step": 1000 * loop["s"] / args.steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--reward", default="digits", help=argparse.SUPPRESS)
    ap.add_argument("--rewards", default=",".join(REWARDS))
    ap.add_argument("--runs", type=int, default=3, help="seeds per reward")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=5e-3)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="current", help="name of this measurement in the output")
    ap.add_argument(
        "--model-kwargs", default="{}", help="JSON keyword arguments of make_tiny_model"
    )
    ap.add_argument(
        "--model-dir",
        default="",
        help="a model directory to use instead of a fresh tiny model (to run an older "
        "simtune on the same model: build it with `simtune make-tiny-model DIR`)",
    )
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows: dict[str, list[dict[str, Any]]] = {}
    for name in args.rewards.split(","):
        for seed in range(args.runs):
            res = run_worker(
                __file__,
                "ppo",
                args.threads,
                [
                    "--reward",
                    name,
                    "--seed",
                    str(seed),
                    "--steps",
                    str(args.steps),
                    "--max-new-tokens",
                    str(args.max_new_tokens),
                    "--learning-rate",
                    str(args.learning_rate),
                    "--eval-samples",
                    str(args.eval_samples),
                    "--model-kwargs",
                    args.model_kwargs,
                    "--model-dir",
                    args.model_dir,
                ],
            )
            rows.setdefault(name, []).append(res)
            print(
                f"{name} seed {seed}: reward {res['before']:.3f} -> {res['after']:.3f}, "
                f"kl {res['kl_last']:.3f}, entropy {res['entropy_first']:.3f} -> "
                f"{res['entropy_last']:.3f}, {res['ms_per_step']:.0f} ms/step",
                file=sys.stderr,
            )
    summary = {
        name: {
            k: statistics.median(r[k] for r in runs)
            for k in ("before", "after", "kl_last", "entropy_first", "entropy_last", "ms_per_step")
        }
        for name, runs in rows.items()
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"label": args.label, "args": vars(args), "versions": versions(), "medians": summary}
    out["runs"] = rows
    (RESULTS / f"ppo_online_{args.label}.json").write_text(json.dumps(out, indent=2))
    lines = [
        f"online PPO on the tiny model ({args.label}; medians of {args.runs} seeds, "
        f"{args.steps} steps, lr {args.learning_rate})",
        "",
        "| reward | before | after | KL last | entropy first -> last | ms/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in summary.items():
        lines.append(
            f"| {name} | {m['before']:.3f} | {m['after']:.3f} | {m['kl_last']:.2f} | "
            f"{m['entropy_first']:.3f} -> {m['entropy_last']:.3f} | {m['ms_per_step']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / f"ppo_online_{args.label}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
