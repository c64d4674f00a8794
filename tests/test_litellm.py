"""LiteLLM's callback (simtune.collect.litellm): real litellm calls against the stub
OpenAI server over HTTP, recorded as decisions the reader reads back."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

# LiteLLM fetches its model cost map from GitHub on import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip(
    "litellm", reason="LiteLLM is not installed (pip install 'simtune[litellm]')"
)

from simtune.collect.litellm import SimtuneLogger  # noqa: E402
from simtune.collect.recorder import Recorder  # noqa: E402
from simtune.decisions import read_dataset  # noqa: E402
from simtune.testing.stub_llm import StubLLM  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "You are a trader."},
    {"role": "user", "content": "Buy or sell?"},
]


@pytest.fixture
def recorder(tmp_path: Path):
    rec = Recorder(env_name="market", run_id="run-1", workspace=tmp_path)
    # LiteLLM copies `callbacks` into internal success lists on first use; each test
    # starts from none, or an earlier test's logger (and closed recorder) would still run.
    litellm.logging_callback_manager._reset_all_callbacks()
    litellm.callbacks = [SimtuneLogger(rec)]
    try:
        yield rec
    finally:
        litellm.logging_callback_manager._reset_all_callbacks()
        rec.close()


def _decisions(tmp_path: Path, n: int, timeout: float = 20.0) -> list:
    """LiteLLM runs success callbacks of sync calls in a worker thread: wait for them."""
    folder = tmp_path / "envs" / "market" / "datasets"
    deadline = time.monotonic() + timeout
    while True:
        found = read_dataset([str(folder)]).decisions if folder.is_dir() else []
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_a_completion_is_recorded_with_its_agent(tmp_path, recorder):
    with StubLLM(reply=lambda body: '{"action": "buy"}') as llm:
        resp = litellm.completion(
            model="openai/stub-model",
            api_base=llm.url,
            api_key="x",
            messages=MESSAGES,
            metadata={"agent_id": "trader-3", "agent_type": "Trader", "step": 7},
        )
    assert resp.choices[0].message.content == '{"action": "buy"}'
    (d,) = _decisions(tmp_path, 1)
    assert d.output == '{"action": "buy"}'
    assert (d.agent_id, d.agent_type, d.step) == ("trader-3", "Trader", 7)
    assert d.messages == MESSAGES and d.run_id == "run-1"
    assert d.metadata["source"] == "litellm" and d.metadata["finish_reason"] == "stop"
    # the decision id is LiteLLM's call id: a later reward can name the call
    assert d.decision_id == resp._hidden_params["litellm_call_id"]
    recorder.reward(d.decision_id, 2.5)
    (scored,) = _decisions(tmp_path, 1)
    assert scored.reward == 2.5


def test_async_calls_and_the_user_field(tmp_path, recorder):
    async def main(url: str) -> None:
        await asyncio.gather(
            *(
                litellm.acompletion(
                    model="openai/stub-model",
                    api_base=url,
                    api_key="x",
                    messages=[{"role": "user", "content": f"q{i}"}],
                    user=f"agent-{i}",
                )
                for i in range(3)
            )
        )
        # async success callbacks run as tasks on this loop: let them finish before it closes
        folder = tmp_path / "envs" / "market" / "datasets"
        for _ in range(100):
            if folder.is_dir() and len(read_dataset([str(folder)]).decisions) == 3:
                break
            await asyncio.sleep(0.1)

    with StubLLM() as llm:
        asyncio.run(main(llm.url))
    found = _decisions(tmp_path, 3)
    assert sorted(d.agent_id for d in found) == ["agent-0", "agent-1", "agent-2"]
    assert all(d.output.startswith("stub answer: q") for d in found)


def test_a_failed_call_is_not_a_decision(tmp_path, recorder):
    with StubLLM() as llm:
        llm.fail_next(400)
        with pytest.raises(Exception):  # noqa: B017 - litellm maps the 400 to its own class
            litellm.completion(
                model="openai/stub-model",
                api_base=llm.url,
                api_key="x",
                messages=MESSAGES,
                num_retries=0,
            )
        litellm.completion(
            model="openai/stub-model", api_base=llm.url, api_key="x", messages=MESSAGES
        )
    found = _decisions(tmp_path, 1)
    time.sleep(0.5)  # a late callback of the failed call would show up now
    assert len(_decisions(tmp_path, 1)) == len(found) == 1


def test_a_message_the_recorder_refuses_is_logged_not_raised(tmp_path, recorder, caplog):
    logger = litellm.callbacks[0]
    bad = {"call_type": "completion", "messages": [{"role": "robot", "content": "x"}]}
    logger.log_success_event(bad, {"choices": [{"message": {"content": "y"}}]}, None, None)
    assert "not recorded" in caplog.text
    assert _decisions(tmp_path, 1, timeout=0.5) == []
