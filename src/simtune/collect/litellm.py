"""A LiteLLM callback that records every chat completion as a simtune decision.

For simulations that already call their models through LiteLLM (the SDK, or a LiteLLM
proxy in front of several providers): no code change beyond registering the callback.

    import litellm
    from simtune import Recorder
    from simtune.collect.litellm import SimtuneLogger

    litellm.callbacks = [SimtuneLogger(Recorder(env_name="market"))]
    litellm.completion(model="openai/m", messages=msgs, api_base=URL,
                       metadata={"agent_id": "trader-3", "agent_type": "Trader", "step": 7})

On a LiteLLM proxy, put ``simtune_logger = SimtuneLogger(Recorder(env_name="market"))`` in
a module next to its config and name it under ``litellm_settings: callbacks:``. Offline,
set ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (LiteLLM otherwise fetches a price list from
GitHub when it is imported).

Who decided: the call's ``metadata`` (``agent_id``, ``agent_type``, ``step``; on the proxy
the request's ``metadata``), else its ``user`` as the agent id. The decision id is
LiteLLM's ``litellm_call_id``, so a reward that arrives later can name the call
(``recorder.reward(call_id, value)``). Records are written by the `Recorder` (one
``write(2)`` each, like every other way of collecting).

Deliberate simplifications: only chat completions are recorded (text completions,
embeddings and images are skipped); a failed call is not a decision and is not recorded;
a call the Recorder refuses (a malformed message, say) is logged as a warning and never
raised, since a logging callback must not fail the user's call.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from simtune.openai.protocol import answer_of

if TYPE_CHECKING:
    from simtune.collect.recorder import Recorder

try:
    from litellm.integrations.custom_logger import CustomLogger
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "simtune.collect.litellm needs LiteLLM: pip install litellm (or pip install "
        "'simtune[litellm]')"
    ) from exc

log = logging.getLogger(__name__)

CHAT_CALLS = frozenset({"completion", "acompletion"})


class SimtuneLogger(CustomLogger):  # type: ignore[misc]  (litellm is untyped)
    """LiteLLM `CustomLogger` writing one decision record per successful chat call."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any):
        self._record(kwargs, response_obj, start_time, end_time)

    async def async_log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        # One write(2) per record: cheap enough to do on the event loop.
        self._record(kwargs, response_obj, start_time, end_time)

    def _record(self, kwargs: dict[str, Any], response: Any, start: Any, end: Any) -> None:
        if kwargs.get("call_type") not in CHAT_CALLS or not kwargs.get("messages"):
            return
        params = kwargs.get("litellm_params") or {}
        meta = params.get("metadata") or kwargs.get("metadata") or {}
        answer = answer_of(response, chat=True)
        extra: dict[str, Any] = {"source": "litellm"}
        if answer.tool_calls:
            extra["tool_calls"] = answer.tool_calls
        if answer.usage:
            extra["usage"] = answer.usage
        if answer.finish_reason:
            extra["finish_reason"] = answer.finish_reason
        try:
            latency = (end - start).total_seconds()
        except (TypeError, AttributeError):
            latency = None
        try:
            self.recorder.record(
                messages=kwargs["messages"],
                output=answer.text,
                agent_id=meta.get("agent_id") or kwargs.get("user"),
                agent_type=meta.get("agent_type"),
                step=meta.get("step"),
                model=answer.model or kwargs.get("model"),
                latency_s=latency,
                decision_id=kwargs.get("litellm_call_id"),
                **extra,
            )
        except Exception as exc:  # a logging callback must never fail the user's call
            log.warning("LiteLLM call %s not recorded: %s", kwargs.get("litellm_call_id"), exc)
