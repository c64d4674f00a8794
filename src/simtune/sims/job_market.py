"""A job market whose agents decide through an LLM: `simtune sims run job_market ...`.

Model (one episode = ``steps`` weeks; 6 job seekers ``S0..S5``, 3 employers ``E0..E2``):

- A seeker has a skill, years of experience and savings; it is unemployed or works
  for one employer at that employer's wage. An employer posts at most one vacancy at a
  time (a skill and a wage), employs up to 3 workers and starts with a vacancy open.
- Each week has three phases, each a batch of simultaneous decisions (chat messages ->
  the policy -> a JSON answer):

  1. **apply** (JobSeeker, only while unemployed and vacancies exist):
     ``{"apply": ["E0", ...]}`` -- at most 2 open vacancies, ``[]`` to skip.
  2. **hire** (Employer, only with applicants): ``{"hire": "S3"}`` or ``{"hire": null}``
     -- an offer to one applicant.
  3. **accept** (JobSeeker, only with offers): ``{"accept": "E1"}`` or
     ``{"accept": null}``. An accepted offer fills the vacancy; a declined one leaves
     it open.

  Then the week passes: workers earn their wage, everyone pays living costs of 1.0
  (savings may go negative), each worker quits with probability 0.1 (reopening a
  vacancy), and an employer without a vacancy and with room posts a new one (new
  skill and wage) with probability 0.5.

Immediate rewards (per decision, paid once the week's phases are resolved):

- apply: +0.5 if it brought at least one offer, -0.1 per application and a further
  -0.2 per application to a vacancy of another skill (employers value those at -0.5);
- hire: the applicant's worth: 0.2 + 0.1 * years of experience when the skills match,
  -0.5 otherwise; 0 for nobody (paid even when the offer is declined);
- accept: wage / 3.0 (the highest possible wage); 0 for declining;
- an invalid answer: -1.0 (see `simtune.sims.core`); the default action is to skip,
  hire nobody or decline.

Episode returns (spread over each agent's decisions of the episode by the recorder's
credit rule): a seeker's mean net income per week, ``(savings_end - savings_start) /
steps``; an employer's mean weekly output, the sum of its workers' worth per week
divided by ``steps``.

The expert policy (a rule, not an LLM; `ExpertPolicy`) applies to the best-paid
vacancies of its own skill, offers the job to the most experienced applicant of the
right skill (nobody if none) and accepts the best-paid offer -- optimal for the hire
and accept rewards, near-optimal for apply. It bootstraps demonstrations for SFT.

The prompts are short (well under 200 words) so that a small model with
``max_length`` 256-512 sees them whole. The records use chat ``messages`` and carry
the structured state as ``context`` and ``{"episode", "kind"}`` (plus
``invalid_reason`` for invalid answers) as ``metadata``.

`generate` and `write_jsonl` at the end are older and independent: they wrote the
bundled sample ``simtune/data/sample_decisions.jsonl`` (stateless, prompt-string
records; tokenizer corpus and `bench/` data) and are kept so the sample can be regenerated as is.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import combinations
from typing import Any

from simtune.errors import ConfigError
from simtune.sims.core import DecisionRequest, EpisodeContext, load_answer

SEEKER, EMPLOYER = "JobSeeker", "Employer"
MARKET_SKILLS = ("python", "sales", "nursing")
MAX_APPLICATIONS = 2
APPLICATION_COST = 0.1
MISMATCH_COST = 0.2
OFFER_BONUS = 0.5
MISMATCH_WORTH = -0.5
MAX_WAGE = 3.0
LIVING_COST = 1.0
QUIT_PROB = 0.1
POST_PROB = 0.5
CAPACITY = 3


@dataclass
class Seeker:
    id: str
    skill: str
    experience: int
    savings: float
    employer: str | None = None
    wage: float = 0.0
    weeks_unemployed: int = 0


@dataclass
class Employer:
    id: str
    skill: str
    """The open vacancy's skill (the last one's when none is open)."""
    wage: float
    open: bool = True
    workers: dict[str, float] = field(default_factory=dict)
    """worker id -> worth per week (fixed at hire)."""
    output: float = 0.0


def worth(skill: str, seeker: Seeker) -> float:
    """What a worker is worth to an employer per week (and the hire reward)."""
    if seeker.skill != skill:
        return MISMATCH_WORTH
    return round(0.2 + 0.1 * seeker.experience, 3)


def _wage(rng: random.Random) -> float:
    return round(rng.uniform(1.2, MAX_WAGE), 1)


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj)


def _system(role: str) -> dict[str, str]:
    return {
        "role": "system",
        "content": f"You are {role} in a job-market simulation. "
        "Reply with one JSON object and nothing else.",
    }


class JobMarket:
    """The job market (see the module docstring); one instance runs many episodes."""

    name = "job_market"
    description = "seekers apply for jobs and accept offers; employers hire"
    agent_types = (SEEKER, EMPLOYER)
    decision_kinds = ("apply", "hire", "accept")
    default_steps = 6

    def __init__(self, seekers: int = 6, employers: int = 3) -> None:
        if seekers < 1 or employers < 1:
            raise ConfigError("a job market needs at least one seeker and one employer")
        self.n_seekers, self.n_employers = int(seekers), int(employers)

    def agent_type_of(self, agent_id: str) -> str:
        return SEEKER if agent_id.startswith("S") else EMPLOYER

    # --- the episode -----------------------------------------------------------------

    def run_episode(self, ctx: EpisodeContext, rng: random.Random, steps: int) -> dict[str, float]:
        seekers = [
            Seeker(
                f"S{i}",
                rng.choice(MARKET_SKILLS),
                rng.randint(1, 9),
                round(rng.uniform(2.0, 8.0), 1),
            )
            for i in range(self.n_seekers)
        ]
        employers = [
            Employer(f"E{i}", rng.choice(MARKET_SKILLS), _wage(rng))
            for i in range(self.n_employers)
        ]
        by_id = {s.id: s for s in seekers}
        start = {s.id: s.savings for s in seekers}
        for week in range(1, steps + 1):
            when = f"Week {week} of {steps}."
            # 1. apply
            vacancies = [e for e in employers if e.open]
            looking = [s for s in seekers if s.employer is None] if vacancies else []
            applied = ctx.ask([self._apply(s, vacancies, when, week) for s in looking])
            applicants: dict[str, list[Seeker]] = {e.id: [] for e in vacancies}
            for s, t in zip(looking, applied, strict=True):
                for eid in t.action:
                    applicants[eid].append(s)
            # 2. hire
            hiring = [e for e in vacancies if applicants[e.id]]
            hired = ctx.ask([self._hire(e, applicants[e.id], when, week) for e in hiring])
            offers: dict[str, list[Employer]] = {}
            for e, t in zip(hiring, hired, strict=True):
                if t.action is not None:
                    offers.setdefault(t.action, []).append(e)
                ctx.reward(t, 0.0 if t.action is None else worth(e.skill, by_id[t.action]))
            # 3. accept
            chosen = [s for s in seekers if s.id in offers]
            accepted = ctx.ask([self._accept(s, offers[s.id], when, week) for s in chosen])
            for s, t in zip(chosen, accepted, strict=True):
                if t.action is None:
                    ctx.reward(t, 0.0)
                    continue
                e = next(e for e in offers[s.id] if e.id == t.action)
                s.employer, s.wage, s.weeks_unemployed = e.id, e.wage, 0
                e.workers[s.id], e.open = worth(e.skill, s), False
                ctx.reward(t, e.wage / MAX_WAGE)
            skills = {e.id: e.skill for e in vacancies}
            for s, t in zip(looking, applied, strict=True):
                mismatched = sum(skills[eid] != s.skill for eid in t.action)
                value = (
                    OFFER_BONUS * (s.id in offers)
                    - APPLICATION_COST * len(t.action)
                    - MISMATCH_COST * mismatched
                )
                ctx.reward(t, value)
            # 4. the week passes
            for s in seekers:
                s.savings = round(s.savings + s.wage - LIVING_COST, 3)
                s.weeks_unemployed += s.employer is None
            for e in employers:
                e.output += sum(e.workers.values())
            for s in seekers:
                if s.employer is not None and rng.random() < QUIT_PROB:
                    employer = next(e for e in employers if e.id == s.employer)
                    del employer.workers[s.id]
                    s.employer, s.wage = None, 0.0
            for e in employers:
                if not e.open and len(e.workers) < CAPACITY and rng.random() < POST_PROB:
                    e.open, e.skill, e.wage = True, rng.choice(MARKET_SKILLS), _wage(rng)
        returns = {s.id: round((s.savings - start[s.id]) / steps, 4) for s in seekers}
        returns.update({e.id: round(e.output / steps, 4) for e in employers})
        return returns

    # --- decisions -------------------------------------------------------------------

    def _apply(self, s: Seeker, vacancies: list[Employer], when: str, week: int) -> DecisionRequest:
        ids = [e.id for e in vacancies]
        lines = "\n".join(f"- {e.id}: {e.skill}, wage {e.wage:.1f}" for e in vacancies)
        user = (
            f"{when} Your skill: {s.skill}, experience {s.experience} years, savings "
            f"{s.savings:.1f}, unemployed for {s.weeks_unemployed} week(s).\n"
            f"Open vacancies:\n{lines}\n"
            f"Employers only want their skill. Each application costs {APPLICATION_COST}; "
            f"an offer is worth {OFFER_BONUS}.\n"
            f'Apply to at most {MAX_APPLICATIONS}: {{"apply": ["<employer id>", ...]}} '
            "(an empty list to skip)."
        )

        def parse(text: str) -> tuple[str, ...]:
            value = load_answer(text, "apply")
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("'apply' must be a list of employer ids")
            if len(value) > MAX_APPLICATIONS:
                raise ValueError(f"more than {MAX_APPLICATIONS} applications")
            if len(set(value)) != len(value):
                raise ValueError("an employer named twice")
            unknown = [v for v in value if v not in ids]
            if unknown:
                raise ValueError(f"no open vacancy {unknown[0]!r}")
            return tuple(sorted(value))

        fitting = sorted(
            (e for e in vacancies if e.skill == s.skill), key=lambda e: (-e.wage, e.id)
        )
        subsets = [c for k in range(MAX_APPLICATIONS + 1) for c in combinations(ids, k)]
        return DecisionRequest(
            agent_id=s.id,
            agent_type=SEEKER,
            kind="apply",
            messages=[_system("a job seeker"), {"role": "user", "content": user}],
            observation={
                "skill": s.skill,
                "experience": s.experience,
                "savings": s.savings,
                "weeks_unemployed": s.weeks_unemployed,
                "vacancies": [{"id": e.id, "skill": e.skill, "wage": e.wage} for e in vacancies],
            },
            parse=parse,
            default=(),
            expert=_dumps({"apply": [e.id for e in fitting[:MAX_APPLICATIONS]]}),
            choices=[_dumps({"apply": list(c)}) for c in subsets],
            step=week,
        )

    def _hire(self, e: Employer, applicants: list[Seeker], when: str, week: int) -> DecisionRequest:
        ids = [s.id for s in applicants]
        lines = "\n".join(
            f"- {s.id}: {s.skill}, experience {s.experience} years" for s in applicants
        )
        user = (
            f"{when} You need a {e.skill} worker at wage {e.wage:.1f}; "
            f"you employ {len(e.workers)}.\nApplicants:\n{lines}\n"
            "A worker of your skill is worth 0.2 + 0.1 per year of experience; "
            f"one of another skill is worth {MISMATCH_WORTH}.\n"
            'Offer the job to one applicant or nobody: {"hire": "<applicant id>"} '
            'or {"hire": null}.'
        )

        def parse(text: str) -> str | None:
            value = load_answer(text, "hire")
            if value is not None and value not in ids:
                raise ValueError(f"no applicant {value!r}")
            return value

        fitting = sorted(
            (s for s in applicants if s.skill == e.skill), key=lambda s: (-s.experience, s.id)
        )
        return DecisionRequest(
            agent_id=e.id,
            agent_type=EMPLOYER,
            kind="hire",
            messages=[_system("an employer"), {"role": "user", "content": user}],
            observation={
                "skill": e.skill,
                "wage": e.wage,
                "workers": len(e.workers),
                "applicants": [
                    {"id": s.id, "skill": s.skill, "experience": s.experience} for s in applicants
                ],
            },
            parse=parse,
            default=None,
            expert=_dumps({"hire": fitting[0].id if fitting else None}),
            choices=[_dumps({"hire": v}) for v in [None, *ids]],
            step=week,
        )

    def _accept(self, s: Seeker, offers: list[Employer], when: str, week: int) -> DecisionRequest:
        ids = [e.id for e in offers]
        lines = "\n".join(f"- {e.id}: wage {e.wage:.1f}" for e in offers)
        user = (
            f"{when} Your skill: {s.skill}, savings {s.savings:.1f}. Job offers:\n{lines}\n"
            f"Living costs are {LIVING_COST} a week; without a job you earn nothing.\n"
            'Accept one offer or none: {"accept": "<employer id>"} or {"accept": null}.'
        )

        def parse(text: str) -> str | None:
            value = load_answer(text, "accept")
            if value is not None and value not in ids:
                raise ValueError(f"no offer from {value!r}")
            return value

        best = min(offers, key=lambda e: (-e.wage, e.id))
        return DecisionRequest(
            agent_id=s.id,
            agent_type=SEEKER,
            kind="accept",
            messages=[_system("a job seeker"), {"role": "user", "content": user}],
            observation={
                "skill": s.skill,
                "savings": s.savings,
                "offers": [{"id": e.id, "wage": e.wage} for e in offers],
            },
            parse=parse,
            default=None,
            expert=_dumps({"accept": best.id}),
            choices=[_dumps({"accept": v}) for v in [None, *ids]],
            step=week,
        )


# --- the bundled sample (static; regenerates simtune/data/sample_decisions.jsonl) ----------

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
