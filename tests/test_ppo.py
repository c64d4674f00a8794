"""PPO on the tiny model: offline preference shift, online reward rise, KL behaviour, bad input."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow

PPO_FAST = dict(
    tuning_mode="ppo",
    learning_rate=5e-3,
    per_device_train_batch_size=8,
    warmup_ratio=0.0,
    lr_scheduler_type="constant",
    lora_dropout=0.0,
    seed=0,
    ppo_epochs=2,
    max_length=128,
)
GOOD, BAD = '{"action": "apply"}', '{"action": "wait"}'
SKILLS = ["python", "sales", "welding", "nursing", "design", "cooking", "driving", "law"]


def preference_data(path: Path, skills: list[str]) -> Path:
    """The same prompts with a rewarded answer and a punished one."""
    with path.open("w") as fh:
        for i, skill in enumerate(skills):
            prompt = f"You are a job seeker skilled in {skill}. Apply or wait? Answer in JSON."
            for out, reward in ((GOOD, 1.0), (BAD, 0.0)):
                fh.write(
                    json.dumps(
                        {
                            "decision_id": f"{i}-{reward}",
                            "prompt": prompt,
                            "output": out,
                            "reward": reward,
                        }
                    )
                    + "\n"
                )
    return path


def logp_gap(model_dir: str | Path, adapter: str | None, prompts: list[str]) -> float:
    """Mean over prompts of log pi(GOOD) - log pi(BAD) (summed over answer tokens)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    gaps = []
    for prompt in prompts:
        msgs = [{"role": "user", "content": prompt}]
        q = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
        total = {}
        for ans in (GOOD, BAD):
            full = tok.apply_chat_template(
                msgs + [{"role": "assistant", "content": ans}], return_dict=False
            )
            ids = torch.tensor([full])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            tgt = ids[0, 1:]
            lp = logits[torch.arange(len(tgt)), tgt][len(q) - 1 :]
            total[ans] = float(lp.sum())
        gaps.append(total[GOOD] - total[BAD])
    return sum(gaps) / len(gaps)


def test_offline_ppo_prefers_rewarded_answers_on_held_out_prompts(tiny_model, workspace, tmp_path):
    import mlflow

    from simtune import run_tuning

    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    held_out = [
        f"You are a job seeker skilled in {s}. Apply or wait? Answer in JSON."
        for s in ("plumbing", "teaching", "music")
    ]
    before = logp_gap(tiny_model, None, held_out)
    result = run_tuning(
        llm_path=str(tiny_model),
        dataset_path=[str(data)],
        workspace=str(workspace),
        max_steps=8,
        **PPO_FAST,
    )
    after = logp_gap(tiny_model, result.adapter_path, held_out)
    assert after > before + 1.0, (before, after)

    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for name in (
        "ppo/score_mean",
        "ppo/score_std",
        "ppo/kl",
        "ppo/entropy",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/returns_mean",
        "train/learning_rate",
    ):
        history = client.get_metric_history(result.run_id, name)
        assert [m.step for m in history] == list(range(1, 9)), name
    assert Path(result.adapter_path, "value_head.safetensors").is_file()
    assert result.registered_model_name == "llm_tuning"
    entries = json.loads((workspace / "models" / "registry.json").read_text())["models"]
    assert entries[0]["tuning_mode"] == "ppo" and entries[0]["model_id"] == result.model_id
    assert result.dataset["num_ppo_samples"] == 2 * len(SKILLS)


REWARDS = {
    # name: (source of `reward(completion, **_)`, least rise of the held-out mean)
    "digits": ("sum(c.isdigit() for c in completion) / max(1, len(completion))", 0.05),
    "length": ("max(0.0, 1.0 - abs(len(completion) - 12) / 12)", 0.08),
    "keyword": ("float('on' in completion.lower())", 0.25),
}


