"""The in-process Recorder: records, scores, episode credit, durability under SIGKILL,
concurrency (threads, asyncio tasks, processes), OpenAI client wrapping and the
``@rec.llm`` decorator. Real files, real processes, real HTTP (StubLLM), no mocks."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from simtune.collect.recorder import Recorder
from simtune.decisions.reader import read_dataset
from simtune.errors import ConfigError
from simtune.testing.stub_llm import StubLLM

openai = pytest.importorskip("openai")

PROMPT = "You are trader {i}. Prices: 101, 99, 100. Decide buy or sell."


def load(folder: Path) -> dict[str, Any]:
    return {d.decision_id: d for d in read_dataset([str(folder)]).decisions}


def env_dir(ws: Path, env: str = "market") -> Path:
    return ws / "envs" / env / "datasets"


@pytest.fixture(scope="module")
def stub():
    with StubLLM() as server:
        yield server


# --- records and scores -------------------------------------------------------------------


def test_round_trip_through_reader(workspace: Path) -> None:
    with Recorder("market", run_id="r1", workspace=workspace, model="m-default") as rec:
        d1 = rec.record(
            prompt="buy or sell?", output='{"action": "buy"}', agent_id=7, agent_type="Trader",
            step=1, reward=0.5, context={"price": 101}, mood="calm",
        )  # fmt: skip
        d2 = rec.record(
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            output="hello",
            agent_id="a2",
            model="m-x",
            latency_s=0.25,
        )
        rec.reward(d1, 1.0)
        rec.reward(d1, -0.25)
        rec.rate(d2, 4, feedback="hello there", reason="too curt")
        rec.rate(d2, 1, source="llm")  # a judge never overrides a person
        assert rec.last_decision_id == d2
        path = rec.path
    assert path is not None and path.parent == env_dir(workspace)
    assert path.name.startswith("decisions_") and path.suffix == ".jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6  # 2 records + 4 events, nothing rewritten
    got = load(env_dir(workspace))
    a, b = got[d1], got[d2]
    assert a.prompt == "buy or sell?" and a.output == '{"action": "buy"}'
    assert (a.agent_id, a.agent_type, a.step, a.run_id, a.env_name) == (
        "7",
        "Trader",
        1,
        "r1",
        "market",
    )
    assert a.reward == pytest.approx(1.25)  # 0.5 + 1.0 - 0.25: rewards add up
    assert a.context == {"price": 101} and a.metadata["mood"] == "calm"
    assert a.model == "m-default" and a.timestamp and a.timestamp.endswith("+00:00")
    assert b.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert (b.rating, b.feedback, b.reason) == (4.0, "hello there", "too curt")
    assert b.model == "m-x" and b.latency_s == 0.25 and b.reward is None
    assert len(d1) == 32 and int(d1, 16) >> 76 & 0xF == 4  # uuid4 hex


@pytest.mark.parametrize(
    ("rule", "gamma", "expected"),
    [
        ("uniform", 0.9, [2.0, 2.0, 2.0]),
        ("last", 0.9, [0.0, 0.0, 6.0]),
        ("discounted", 0.5, [1.5, 3.0, 6.0]),
    ],
)
def test_episode_credit_rules(
    workspace: Path, rule: str, gamma: float, expected: list[float]
) -> None:
    with Recorder("market", workspace=workspace, credit=rule, gamma=gamma) as rec:
        ids = [rec.record(prompt=f"p{i}", output="o", agent_id="a", step=i) for i in range(3)]
        other = rec.record(prompt="q", output="o", agent_id="b")
        shares = rec.episode_reward(6.0, agent_id="a")
        assert [shares[i] for i in ids] == pytest.approx(expected)
        assert other not in shares
        assert rec.episode_reward(6.0, agent_id="a") == {}  # the episode is closed
    got = load(env_dir(workspace))
    assert [got[i].reward for i in ids] == pytest.approx(expected)
    assert got[other].reward is None
    events = [json.loads(x) for x in rec.path.read_text().splitlines() if '"event"' in x]
    assert {(e["rule"], e["episode_return"]) for e in events} == {(rule, 6.0)}


def test_episode_reward_for_all_agents_and_rule_override(workspace: Path) -> None:
    with Recorder("market", workspace=workspace) as rec:
        a = [rec.record(prompt="p", output="o", agent_id="a") for _ in range(2)]
        b = rec.record(prompt="p", output="o", agent_id="b")
        anon = rec.record(prompt="p", output="o")
        # agent_id=None: each agent's open episode gets the whole return, spread by the rule.
        shares = rec.episode_reward(4.0)
        assert shares == {a[0]: 2.0, a[1]: 2.0, b: 4.0, anon: 4.0}
        a2 = [rec.record(prompt="p", output="o", agent_id="a") for _ in range(2)]
        assert rec.episode_reward(1.0, "a", rule="discounted", gamma=0.5) == {
            a2[0]: 0.5,
            a2[1]: 1.0,
        }
    got = load(env_dir(workspace))
    assert got[a[0]].reward == 2.0 and got[b].reward == 4.0 and got[a2[0]].reward == 0.5


def _circular() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["me"] = d
    return d


BAD_CALLS = {
    "no input": lambda r: r.record(output="x"),
    "prompt and messages": lambda r: r.record(
        prompt="p", messages=[{"role": "user", "content": "p"}], output="x"
    ),
    "empty output": lambda r: r.record(prompt="p", output="  \n"),
    "output not text": lambda r: r.record(prompt="p", output={"a": 1}),
    "empty prompt": lambda r: r.record(prompt="", output="x"),
    "prompt not text": lambda r: r.record(prompt=3, output="x"),
    "no messages": lambda r: r.record(messages=[], output="x"),
    "message without role": lambda r: r.record(messages=[{"content": "hi"}], output="x"),
    "message content None": lambda r: r.record(
        messages=[{"role": "user", "content": None}], output="x"
    ),
    "step not int": lambda r: r.record(prompt="p", output="x", step="3"),
    "step bool": lambda r: r.record(prompt="p", output="x", step=True),
    "reward NaN": lambda r: r.record(prompt="p", output="x", reward=float("nan")),
    "reward text": lambda r: r.record(prompt="p", output="x", reward="1"),
    "latency text": lambda r: r.record(prompt="p", output="x", latency_s="fast"),
    "empty decision id": lambda r: r.record(prompt="p", output="x", decision_id=""),
    "circular metadata": lambda r: r.record(prompt="p", output="x", info=_circular()),
    "reward no id": lambda r: r.reward("", 1.0),
    "reward not number": lambda r: r.reward("abc", "high"),
    "reward infinite": lambda r: r.reward("abc", float("inf")),
    "rating missing": lambda r: r.rate("abc", None),
    "feedback not text": lambda r: r.rate("abc", 3, feedback=5),
    "rating source empty": lambda r: r.rate("abc", 3, source=""),
    "episode NaN": lambda r: r.episode_reward(float("nan")),
    "episode bad rule": lambda r: r.episode_reward(1.0, rule="bogus"),
    "episode bad gamma": lambda r: r.episode_reward(1.0, rule="discounted", gamma=2),
    # issue 14: what the strict reader would refuse is never written
    "NaN in metadata": lambda r: r.record(prompt="p", output="x", params={"t": float("nan")}),
    "Infinity in context": lambda r: r.record(prompt="p", output="x", context=[float("inf")]),
    "lone surrogate prompt": lambda r: r.record(prompt="a\ud800", output="x"),
    "lone surrogate feedback": lambda r: r.rate("abc", 3, feedback="\udfff"),
    "unknown role": lambda r: r.record(messages=[{"role": "wizard", "content": "x"}], output="y"),
    "metadata nested too deep": lambda r: r.record(prompt="p", output="x", deep=_deep(150)),
}


def _deep(levels: int) -> Any:
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("call", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_arguments_raise_and_write_nothing(workspace: Path, call: Any) -> None:
    rec = Recorder("market", workspace=workspace)
    with pytest.raises((ValueError, TypeError, ConfigError)) as info:
        call(rec)
    assert str(info.value)  # a message saying what is wrong
    rec.close()
    assert rec.path is None and not (workspace / "envs").exists()


def test_bad_recorder_options_and_no_empty_file(workspace: Path) -> None:
    for env in ("../evil", "a/b", "..", ""):
        with pytest.raises(ConfigError, match="env name"):
            Recorder(env, workspace=workspace)
    with pytest.raises(ConfigError, match="fsync"):
        Recorder("market", workspace=workspace, fsync="sometimes")
    with pytest.raises(ConfigError, match="credit"):
        Recorder("market", workspace=workspace, credit="most")
    with Recorder("market", workspace=workspace, fsync="always"):
        pass
    assert not (workspace / "envs").exists()  # nothing recorded: no empty file


def test_fsync_policies_write_the_same(workspace: Path) -> None:
    for policy in ("none", "always", "close"):
        with Recorder("market", workspace=workspace, fsync=policy) as rec:
            rec.record(prompt="p", output=policy)
    assert sorted(d.output for d in load(env_dir(workspace)).values()) == [
        "always",
        "close",
        "none",
    ]


def test_agent_context_applies_to_record(workspace: Path) -> None:
    with Recorder("market", workspace=workspace) as rec:
        with rec.agent("a1", agent_type="Trader", team="red"):
            with rec.agent(step=3):  # inherits a1/Trader
                d1 = rec.record(prompt="p", output="o", note="n")
            d2 = rec.record(prompt="p", output="o", agent_id="a9", step=4)
        d3 = rec.record(prompt="p", output="o")
    got = load(env_dir(workspace))
    assert (got[d1].agent_id, got[d1].agent_type, got[d1].step) == ("a1", "Trader", 3)
    assert got[d1].metadata == {"team": "red", "note": "n"}
    assert (got[d2].agent_id, got[d2].agent_type, got[d2].step) == ("a9", "Trader", 4)
    assert (got[d3].agent_id, got[d3].agent_type) == (None, None)


# --- durability ---------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from simtune.collect.recorder import Recorder

    rec = Recorder("market", run_id=sys.argv[2], workspace=sys.argv[1])
    n = int(sys.argv[3])
    if len(sys.argv) > 4:  # a start line, so that several writers really run at once
        print("ready", flush=True)
        while not os.path.exists(sys.argv[4]):
            time.sleep(0.001)
    i = 0
    while n < 0 or i < n:
        did = rec.record(prompt="price is %d, decide. " % i * 8, output="hold",
                         agent_id="a%d" % (i % 5), step=i)
        sys.stdout.write(did + "\\n")
        sys.stdout.flush()
        i += 1
    rec.close()
    """
)


