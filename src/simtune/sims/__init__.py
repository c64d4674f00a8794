"""Example simulations whose agents decide through an LLM, with collection on.

They are the data source of the demo and of the end-to-end tests:

    from simtune.sims import LLMPolicy, run_simulation

    result = run_simulation("job_market", "expert", episodes=20, seed=0)   # demonstrations
    result = run_simulation("job_market", LLMPolicy("http://127.0.0.1:8000/v1"), episodes=5)
    print(result.mean_reward, result.invalid, result.path)

Command line: ``simtune sims list`` and ``simtune sims run NAME (--expert | --random |
--model-url URL) --episodes N``. See `simtune.sims.core` for the runner and policies
and each simulation's module for what it models and how it rewards.
"""

from __future__ import annotations

from simtune.errors import ConfigError
from simtune.sims.core import (
    INVALID_REWARD,
    CallablePolicy,
    DecisionRequest,
    EpisodeContext,
    ExpertPolicy,
    LLMPolicy,
    Policy,
    RandomPolicy,
    SimResult,
    Simulation,
    Ticket,
    run_simulation,
)
from simtune.sims.job_market import JobMarket

SIMULATIONS: dict[str, type] = {JobMarket.name: JobMarket}
"""Simulation name -> class (see `simtune.sims.core.Simulation`); add yours here."""


def get_simulation(name: str) -> type:
    """The simulation class called `name`; a one-line error listing the known ones."""
    try:
        return SIMULATIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown simulation {name!r} (available: {', '.join(sorted(SIMULATIONS))})"
        ) from None


def list_simulations() -> list[dict[str, object]]:
    """Name, description, agent types, decision kinds and default steps of each sim."""
    return [
        {
            "name": name,
            "description": cls.description,
            "agent_types": list(cls.agent_types),
            "decision_kinds": list(cls.decision_kinds),
            "default_steps": cls.default_steps,
        }
        for name, cls in sorted(SIMULATIONS.items())
    ]


__all__ = [
    "INVALID_REWARD",
    "SIMULATIONS",
    "CallablePolicy",
    "DecisionRequest",
    "EpisodeContext",
    "ExpertPolicy",
    "JobMarket",
    "LLMPolicy",
    "Policy",
    "RandomPolicy",
    "SimResult",
    "Simulation",
    "Ticket",
    "get_simulation",
    "list_simulations",
    "run_simulation",
]
