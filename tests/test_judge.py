"""`simtune data rate`: the LLM judge pipeline against a scripted judge server.

The judge is `StubLLM`, a real OpenAI-compatible HTTP server on loopback, answering
from a script that reads which stage (verify / analyze / refine) it is asked. Retries
use a tiny backoff so the file stays fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, run_cli

from simtune.decisions import RateReport, rate_decisions, read_dataset
from simtune.errors import SimtuneError
from simtune.testing.stub_llm import StubLLM


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def rec(i: int | str, output: str, **extra: Any) -> dict[str, Any]:
    return {
        "decision_id": f"d{i}",
        "prompt": f"Decide {i}, answer in JSON.",
        "output": output,
        **extra,
    }


def stage(body: dict[str, Any]) -> str:
    last = body["messages"][-1]["content"]
    if "Explain what is wrong" in last:
        return "analyze"
    if "improved answer" in last:
        return "refine"
    assert "[AGENT ANSWER]" in last, last
    return "verify"


def answer_of(body: dict[str, Any]) -> str:
    """The agent's answer inside the verify prompt (the first user turn)."""
    text = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return text.split("[AGENT ANSWER]\n", 1)[1].split("\n\nGive one or two", 1)[0]


class Judge:
    """Scripted judge: 'good' answers score 5, 'bad' ones 2, 'unsure' ones get no score,
    'crash' ones make the server fail (HTTP 500) while `crash` is on."""

    def __init__(self) -> None:
        self.crash = True
        self.stop_after: tuple[int, threading.Event] | None = None
        self.verifies = 0
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> str:
        kind = stage(body)
        if kind == "analyze":
            return "The quantity contradicts the specification."
        if kind == "refine":
            return '```json\n{"quantity": 100}\n```'
        answer = answer_of(body)
        with self.lock:
            self.verifies += 1
            if self.stop_after and self.verifies == self.stop_after[0]:
                self.stop_after[1].set()
        if "crash" in answer and self.crash:
            raise RuntimeError("judge crashed")  # aiohttp answers 500
        if "unsure" in answer:
            return "I cannot tell whether this is right."
        return "Sensible and well formed.\nScore: 5" if "good" in answer else "Wrong.\nScore: 2"


def verified(llm: StubLLM) -> list[str]:
    """The agent answers the judge was asked to verify, in order."""
    return [answer_of(r["body"]) for r in llm.requests if stage(r["body"]) == "verify"]