def mean_sampled_reward(
    model_dir: Path, adapter: str | None, prompts: list[str], reward, n: int = 16
) -> float:
    """Mean reward of n sampled answers per prompt, sampled independently of simtune:
    plain generate() at temperature 1 over the whole vocabulary (top_k=0: transformers
    would otherwise apply its default top_k=50), ending at the tokenizer's EOS."""
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
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=8,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(1234)
    scores = []
    for prompt in prompts:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**enc, generation_config=gen, num_return_sequences=n)
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            scores.append(reward(tok.decode(row, skip_special_tokens=True)))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("shape", sorted(REWARDS))
def test_online_ppo_raises_rewards_of_several_shapes_on_held_out_prompts(
    shape, tiny_model, workspace, tmp_path
):
    """Default PPO options plus a learning rate: the mean reward of answers sampled on
    prompts PPO never saw rises clearly, for a share-like, a target-like and a sparse
    0/1 reward; KL to the reference stays bounded and the policy's entropy moves."""
    import mlflow

    from simtune import run_tuning

    source, margin = REWARDS[shape]
    (tmp_path / "shaped.py").write_text(f"def reward(completion, **_):\n    return {source}\n")
    reward = eval(f"lambda completion: {source}")  # noqa: S307 (our own literal)
    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    held_out = [
        f"You are a job seeker skilled in {s}. Apply or wait? Answer in JSON."
        for s in ("plumbing", "teaching", "music", "farming")
    ]
    before = mean_sampled_reward(tiny_model, None, held_out, reward)
    result = run_tuning(
        tuning_mode="ppo",
        rollout="online",
        reward_fn=f"{tmp_path / 'shaped.py'}:reward",
        llm_path=str(tiny_model),
        dataset_path=[str(data)],
        workspace=str(workspace),
        learning_rate=1e-3,
        max_steps=30,
        max_new_tokens=8,
        per_device_train_batch_size=8,
        seed=0,
    )
    after = mean_sampled_reward(tiny_model, result.adapter_path, held_out, reward)
    assert after > before + margin, (shape, before, after)
    client = mlflow.MlflowClient(result.tracking_uri)
    kl = [m.value for m in client.get_metric_history(result.run_id, "ppo/kl")]
    entropy = [m.value for m in client.get_metric_history(result.run_id, "ppo/entropy")]
    assert all(math.isfinite(k) for k in kl) and max(kl) < 40.0, kl
    assert max(entropy) - min(entropy) > 0.05, entropy
    score = [m.value for m in client.get_metric_history(result.run_id, "ppo/score_mean")]
    assert sum(score[-5:]) > sum(score[:5]), score  # the training answers improved too
    assert result.dataset["rollout"] == "online"


def test_zero_scores_keep_policy_near_reference_and_ratio_starts_at_one(
    tiny_model, workspace, tmp_path
):
    import mlflow

    from simtune import run_tuning

    path = tmp_path / "decisions_zero.jsonl"
    with path.open("w") as fh:
        for i, skill in enumerate(SKILLS):
            fh.write(
                json.dumps(
                    {
                        "prompt": f"Skill {skill}?",
                        "output": GOOD,
                        "reward": 0.0,
                        "decision_id": str(i),
                    }
                )
                + "\n"
            )
    result = run_tuning(
        llm_path=str(tiny_model),
        dataset_path=[str(path)],
        workspace=str(workspace),
        max_steps=6,
        kl_coef=0.5,
        score_normalization="none",
        **PPO_FAST,
    )
    client = mlflow.MlflowClient(result.tracking_uri)
    kls = [m.value for m in client.get_metric_history(result.run_id, "ppo/kl")]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # nothing learned yet: policy == reference
    assert max(abs(k) for k in kls) < 0.05, kls


