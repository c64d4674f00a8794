"""Record agent decisions from inside a running Python simulation (DESIGN.md §4).

    import simtune

    with simtune.Recorder(env_name="market", run_id="run-1") as rec:
        answer = llm(prompt)
        did = rec.record(prompt=prompt, output=answer, agent_id="a1", agent_type="Trader", step=3)
        rec.reward(did, 0.5)              # an immediate reward
        rec.episode_reward(2.0, agent_id="a1")  # spread over a1's decisions since its last one

Each decision goes to ``<workspace>/envs/<env_name>/datasets/decisions_<ts>_….jsonl``
with one append write; rewards and ratings are appended as event lines (see
`simtune.decisions.writer` for the durability contract and the episode credit rules).
Safe to call from several threads and asyncio tasks (each call is one short,
non-blocking write); several processes each write their own file in the same folder.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from simtune.decisions.schema import finite_number
from simtune.decisions.writer import (
    DecisionLog,
    Episodes,
    check_credit,
    datasets_dir,
    new_decision_id,
    spread_return,
    utc_now,
)
from simtune.registry import check_name


def new_run_id() -> str:
    return f"run-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _score(value: Any, what: str) -> float:
    try:
        number = finite_number(value)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if number is None:
        raise ValueError(f"{what}: a number is required")
    return number


class Recorder:
    """Collects decisions into an env's dataset folder.

    Args:
        env_name: the simulation's name; the folder ``envs/<env_name>/datasets``.
        run_id: this simulation run (default: a fresh ``run-<utc>-<hex>``).
        workspace: workspace root (default ``$SIMTUNE_HOME`` or the current directory).
        directory: write here instead of the workspace's env folder.
        fsync: ``"none"`` (default; survives the process being killed), ``"always"``
            (survives a power cut; one disk flush per record) or ``"close"``.
        credit: how `episode_reward` spreads a return: ``uniform`` (default),
            ``last`` or ``discounted`` (with ``gamma``).
        model: default ``model`` field of the records (e.g. the LLM's name).
    """

    def __init__(
        self,
        env_name: str,
        run_id: str | None = None,
        *,
        workspace: str | os.PathLike[str] | None = None,
        directory: str | os.PathLike[str] | None = None,
        fsync: str = "none",
        credit: str = "uniform",
        gamma: float = 0.9,
        model: str | None = None,
    ) -> None:
        self.env_name = check_name(env_name, "env name")
        self.run_id = str(run_id) if run_id is not None else new_run_id()
        check_credit(credit, gamma)
        self.credit, self.gamma, self.model = credit, float(gamma), model
        root = workspace or os.environ.get("SIMTUNE_HOME") or os.getcwd()
        self.directory = Path(directory) if directory else datasets_dir(root, self.env_name)
        self.log = DecisionLog(self.directory, fsync=fsync)
        self._episodes = Episodes()

    @property
    def path(self) -> Path | None:
        """The file written so far (None before the first record)."""
        return self.log.path

    def record(
        self,
        *,
        output: str,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        agent_id: Any = None,
        agent_type: str | None = None,
        step: int | None = None,
        model: str | None = None,
        latency_s: float | None = None,
        context: Any = None,
        reward: float | None = None,
        decision_id: str | None = None,
        **metadata: Any,
    ) -> str:
        """Append one decision and return its id. Durable once this returns."""
        if (prompt is None) == (messages is None):
            raise ValueError("record: give exactly one of prompt= or messages=")
        if not isinstance(output, str):
            raise TypeError(f"record: output must be a string, got {type(output).__name__}")
        did = decision_id or new_decision_id()
        rec: dict[str, Any] = {
            "decision_id": did,
            "env_name": self.env_name,
            "run_id": self.run_id,
            "agent_id": None if agent_id is None else str(agent_id),
            "agent_type": agent_type,
            "step": step,
            "timestamp": utc_now(),
        }
        if messages is not None:
            rec["messages"] = messages
        else:
            rec["prompt"] = prompt
        rec["output"] = output
        if model or self.model:
            rec["model"] = model or self.model
        if latency_s is not None:
            rec["latency_s"] = round(float(latency_s), 6)
        if reward is not None:
            rec["reward"] = _score(reward, "reward")
        if context is not None:
            rec["context"] = context
        if metadata:
            rec["metadata"] = metadata
        self.log.append(rec)
        self._episodes.add(rec["agent_id"], did)
        return did

    def reward(self, decision_id: str, value: float, **extra: Any) -> None:
        """Append a reward event; rewards for the same decision add up on load."""
        self.log.append(
            {
                "event": "reward",
                "decision_id": decision_id,
                "value": _score(value, "reward"),
                "timestamp": utc_now(),
                **extra,
            }
        )

    def rate(
        self,
        decision_id: str,
        rating: float,
        feedback: str | None = None,
        *,
        reason: str | None = None,
        source: str = "human",
    ) -> None:
        """Append a rating (and optionally an improved answer and the reason).
        The newest rating wins on load, except that an ``llm`` rating never replaces a
        ``human`` one."""
        event: dict[str, Any] = {
            "event": "rating",
            "decision_id": decision_id,
            "value": _score(rating, "rating"),
            "source": source,
            "timestamp": utc_now(),
        }
        if feedback is not None:
            event["feedback"] = feedback
        if reason is not None:
            event["reason"] = reason
        self.log.append(event)

    def episode_reward(
        self,
        value: float,
        agent_id: Any = None,
        *,
        rule: str | None = None,
        gamma: float | None = None,
    ) -> dict[str, float]:
        """Spread an episode's return over the episode's decisions and close it.

        The episode of ``agent_id`` is that agent's decisions since its last
        `episode_reward`; with ``agent_id=None`` it is every agent's open decisions
        (a shared return: each agent's open decisions get the whole ``value`` spread
        over them by the rule). Returns ``{decision_id: share}`` (empty when nothing was open).
        """
        value = _score(value, "episode reward")
        rule = rule or self.credit
        gamma = self.gamma if gamma is None else float(gamma)
        check_credit(rule, gamma)
        key = None if agent_id is None else str(agent_id)
        shares: dict[str, float] = {}
        for ids in self._episodes.close(lambda k: key is None or k == key).values():
            shares.update(zip(ids, spread_return(value, len(ids), rule, gamma), strict=True))
        now = utc_now()
        for did, share in shares.items():
            self.log.append(
                {
                    "event": "reward",
                    "decision_id": did,
                    "value": share,
                    "episode_return": value,
                    "rule": rule,
                    "timestamp": now,
                }
            )
        return shares

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