def rating_events(folder: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(folder.glob("decisions_*.jsonl")):
        for line in f.read_text().splitlines():
            obj = json.loads(line)
            if obj.get("event") == "rating":
                out.append(obj)
    return out


@pytest.fixture
def judge() -> Judge:
    return Judge()


@pytest.fixture
def llm(judge: Judge) -> Iterator[StubLLM]:
    with StubLLM(reply=judge, model="judge-1") as server:
        yield server


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "datasets"
    write_jsonl(
        folder / "decisions_1.jsonl",
        [
            rec(1, "good answer 1", agent_type="Buyer"),
            rec(2, '{"quantity": 66} bad answer 2', agent_type="Seller"),
            rec(3, "bad answer 3, human-rated", human_rating=1),
            rec(4, "bad answer 4, judge-rated", llm_rating=3),
            rec(5, "good answer 5, human event", agent_type="Buyer"),
            rec(6, "unsure answer 6"),
            rec(7, "bad answer 7, rated by someone", rating=4),
        ],
    )
    write_jsonl(
        folder / "decisions_2.jsonl", [{"event": "rating", "decision_id": "d5", "value": 4}]
    )
    return folder


def rate(folder: Path | str, llm: StubLLM, **kw: Any) -> RateReport:
    kw.setdefault("backoff", 0.01)
    return rate_decisions([str(folder)], llm.url, "judge-1", **kw)


# --- the pipeline ----------------------------------------------------------------------------


def test_verify_analyze_refine_writes_events_that_fold(data: Path, llm: StubLLM) -> None:
    original = (data / "decisions_1.jsonl").read_bytes()
    report = rate(data, llm, api_key="k-123")
    assert (report.total, report.selected, report.rated, report.refined) == (7, 3, 2, 1)
    assert (report.skipped_human, report.skipped_rated) == (2, 2)
    assert (report.unparsable, report.failed, report.not_done) == (1, 0, 0)
    assert report.mean_score == 3.5 and report.calls == 5 and not report.complete
    # Only unrated decisions were sent: never the human-rated d3 and d5.
    assert sorted(verified(llm)) == [
        "good answer 1",
        "unsure answer 6",
        '{"quantity": 66} bad answer 2',
    ]
    assert [stage(r["body"]) for r in llm.requests].count("analyze") == 1
    assert all(r["headers"]["Authorization"] == "Bearer k-123" for r in llm.requests)
    # Analyze and refine continue the verify conversation.
    refine = next(r["body"] for r in llm.requests if stage(r["body"]) == "refine")
    roles = [m["role"] for m in refine["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert refine["messages"][2]["content"] == "Wrong.\nScore: 2"
    assert refine["model"] == "judge-1" and refine["temperature"] == 0.0

    # One new log beside the data; nothing collected was rewritten.
    assert (data / "decisions_1.jsonl").read_bytes() == original
    assert report.events_path and Path(report.events_path).parent == data
    events = [e for e in rating_events(data) if e.get("source") == "llm"]
    assert [
        (e["decision_id"], e["value"]) for e in sorted(events, key=lambda e: e["decision_id"])
    ] == [
        ("d1", 5.0),
        ("d2", 2.0),
    ]
    for e in events:
        assert (e["source"], e["judge_model"]) == ("llm", "judge-1")
        assert e["verdict"].endswith(f"Score: {int(e['value'])}") and e["timestamp"]
    low = next(e for e in events if e["decision_id"] == "d2")
    assert low["reason"] == "The quantity contradicts the specification."
    assert low["feedback"] == '{"quantity": 100}'  # unfenced

    by_id = {d.decision_id: d for d in read_dataset([str(data)]).decisions}
    d1, d2, d3, d5, d6 = (by_id[k] for k in ("d1", "d2", "d3", "d5", "d6"))
    assert (d1.rating, d1.metadata["rating_source"], d1.feedback) == (5.0, "llm", None)
    assert (d2.rating, d2.reason, d2.target) == (2.0, low["reason"], '{"quantity": 100}')
    assert (d3.rating, d3.metadata["rating_source"]) == (1.0, "human")
    assert (d5.rating, d5.metadata["rating_source"]) == (4.0, "human")
    assert d6.rating is None  # unparsable: nothing written, so a rerun asks again


def test_rerun_skips_rated_and_retries_unparsable(data: Path, llm: StubLLM) -> None:
    rate(data, llm)
    llm.requests.clear()
    again = rate(data, llm)
    assert verified(llm) == ["unsure answer 6"]
    assert (again.selected, again.rated, again.unparsable, again.skipped_rated) == (1, 0, 1, 4)
    assert again.events_path is None and len(list(data.glob("decisions_*.jsonl"))) == 3


def test_rerate_redoes_judge_ratings_only(data: Path, llm: StubLLM) -> None:
    rate(data, llm)
    llm.requests.clear()
    report = rate(data, llm, rerate=True)
    # d1, d2 (judge, last run), d4 (llm_rating in the record), d6 (unrated); never d3 and d5
    # (human) nor d7 (a rating of unknown origin).
    assert sorted(verified(llm)) == [
        "bad answer 4, judge-rated",
        "good answer 1",
        "unsure answer 6",
        '{"quantity": 66} bad answer 2',
    ]
    assert (report.skipped_human, report.skipped_rated) == (2, 1)
    d4 = next(d for d in read_dataset([str(data)]).decisions if d.decision_id == "d4")
    assert (d4.rating, d4.metadata["rating_source"]) == (2.0, "llm")  # newest judge rating


def test_limit_and_agent_types(data: Path, llm: StubLLM) -> None:
    report = rate(data, llm, agent_types=["Buyer", "Seller"], limit=1)
    assert verified(llm) == ["good answer 1"] and report.selected == 1 and report.complete


# --- retries and failures --------------------------------------------------------------------


def test_retries_on_429_and_500(data: Path, llm: StubLLM) -> None:
    llm.fail_next(429, 1, retry_after=0)
    llm.fail_next(500, 2)
    report = rate(data, llm, concurrency=1, max_retries=3)
    assert (report.rated, report.failed, report.retries) == (2, 0, 3)
    assert len(llm.requests) == 5 + 3  # the three failed attempts were asked again


def test_retries_on_408_and_409_like_the_openai_client(data: Path, llm: StubLLM) -> None:
    llm.fail_next(408, 1)
    llm.fail_next(409, 1)
    report = rate(data, llm, concurrency=1, max_retries=2)
    assert (report.rated, report.failed, report.retries) == (2, 0, 2)


def test_400_is_not_retried(data: Path, llm: StubLLM) -> None:
    llm.fail_next(400, 1)
    report = rate(data, llm, concurrency=1, max_retries=3)
    assert (report.retries, report.failed) == (0, 1)
    assert "refused the request (HTTP 400" in report.errors[0]


def test_backoff_is_jittered_within_half_to_full_and_capped() -> None:
    import random

    from simtune.openai.client import MAX_DELAY_S, backoff_delay

    rng = random.Random(0)
    for attempt in range(4):
        draws = [backoff_delay(1.0, attempt, rng) for _ in range(200)]
        full = 2.0**attempt
        assert min(draws) >= full / 2 and max(draws) <= full
        assert len({round(d, 6) for d in draws}) > 150  # spread, not one value
    assert backoff_delay(1.0, 20, rng) == MAX_DELAY_S


def test_clients_that_fail_together_retry_apart(stub: StubLLM, caplog) -> None:
    """Two judge clients hit by the same 503s wait different times before retrying (the
    delays they log), each within [1/2, 1] of the exponential step."""
    import logging
    import re

    from simtune.openai.client import ChatClient

    waits = []
    for seed in (1, 2):
        client = ChatClient(stub.url, "judge", max_retries=3, backoff=0.2)
        client.rng.seed(seed)
        stub.fail_next(503, 3)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="simtune.openai.client"):
            assert client.chat([{"role": "user", "content": "Score: ?"}])
        waits.append([float(w) for w in re.findall(r"retrying in ([\d.]+)s", caplog.text)])
        assert client.stats()["retries"] == 3
    assert len(waits[0]) == len(waits[1]) == 3
    assert waits[0] != waits[1]
    for series in waits:
        for attempt, wait in enumerate(series):
            step = 0.2 * 2**attempt
            assert step / 2 - 0.005 <= wait <= step + 0.005


def test_failures_after_retries_are_counted_then_resumed(
    tmp_path: Path, llm: StubLLM, judge: Judge
) -> None:
    folder = tmp_path / "data"
    write_jsonl(
        folder / "decisions_1.jsonl",
        [rec(i, f"good {i}") for i in range(4)] + [rec("x", "crash here")],
    )
    report = rate(folder, llm, max_retries=1)
    assert (report.rated, report.failed, report.retries) == (4, 1, 1)
    assert not report.complete and report.aborted is None
    assert "dx: --judge_url: cannot reach judge" in report.errors[0]
    assert "HTTP 500" in report.errors[0] and "2 attempts" in report.errors[0]
    assert verified(llm).count("crash here") == 2

    judge.crash = False  # the judge is fixed: a rerun rates only the failed one
    llm.requests.clear()
    again = rate(folder, llm)
    assert verified(llm) == ["crash here"]
    assert (again.rated, again.skipped_rated, again.failed) == (1, 4, 0) and again.complete
    assert sorted(e["decision_id"] for e in rating_events(folder)) == [
        "d0",
        "d1",
        "d2",
        "d3",
        "dx",
    ]


def test_consecutive_failures_stop_the_run(tmp_path: Path, llm: StubLLM) -> None:
    folder = tmp_path / "data"
    write_jsonl(folder / "decisions_1.jsonl", [rec(i, f"crash {i}") for i in range(10)])
    report = rate(folder, llm, max_retries=0, concurrency=1, max_consecutive_failures=3)
    assert (report.failed, report.not_done, report.rated) == (3, 7, 0)
    assert report.aborted and "3 failures in a row" in report.aborted
    assert not report.interrupted and not list(folder.glob("decisions_2*"))


def test_unreachable_judge_fails_fast_and_writes_nothing(data: Path) -> None:
    before = sorted(data.iterdir())
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(SimtuneError, match="--judge_url: cannot reach judge"):
        rate_decisions([str(data)], url, "m")
    assert sorted(data.iterdir()) == before


# --- interruption and resuming ---------------------------------------------------------------


def test_stop_ends_after_in_flight_and_rerun_rates_the_rest(
    tmp_path: Path, llm: StubLLM, judge: Judge
) -> None:
    folder = tmp_path / "data"
    write_jsonl(folder / "decisions_1.jsonl", [rec(i, f"good {i}") for i in range(12)])
    stop = threading.Event()
    judge.stop_after = (3, stop)  # the judge's third answer stops the run
    report = rate(folder, llm, concurrency=2, stop=stop)
    assert report.interrupted and 2 <= report.rated <= 4
    assert report.rated + report.not_done == 12
    first = {e["decision_id"] for e in rating_events(folder)}
    assert len(first) == report.rated

    judge.stop_after = None
    llm.requests.clear()
    again = rate(folder, llm, concurrency=4)
    assert again.complete and again.rated == 12 - report.rated
    assert not first & {a.replace("good ", "d") for a in verified(llm)}
    ids = [e["decision_id"] for e in rating_events(folder)]
    assert sorted(ids) == sorted(f"d{i}" for i in range(12))  # each rated exactly once


def test_concurrency_overlaps_requests(tmp_path: Path, judge: Judge) -> None:
    folder = tmp_path / "data"
    write_jsonl(folder / "decisions_1.jsonl", [rec(i, f"good {i}") for i in range(8)])
    with StubLLM(reply=judge, delay=0.3) as slow:
        start = time.monotonic()
        report = rate(folder, slow, concurrency=8)
        elapsed = time.monotonic() - start
    assert report.rated == 8
    assert elapsed < 8 * 0.3 * 0.75  # one at a time would take 2.4 s


# --- the command -----------------------------------------------------------------------------


def test_cli_sigterm_then_rerun_resumes(tmp_path: Path, judge: Judge) -> None:
    folder = tmp_path / "data"
    write_jsonl(folder / "decisions_1.jsonl", [rec(i, f"good {i}") for i in range(10)])
    exe = Path(sys.executable).with_name("simtune")
    with StubLLM(reply=judge, delay=0.25) as slow:
        args = [str(exe), "data", "rate", str(folder), "--judge-url", slow.url]
        args += ["--judge-model", "j", "--concurrency", "1"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while len(rating_events(folder)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        done = len(rating_events(folder))
        assert 2 <= done < 10
        assert (
            "interrupted:" in out
            and f"rerun the same command to rate the remaining {10 - done}" in out
        )

        res = run_cli(*args[1:], "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert (report["rated"], report["skipped_rated"], report["interrupted"]) == (
        10 - done,
        done,
        False,
    )
    ids = [e["decision_id"] for e in rating_events(folder)]
    assert sorted(ids) == sorted(f"d{i}" for i in range(10))


def test_cli_file_input_writes_beside_it_and_resumes(tmp_path: Path, llm: StubLLM) -> None:
    path = write_jsonl(
        tmp_path / "run" / "my_log.jsonl", [rec(1, "good 1"), rec(2, "unsure 2"), rec(3, "bad 3")]
    )
    env = {"SIMTUNE_JUDGE_API_KEY": "from-env"}
    args = ["data", "rate", str(path), "--judge-url", llm.url, "--judge-model", "j"]
    res = _run_with_env(env, *args)
    assert res.returncode == 1, res.stderr  # one unparsable answer: not everything rated
    assert (
        "rated 2 of 3 selected decision(s) with j (mean score 3.50, 1 below threshold" in res.stdout
    )
    assert "unparsable 1" in res.stdout and "remaining 1" in res.stdout
    logs = list(path.parent.glob("decisions_*.jsonl"))
    assert len(logs) == 1 and len(rating_events(path.parent)) == 2
    assert llm.requests[0]["headers"]["Authorization"] == "Bearer from-env"

    llm.requests.clear()
    res = run_cli(*args, "--json")  # the ratings beside the file count as done
    assert verified(llm) == ["unsure 2"]
    assert json.loads(res.stdout)["skipped_rated"] == 2

    out = tmp_path / "elsewhere"
    res = run_cli(*args, "--out", str(out), "--threshold", "9")
    assert res.returncode == 2 and "--threshold: expected a score from 1 to 5" in res.stderr
    assert not out.exists()
    res = run_cli("data", "rate", str(path), "--judge-model", "j")
    assert res.returncode == 2 and "--judge-url" in res.stderr


def test_cli_unreachable_judge_is_one_line(data: Path) -> None:
    res = run_cli(
        "data",
        "rate",
        str(data),
        "--judge-url",
        f"http://127.0.0.1:{free_port()}/v1",
        "--judge-model",
        "m",
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "simtune: error: --judge_url: cannot reach judge"
    )


def _run_with_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("simtune")
    return subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
    )