def test_ratio_is_exactly_one_before_any_update(tiny_model):
    import torch

    from simtune.config import build_config
    from simtune.training.model import load_model, resolve_model
    from simtune.training.ppo import Sampling, _PolicyAndValue, make_policy
    from simtune.training.ppo_math import policy_loss

    cfg = build_config(
        overrides={"llm_path": str(tiny_model), "dataset_path": ["x"], "tuning_mode": "ppo"}
    )
    module = _PolicyAndValue.build(
        make_policy(load_model(resolve_model(str(tiny_model)), trainable_adapter=True), cfg), None
    )
    module.eval()
    q_ids, r_ids = torch.randint(5, 500, (3, 6)), torch.randint(5, 500, (3, 6))
    q_att, r_att = torch.ones_like(q_ids), torch.ones_like(r_ids)
    mask = r_att.float()
    sampling = Sampling(0.7, 0, 1.0)
    with torch.no_grad():
        old, _, _ = module(q_ids, q_att, r_ids, r_att, sampling)
        new, _, _ = module(q_ids, q_att, r_ids, r_att, sampling)
        ref, _, _ = module(q_ids, q_att, r_ids, r_att, sampling, reference=True)
    adv = torch.randn(3, 6)
    loss, clipfrac, approx_kl = policy_loss(new, old, adv, mask, 0.2)
    assert torch.equal(old, new)
    assert float(clipfrac) == 0.0 and float(approx_kl) == 0.0
    # a fresh LoRA adapter (B = 0) is exactly the reference
    assert torch.allclose(old, ref, atol=1e-6)


def test_kl_to_the_base_falls_from_a_perturbed_adapter_when_score_is_zero(
    tiny_model, workspace, tmp_path
):
    """Only the KL penalty pays: starting from an adapter that moved the model away from
    the base, PPO with --ppo_reference base and a zero reward walks back (a sign error in
    the KL term would walk further away). Through the CLI, whose result table shows the
    PPO figures instead of a train loss."""
    import mlflow
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from simtune.config import build_config
    from simtune.training.sft import lora_config

    cfg = build_config(overrides={"llm_path": str(tiny_model), "dataset_path": ["x"]})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora_config(cfg))
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.03)
    adapter = tmp_path / "perturbed"
    model.save_pretrained(adapter, safe_serialization=True)
    (tmp_path / "zero.py").write_text("def reward(completion, **_):\n    return 0.0\n")
    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    proc = run_cli(
        "train",
        "--tuning_mode", "ppo",
        "--llm_path", str(adapter),
        "--dataset_path", str(data),
        "--workspace", str(workspace),
        "--rollout", "online",
        "--reward_fn", f"{tmp_path / 'zero.py'}:reward",
        "--ppo_reference", "base",
        "--kl_coef", "0.5",
        "--learning_rate", "1e-3",
        "--lora_dropout", "0",
        "--max_steps", "40",
        "--max_new_tokens", "8",
        "--per_device_train_batch_size", "8",
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PPO score mean" in proc.stdout and "KL" in proc.stdout, proc.stdout
    assert "nan" not in proc.stdout.lower()
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("llm_tuning").experiment_id])[0]
    kl = [m.value for m in client.get_metric_history(run.info.run_id, "ppo/kl")]
    assert kl[0] > 2.0, kl  # the adapter starts away from the base
    assert sum(kl[-5:]) < 0.6 * sum(kl[:5]), kl


def _mlflow_statuses(ws: Path) -> list[str]:
    db = ws / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("select status from runs")]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rollout", "online", "--reward_fn", "no_such_module_xyz:f"], "--reward_fn"),
        (["--rollout", "online"], "exactly one reward source"),
        (
            ["--rollout", "online", "--judge_url", "http://127.0.0.1:9/v1", "--judge_model", "j"],
            "--judge_url",
        ),
        (["--rollout", "online", "--reward_model", "TINY"], "--reward_model"),
    ],
)
def test_bad_reward_sources_fail_before_training(args, needle, tiny_model, workspace, tmp_path):
    args = [str(tiny_model) if a == "TINY" else a for a in args]  # a causal LM, not a classifier
    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS[:2])
    proc = run_cli(
        "train",
        "--tuning_mode",
        "ppo",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(data),
        "--workspace",
        str(workspace),
        *args,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and needle in proc.stderr
    assert _mlflow_statuses(workspace) == []
    assert not (workspace / "models" / "registry.json").exists()


def test_no_scored_records_is_a_clear_error(tiny_model, workspace, tmp_path):
    path = tmp_path / "unscored.jsonl"
    path.write_text(json.dumps({"prompt": "p", "output": "o"}) + "\n")
    proc = run_cli(
        "train",
        "--tuning_mode",
        "ppo",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(path),
        "--workspace",
        str(workspace),
    )
    assert proc.returncode == 2 and "no scored records" in proc.stderr, proc.stderr[-2000:]
    assert _mlflow_statuses(workspace) == []


def test_reward_function_raising_marks_run_failed(tiny_model, workspace, tmp_path):
    (tmp_path / "broken_reward.py").write_text(
        "def reward(prompt, completion, record):\n    raise RuntimeError('boom')\n"
    )
    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS[:2])
    proc = run_cli(
        "train",
        "--tuning_mode",
        "ppo",
        "--llm_path",
        str(tiny_model),
        "--dataset_path",
        str(data),
        "--workspace",
        str(workspace),
        "--rollout",
        "online",
        "--reward_fn",
        f"{tmp_path / 'broken_reward.py'}:reward",
        "--max_steps",
        "2",
        "--max_new_tokens",
        "4",
    )
    assert proc.returncode == 2 and "boom" in proc.stderr, proc.stderr[-2000:]
    assert _mlflow_statuses(workspace) == ["FAILED"]
    assert not (workspace / "models" / "registry.json").exists()
    models = workspace / "models"
    assert not models.exists() or not [
        p for p in models.iterdir() if p.name != "registry.json.lock"
    ]


