"""YuLan-OneSim's decision files, written the way its code writes them (never copied).

Three writers (RUC-GSAI/YuLan-OneSim):
- `export_step`: ``sim_env._export_data_from_pending_decisions`` at every step end and at
  stop: the *whole cumulative* list of decisions so far, as
  ``<env>/datasets/decisions_%Y%m%d_%H%M%S.json`` (``json.dump(..., indent=4,
  ensure_ascii=True)``);
- `ui_save`: ``backend/routers/feedback.py``: the UI's rate/refine saves the whole list
  again, with ``rating`` (1-5 from an LLM judge), ``reason`` and ``feedback`` (the refined
  answer), as a newer file;
- `db_export`: the database export (one row per decision with ``created_at`` and the
  ``llm_*`` / ``human_*`` columns), as in the shared sample ``processed_data.json``.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

T0 = datetime(2025, 3, 14, 17, 16, 13)


def decision(step: int, agent: int, answer: dict[str, Any], trail: str) -> dict[str, Any]:
    """One pending decision as `queue_decision` builds it (output as the model wrote it:
    a ```json fenced block, which OneSim's `JsonBlockParser` requires)."""
    body = json.dumps(answer, indent=4, ensure_ascii=False)
    return {
        "decision_id": str(uuid.uuid4()),
        "trail_id": trail,
        "universe_id": "main",
        "agent_id": str(agent),
        "step": step,
        "timestamp": (T0 + timedelta(seconds=step)).isoformat(),
        "event_id": None,
        "context": json.dumps({"instruction": f"Decide at step {step}", "observation": None}),
        "prompt": f"\n        ### Agent Profile:\n        agent {agent} 王敏, step {step}\n",
        "output": f"```json\n{body}\n```",
        "processing_time": 0.25 + agent / 10,
    }


def _write(folder: Path, when: datetime, records: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"decisions_{when.strftime('%Y%m%d_%H%M%S')}.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=4, ensure_ascii=True)
    return path


def export_step(folder: Path, step: int, cumulative: list[dict[str, Any]]) -> Path:
    return _write(folder, T0 + timedelta(minutes=step), cumulative)


def ui_save(folder: Path, records: list[dict[str, Any]], ratings: dict[str, Any]) -> Path:
    """`ratings`: decision_id -> (rating, reason, feedback or None) for the rated ones."""
    out = []
    for r in records:
        r = dict(r)
        if r["decision_id"] in ratings:
            r["rating"], r["reason"], r["feedback"] = ratings[r["decision_id"]]
        out.append(r)
    return _write(folder, T0 + timedelta(hours=1), out)


def db_export(path: Path, records: list[dict[str, Any]], human: dict[str, int]) -> Path:
    rows = []
    for r in records:
        row = {**r, "feedback": None, "created_at": r["timestamp"]}
        row.update(
            dict.fromkeys(
                ("llm_rating", "llm_feedback", "llm_reason", "human_feedback", "human_reason"),
                None,
            )
        )
        row["human_rating"] = human.get(r["decision_id"])
        rows.append(row)
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def simulate(env_dir: Path, steps: int = 3, agents: int = 2) -> list[dict[str, Any]]:
    """A run: `steps` cumulative exports into ``env_dir/datasets``; returns the decisions."""
    trail = str(uuid.uuid4())
    made: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        for agent in range(agents):
            made.append(decision(step, agent, {"target_id": str(agent + step)}, trail))
        export_step(env_dir / "datasets", step, made)
    return made
