"""The decision record (DESIGN.md §3) and how other formats map onto it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

# Seed-export and alias fields -> canonical names. Anything not named here or in
# DECISION_FIELDS lands in `metadata`, so nothing a simulator logged is lost.
ALIASES = {
    "trail_id": "run_id",
    "processing_time": "latency_s",
    "completion": "output",
    "low_quality_reason": "reason",
}
DECISION_FIELDS = (
    "decision_id",
    "env_name",
    "run_id",
    "agent_id",
    "agent_type",
    "step",
    "timestamp",
    "prompt",
    "messages",
    "output",
    "tools",
    "tool_calls",
    "reward",
    "rating",
    "feedback",
    "reason",
    "model",
    "latency_s",
    "context",
    "metadata",
)
EVENT_KINDS = ("reward", "rating", "feedback")
_FENCE = re.compile(r"^\s*```[\w+-]*[ \t]*\r?\n(.*?)\r?\n?```\s*$", re.DOTALL)


def unfence(text: str) -> str:
    """'```json\\n{...}\\n```' -> '{...}': the seed simulator wrapped JSON answers in
    markdown fences; training on the fence would teach the model to emit it."""
    m = _FENCE.match(text)
    return m.group(1) if m else text


@dataclass
class Decision:
    """One agent decision: model input, model output and the scores it earned."""

    decision_id: str
    output: str
    """The answer's text; ``""`` for an answer that only called tools (`tool_calls`)."""
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    """OpenAI chat messages: ``role`` and ``content`` (a string), plus ``tool_calls`` on an
    assistant turn that called tools and ``tool_call_id`` on a ``tool`` result."""
    tools: list[dict[str, Any]] | None = None
    """The tool schemas the model was offered (the request's ``tools``, OpenAI's shape)."""
    tool_calls: list[dict[str, Any]] | None = None
    """The tools the answer called, OpenAI's shape (``id``, ``type``, ``function``:
    ``name``, ``arguments`` as JSON text); None for a text answer."""
    env_name: str | None = None
    run_id: str | None = None
    agent_id: str | None = None
    agent_type: str | None = None
    step: int | None = None
    timestamp: str | None = None
    reward: float | None = None
    rating: float | None = None
    feedback: str | None = None
    reason: str | None = None
    model: str | None = None
    latency_s: float | None = None
    context: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """file:line the record came from (not part of the stored format)."""

    def chat_prompt(self, system_prompt: str | None = None) -> list[dict[str, Any]]:
        """The model input as chat messages (a plain prompt becomes one user turn)."""
        msgs = (
            list(self.messages)
            if self.messages
            else [{"role": "user", "content": self.prompt or ""}]
        )
        if system_prompt and msgs[0].get("role") != "system":
            msgs.insert(0, {"role": "system", "content": system_prompt})
        return msgs

    @property
    def score(self) -> float | None:
        """What the decision earned: its reward, else its rating, else None (the rule
        offline PPO, DPO and KTO score decisions by)."""
        if self.reward is not None:
            return float(self.reward)
        return float(self.rating) if self.rating is not None else None

    @property
    def target(self) -> str:
        """The SFT target's text: an improved answer when one exists, else what was said."""
        return self.feedback if self.feedback else self.output

    def target_message(self) -> dict[str, Any]:
        """The SFT target as the assistant message a chat template renders: the improved
        answer (text: feedback is written as text) when one exists, else the answer with
        its tool calls."""
        if self.feedback or not self.tool_calls:
            return {"role": "assistant", "content": self.target}
        return {"role": "assistant", "content": self.output, "tool_calls": self.tool_calls}


def finite_number(value: Any) -> float | None:
    """A finite float, None for null, or raise ValueError (bools and strings are not scores)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer literal too large for a float
        raise ValueError("expected a finite number, got an integer too large for a float") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number