def test_reward_model_trains_registers_and_drives_online_ppo(tiny_model, workspace, tmp_path):
    import mlflow

    from simtune import run_tuning

    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    rm = run_tuning(
        tuning_mode="reward",
        llm_path=str(tiny_model),
        dataset_path=[str(data)],
        workspace=str(workspace),
        max_steps=15,
        learning_rate=5e-3,
        per_device_train_batch_size=8,
        warmup_ratio=0.0,
        lora_dropout=0.0,
        seed=0,
    )
    assert rm.registered_model_name == "llm_tuning"
    client = mlflow.MlflowClient(rm.tracking_uri)
    assert client.get_run(rm.run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(rm.run_id, "train/loss")) == 15
    mlflow.set_tracking_uri(rm.tracking_uri)
    scorer = mlflow.pyfunc.load_model(rm.model_uri)
    prompt = f"You are a job seeker skilled in {SKILLS[0]}. Apply or wait? Answer in JSON."
    good, bad = scorer.predict(
        [{"prompt": prompt, "completion": GOOD}, {"prompt": prompt, "completion": BAD}]
    )
    assert good > bad, (good, bad)

    # the registered reward model's id works as --reward_model for online PPO
    ppo = run_tuning(
        llm_path=str(tiny_model),
        dataset_path=[str(data)],
        workspace=str(workspace),
        rollout="online",
        reward_model=rm.model_id,
        max_steps=2,
        max_new_tokens=4,
        **PPO_FAST,
    )
    history = client.get_metric_history(ppo.run_id, "ppo/score_mean")
    assert len(history) == 2 and all(abs(m.value) < 100 for m in history)


def test_ppo_continues_from_an_sft_adapter(tiny_model, workspace, tmp_path):
    from safetensors.torch import load_file

    from simtune import run_tuning

    data = preference_data(tmp_path / "decisions_pref.jsonl", SKILLS)
    sft = run_tuning(
        llm_path=str(tiny_model),
        dataset_path=[str(data)],
        workspace=str(workspace),
        max_steps=3,
        learning_rate=5e-3,
        per_device_train_batch_size=8,
    )
    ppo = run_tuning(
        llm_path=sft.adapter_path,
        dataset_path=[str(data)],
        workspace=str(workspace),
        max_steps=2,
        **PPO_FAST,
    )
    meta = json.loads((Path(ppo.adapter_path) / "simtune.json").read_text())
    assert meta["continued_from_adapter"] == sft.adapter_path
    assert meta["config"]["ppo_reference"] == "init"  # KL to the SFT adapter, by default
    # the frozen reference copy is not part of the saved adapter
    assert not (Path(ppo.adapter_path) / "reference").exists()
    w_sft = load_file(str(Path(sft.adapter_path) / "adapter_model.safetensors"))
    w_ppo = load_file(str(Path(ppo.adapter_path) / "adapter_model.safetensors"))
    assert w_sft.keys() == w_ppo.keys()
    assert any(not w_sft[k].equal(w_ppo[k]) for k in w_sft)