def spawn(ws: Path, run_id: str, n: int, *go: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(ws), run_id, str(n), *map(str, go)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_records_survive_sigkill(workspace: Path) -> None:
    proc = spawn(workspace, "killed", -1)
    assert proc.stdout is not None
    seen = []
    try:
        while len(seen) < 300:
            line = proc.stdout.readline()
            assert line, "child exited early"
            seen.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # ids printed before the kill landed count too
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    seen += [x for x in rest.split("\n")[:-1] if x]  # the last piece may be a cut-off id
    got = load(env_dir(workspace))  # loads even if the kill tore the last line
    assert set(seen) <= set(got)
    assert all(got[i].run_id == "killed" for i in seen)


def test_torn_last_line_is_skipped_with_warning(workspace: Path, caplog: Any) -> None:
    with Recorder("market", workspace=workspace) as rec:
        ids = [rec.record(prompt="p", output="o") for _ in range(3)]
    path = rec.path
    assert path is not None
    with path.open("ab") as fh:
        fh.write(b'{"decision_id":"torn","prompt":"p","out')  # a write cut short
    with caplog.at_level(logging.WARNING, logger="simtune.decisions.reader"):
        got = load(env_dir(workspace))
    assert sorted(got) == sorted(ids)
    assert f"{path}:4" in caplog.text and "torn" in caplog.text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_writes_its_own_file(workspace: Path) -> None:
    with Recorder("market", workspace=workspace) as rec:
        parent = rec.record(prompt="p", output="parent", agent_id="a")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running pytest's cleanup
            code = 1
            try:
                mine = rec.record(prompt="p", output="child", agent_id="a")
                shares = rec.episode_reward(1.0, "a")  # not the parent's open decision
                os.write(write, json.dumps([mine, list(shares), str(rec.path)]).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        child, child_shares, child_path = json.loads(os.read(read, 65536))
        os.close(read)
        assert os.waitstatus_to_exitcode(status) == 0
        assert child_shares == [child] and child_path != str(rec.path)
        after = rec.record(prompt="p", output="parent again", agent_id="a")
        assert rec.episode_reward(2.0, "a") == {parent: 1.0, after: 1.0}
    got = load(env_dir(workspace))
    assert len(list(env_dir(workspace).iterdir())) == 2
    assert {got[parent].reward, got[child].reward, got[after].reward} == {1.0}


# --- concurrency --------------------------------------------------------------------------


def test_threads(workspace: Path) -> None:
    n_threads, per_thread = 8, 500
    rec = Recorder("market", workspace=workspace)
    lasts: dict[int, list[bool]] = {}

    def work(k: int) -> None:
        ok = []
        with rec.agent(f"t{k}", agent_type="Trader"):
            for i in range(per_thread):
                did = rec.record(prompt=f"t{k} step {i}", output="o", step=i)
                ok.append(rec.last_decision_id == did)
        lasts[k] = ok

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.close()
    assert all(all(v) for v in lasts.values()) and len(lasts) == n_threads
    ds = read_dataset([str(env_dir(workspace))])
    assert ds.duplicate_ids == 0 and len(ds.decisions) == n_threads * per_thread
    for d in ds.decisions:
        assert d.prompt is not None and d.prompt.startswith(f"{d.agent_id} step {d.step}")
    assert rec.log.lines == n_threads * per_thread


def test_processes_write_their_own_files(workspace: Path) -> None:
    go = workspace / "go"
    procs = [spawn(workspace, f"run{k}", 500, go) for k in range(4)]
    assert [p.stdout.readline() for p in procs if p.stdout] == ["ready\n"] * 4
    go.touch()
    printed = {}
    for k, p in enumerate(procs):
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        printed[f"run{k}"] = out.split()
    files = sorted(env_dir(workspace).glob("decisions_*.jsonl"))
    assert len(files) == 4
    ds = read_dataset([str(env_dir(workspace))])
    assert ds.duplicate_ids == 0 and len(ds.decisions) == 2000
    by_run: dict[str, set[str]] = {}
    for d in ds.decisions:
        by_run.setdefault(str(d.run_id), set()).add(d.decision_id)
    assert {k: set(v) for k, v in printed.items()} == by_run
    for f in files:  # one writer per file
        assert len({json.loads(x)["run_id"] for x in f.read_text().splitlines()}) == 1


def test_asyncio_tasks_wrapped_async_client(workspace: Path) -> None:
    rec = Recorder("market", workspace=workspace)

    async def main(url: str) -> list[tuple[str, str | None]]:
        client = rec.wrap(openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0))

        async def agent(i: int) -> tuple[str, str | None]:
            with rec.agent(f"agent-{i}", agent_type="Trader", step=i):
                resp = await client.chat.completions.create(
                    model="stub", messages=[{"role": "user", "content": f"task {i}"}]
                )
                await asyncio.sleep(0)  # let the other tasks run before reading our own id
                return resp.simtune_decision_id, rec.last_decision_id

        try:
            return await asyncio.gather(*(agent(i) for i in range(50)))
        finally:
            await client.close()

    with StubLLM(delay=0.05) as server:  # slow enough that the 50 calls overlap
        pairs = asyncio.run(main(server.url))
    rec.close()
    assert all(a == b for a, b in pairs) and len({a for a, _ in pairs}) == 50
    got = load(env_dir(workspace))
    assert len(got) == 50
    for d in got.values():
        i = int(d.messages[0]["content"].split()[1])
        assert (d.agent_id, d.agent_type, d.step) == (f"agent-{i}", "Trader", i)
        assert d.output == f"stub answer: task {i}"


# --- wrapped OpenAI clients ---------------------------------------------------------------


def test_wrap_sync_chat_and_completions(workspace: Path, stub: StubLLM) -> None:
    rec = Recorder("market", workspace=workspace)
    raw = openai.OpenAI(base_url=stub.url, api_key="x", max_retries=0)
    client = rec.wrap(raw, agent_type="Trader", sim="v1")
    messages = [{"role": "user", "content": "buy or sell?"}]
    resp = client.chat.completions.create(
        model="gpt-test", messages=messages, simtune={"agent_id": "a7", "step": 4, "round": 2}
    )
    assert resp.choices[0].message.content == "stub answer: buy or sell?"
    did = resp.simtune_decision_id
    assert did == rec.last_decision_id
    assert "simtune" not in stub.requests[-1]["body"]
    text = client.completions.create(model="gpt-text", prompt="Say hi")
    assert text.choices[0].text == "stub answer: Say hi"
    # Everything else is the client's own; with_options keeps recording.
    assert client.base_url == raw.base_url and client.models.list().data[0].id == "stub-model"
    again = client.with_options(timeout=30).chat.completions.create(
        model="gpt-test", messages=messages
    )
    rec.close()
    got = load(env_dir(workspace))
    assert len(got) == 3
    d = got[did]
    assert d.messages == messages and d.output == "stub answer: buy or sell?"
    assert (d.agent_id, d.agent_type, d.step, d.model) == ("a7", "Trader", 4, "gpt-test")
    assert d.latency_s is not None and 0 < d.latency_s < 10
    assert d.metadata["sim"] == "v1" and d.metadata["round"] == 2
    assert d.metadata["usage"]["completion_tokens"] == 5
    t = got[text.simtune_decision_id]
    assert (t.prompt, t.output, t.model, t.agent_type) == (
        "Say hi",
        "stub answer: Say hi",
        "gpt-text",
        "Trader",
    )
    assert got[again.simtune_decision_id].agent_id is None


def test_wrap_failed_calls_record_nothing(workspace: Path, stub: StubLLM) -> None:
    rec = Recorder("market", workspace=workspace)
    client = rec.wrap(openai.OpenAI(base_url=stub.url, api_key="x", max_retries=0))
    for status, error in ((400, openai.BadRequestError), (500, openai.InternalServerError)):
        stub.fail_next(status)
        with pytest.raises(error):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    stub.fail_next(500)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
    with pytest.raises(TypeError, match="simtune="):
        client.completions.create(model="m", prompt="x", simtune="a1")
    rec.close()
    assert rec.path is None and rec.last_decision_id is None


def test_wrap_sync_streams(workspace: Path, stub: StubLLM) -> None:
    rec = Recorder("market", workspace=workspace)
    client = rec.wrap(openai.OpenAI(base_url=stub.url, api_key="x", max_retries=0), agent_id="s")
    messages = [{"role": "user", "content": "stream me a long answer please"}]
    stream = client.chat.completions.create(model="m-stream", messages=messages, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "stub answer: stream me a long answer please"
    first = rec.last_decision_id
    with client.completions.create(model="m-text", prompt="count to three", stream=True) as s:
        text2 = "".join(c.choices[0].text for c in s)
    second = rec.last_decision_id
    # Closed before its end: a fragment, not recorded.
    partial = client.chat.completions.create(model="m", messages=messages, stream=True)
    next(iter(partial))
    partial.close()
    rec.close()
    assert rec.last_decision_id == second != first
    got = load(env_dir(workspace))
    assert len(got) == 2
    assert (got[first].output, got[first].model, got[first].agent_id) == (text, "m-stream", "s")
    assert got[first].metadata["first_chunk_s"] <= got[first].latency_s
    assert (got[second].prompt, got[second].output) == ("count to three", text2)


def test_wrap_async_client_and_streams(workspace: Path, stub: StubLLM) -> None:
    rec = Recorder("market", workspace=workspace)

    async def main() -> list[str | None]:
        async with rec.wrap(
            openai.AsyncOpenAI(base_url=stub.url, api_key="x", max_retries=0), agent_type="T"
        ) as client:
            msgs = [{"role": "user", "content": "async hello"}]
            resp = await client.chat.completions.create(model="am", messages=msgs)
            ids = [resp.simtune_decision_id]
            stream = await client.chat.completions.create(model="am", messages=msgs, stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream]
            assert "".join(parts) == "stub answer: async hello"
            ids.append(rec.last_decision_id)
            async with await client.completions.create(
                model="am", prompt="async text", stream=True
            ) as s:
                async for _ in s:
                    pass
            ids.append(rec.last_decision_id)
            stub.fail_next(500)
            with pytest.raises(openai.InternalServerError):
                await client.completions.create(model="am", prompt="boom")
            return ids

    ids = asyncio.run(main())
    rec.close()
    got = load(env_dir(workspace))
    assert len(set(ids)) == 3 and set(ids) == set(got)
    assert got[ids[0]].output == got[ids[1]].output == "stub answer: async hello"
    assert got[ids[2]].prompt == "async text" and got[ids[2]].agent_type == "T"
    assert all(d.latency_s and d.model == "am" for d in got.values())


class BrokenStream:
    """A stream that fails mid-way, as a dropped connection would."""

    def __iter__(self):
        yield {"model": "m", "choices": [{"index": 0, "delta": {"content": "half an "}}]}
        raise ConnectionError("connection dropped")


class DictClient:
    """A minimal OpenAI-shaped client answering with plain dicts (not the openai package)."""

    def __init__(self) -> None:
        self.chat = self
        self.completions = self

    def create(self, **kwargs: Any) -> Any:
        if kwargs.get("stream"):
            return BrokenStream()
        if kwargs["messages"][-1]["content"] == "empty":
            return {"model": "m", "choices": [{"index": 0, "message": {"content": ""}}]}
        if kwargs["messages"][-1]["content"] == "tools":
            call = {"id": "c1", "type": "function", "function": {"name": "buy", "arguments": "{}"}}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        else:
            message = {"role": "assistant", "content": "dict answer"}
        return {"model": "dict-model", "choices": [{"index": 0, "message": message}]}


def test_wrap_duck_typed_client_tool_calls_and_broken_stream(workspace: Path, caplog: Any) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "buy", "arguments": "{}"}}
    rec = Recorder("market", workspace=workspace)
    client = rec.wrap(DictClient())
    with caplog.at_level(logging.WARNING, logger="simtune.collect.recorder"):
        empty = client.chat.completions.create(messages=[{"role": "user", "content": "empty"}])
    assert empty["choices"][0]["message"]["content"] == ""  # the caller still gets it
    assert "not recorded" in caplog.text and rec.path is None
    history: list[Any] = [{"role": "user", "content": "tools"}]
    first = client.chat.completions.create(model="x", messages=history)
    history += [first["choices"][0]["message"], {"role": "user", "content": "and now?"}]
    client.chat.completions.create(model="x", messages=history)
    with pytest.raises(ConnectionError):
        for _ in client.chat.completions.create(model="x", messages=history, stream=True):
            pass
    rec.close()
    got = sorted(load(env_dir(workspace)).values(), key=lambda d: len(d.messages or []))
    assert len(got) == 2  # the broken stream is not recorded
    assert got[0].output == "" and got[0].tool_calls[0]["function"]["name"] == "buy"
    assert got[1].messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert got[1].output == "dict answer" and got[1].model == "dict-model"


