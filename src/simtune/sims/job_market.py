"""A toy job market whose agents make JSON decisions; source of the bundled sample data.

Job seekers choose how many jobs to apply to (the seed simulator's search-intensity
decision); employers choose whom to interview. The "expert" policy is a simple rule
that earns the most reward; a noisy policy sometimes deviates and earns less. Each
decision is a DESIGN.md §3 record, so the file trains as it is.
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

SKILLS = ["python", "sales", "welding", "nursing", "accounting", "design"]


def seeker_decision(rng: random.Random, expert: bool) -> tuple[str, str, float]:
    savings = rng.randint(0, 10)
    openings = rng.randint(1, 5)
    skill = rng.choice(SKILLS)
    best = min(openings, 1 + (10 - savings) // 4)  # poorer seekers search harder
    choice = best if expert or rng.random() < 0.5 else rng.randint(1, openings)
    prompt = (
        "You are a job seeker in a job-market simulation.\n"
        f"Skill: {skill}. Savings (0-10): {savings}. Open positions matching you: {openings}.\n"
        "Searching harder finds a job sooner but costs effort. "
        f'How many jobs do you apply to? Answer as JSON: {{"number": <1-{openings}>}}'
    )
    reward = round(1.0 - 0.4 * abs(choice - best), 3)
    return prompt, json.dumps({"number": choice}), reward


def employer_decision(rng: random.Random, expert: bool) -> tuple[str, str, float]:
    skill = rng.choice(SKILLS)
    candidates = [(f"C{i}", rng.choice(SKILLS), rng.randint(1, 9)) for i in range(3)]
    lines = "\n".join(f"- {cid}: skill {s}, experience {y} years" for cid, s, y in candidates)
    ranked = sorted(candidates, key=lambda c: (c[1] == skill, c[2]), reverse=True)
    pick = ranked[0] if expert or rng.random() < 0.5 else rng.choice(candidates)
    prompt = (
        "You are an employer in a job-market simulation.\n"
        f"You need a {skill} worker. Candidates:\n{lines}\n"
        'Whom do you interview? Answer as JSON: {"target_id": "<candidate id>"}'
    )
    reward = 1.0 if pick == ranked[0] else 0.2
    return prompt, json.dumps({"target_id": pick[0]}), reward


def generate(n: int = 48, *, seed: int = 0, expert_share: float = 0.75) -> list[dict[str, Any]]:
    """`n` decision records from a few simulated runs (deterministic for a seed)."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    records = []
    for i in range(n):
        run = i // 16
        agent = i % 8
        is_seeker = agent < 5
        expert = rng.random() < expert_share
        make = seeker_decision if is_seeker else employer_decision
        prompt, output, reward = make(rng, expert)
        rec: dict[str, Any] = {
            "decision_id": uuid.UUID(int=rng.getrandbits(128)).hex,
            "env_name": "job_market",
            "run_id": f"run-{run}",
            "agent_id": str(agent),
            "agent_type": "JobSeeker" if is_seeker else "Employer",
            "step": (i % 16) // 8 + 1,
            "timestamp": (start + timedelta(seconds=i)).isoformat(),
            "prompt": prompt,
            "output": output,
            "reward": reward,
            "model": "expert-policy" if expert else "noisy-policy",
        }
        if i % 3 == 0:
            rec["rating"] = 5.0 if reward >= 0.99 else 2.0
        records.append(rec)
    return records


def write_jsonl(records: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