# --- decorator ----------------------------------------------------------------------------


def test_llm_decorator_sync_and_async(workspace: Path) -> None:
    rec = Recorder("market", workspace=workspace)

    @rec.llm
    def plain(prompt: str) -> str:
        if prompt == "fail":
            raise RuntimeError("model down")
        return f"echo {prompt}"

    @rec.llm(agent_type="Trader", model="gpt-x", tier="fast")
    async def chat(messages: list[dict[str, str]], temperature: float = 0.0) -> str:
        await asyncio.sleep(0.01)
        return "async " + messages[-1]["content"]

    assert plain.__name__ == "plain"
    with rec.agent("a1", step=2):
        assert plain("hello") == "echo hello"
        first = rec.last_decision_id
    with pytest.raises(RuntimeError, match="model down"):
        plain("fail")
    assert rec.last_decision_id == first

    async def main() -> str | None:
        with rec.agent("a2"):
            assert await chat([{"role": "user", "content": "hi"}], temperature=0.5) == "async hi"
        return rec.last_decision_id

    second = asyncio.run(main())

    class AsyncModel:  # an async callable that is not an `async def` function
        async def __call__(self, prompt: str) -> str:
            return "object " + prompt

    third = rec.llm(AsyncModel())
    assert asyncio.run(third("p3")) == "object p3"
    rec.close()
    got = load(env_dir(workspace))
    assert len(got) == 3
    assert "object p3" in {d.output for d in got.values()}
    assert rec.last_decision_id == first  # ids set inside asyncio.run's tasks stay there
    a, b = got[first], got[second]
    assert (a.prompt, a.output, a.agent_id, a.step, a.model) == (
        "hello",
        "echo hello",
        "a1",
        2,
        None,
    )
    assert a.latency_s is not None
    assert b.messages == [{"role": "user", "content": "hi"}] and b.output == "async hi"
    assert (b.agent_id, b.agent_type, b.model, b.metadata) == (
        "a2",
        "Trader",
        "gpt-x",
        {"tier": "fast"},
    )
    assert b.latency_s >= 0.01


def test_simtune_exports_recorder() -> None:
    import simtune

    assert simtune.Recorder is Recorder
