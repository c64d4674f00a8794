"""Rate decisions with an LLM judge: the seed's verify -> analyze -> refine pipeline.

For each decision that has no rating yet, through any OpenAI-compatible endpoint:

1. **verify**: the judge rates the answer 1-5 with a short reason (the prompt and the
   ``Score: N`` parser of `simtune.rewards`, shared with PPO's judge reward);
2. **analyze**: when the score is below `threshold` (default 4), the judge explains
   what is wrong with the answer -> ``reason``;
3. **refine**: the judge then writes an improved answer in the format the prompt asks
   for -> ``feedback`` (the SFT target from then on).

Analyze and refine continue the verify conversation, so the judge sees its own verdict.
Each rated decision gets one ``rating`` event -- ``{"event": "rating", "decision_id",
"value", "source": "llm", "judge_model", "reason"?, "feedback"?, "verdict",
"timestamp"}`` -- appended through `DecisionLog` (one ``write(2)`` per line) to a new
``decisions_<ts>_....jsonl`` in the output folder as soon as that decision is done.
The output folder is the first dataset path when it is a folder, else the folder of
that file, unless `out_dir` says otherwise. Collected data is never rewritten.

Resumable: decisions that already have a rating (from anyone) are skipped, so a rerun
after Ctrl-C, SIGTERM, failures or unparsable answers rates only the rest. The ratings
that count are those in the given files plus any event in the output folder's
``decisions_*.jsonl`` files (so a rerun on a single file sees the ratings written
beside it). An interrupt loses at most the decisions in flight.

Human ratings are never overwritten: a human-rated decision is never sent to the
judge, not even with `rerate`, which re-rates only decisions the judge rated before
(ratings of unknown origin are left alone too).

Failures: ChatClient retries transport failures (no connection, timeouts, HTTP 408,
409, 429, 5xx) with jittered exponential backoff (``backoff * 2**attempt`` s times a draw
from [1/2, 1], or the server's Retry-After); a decision that still fails is counted, left unrated, and the others go on. After
`max_consecutive_failures` failures in a row (default 20) the run stops: the judge is
down. A verify answer without a score 1-5 is counted as unparsable and nothing is
written for it (a rerun asks again).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simtune.decisions.reader import fold_events, read_dataset, read_events
from simtune.decisions.schema import Decision, unfence
from simtune.decisions.writer import DecisionLog, utc_now
from simtune.errors import ConfigError
from simtune.openai.client import LLMError
from simtune.rewards import JUDGE_KEY_ENV, JudgeReward, check_judge, parse_judge_score

log = logging.getLogger(__name__)

ANALYZE_PROMPT = (
    "You scored this answer {score} out of 5. Explain what is wrong with it: where it breaks "
    "the instructions or the required format, contradicts the agent's situation, or is a poor "
    "decision. Be specific and concise. Do not write a corrected answer yet."
)
REFINE_PROMPT = (
    "Now write an improved answer to the agent's prompt that fixes these problems. Use exactly "
    "the format the prompt asks for (the same JSON keys, if it asks for JSON). Reply with the "
    "improved answer only, with nothing before or after it."
)
OUTCOMES = ("rated", "unparsable", "failed")


@dataclass
class RateReport:
    """What a rating run did. ``not_done`` counts selected decisions neither rated nor
    failed nor unparsable (the run stopped before or while rating them)."""

    total: int = 0
    selected: int = 0
    rated: int = 0
    refined: int = 0
    skipped_rated: int = 0
    skipped_human: int = 0
    unparsable: int = 0
    failed: int = 0
    not_done: int = 0
    calls: int = 0
    retries: int = 0
    scores: list[int] = field(default_factory=list)
    judge_model: str = ""
    out_dir: str = ""
    events_path: str | None = None
    interrupted: bool = False
    aborted: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def mean_score(self) -> float | None:
        return round(sum(self.scores) / len(self.scores), 4) if self.scores else None

    @property
    def complete(self) -> bool:
        """Every selected decision was rated."""
        return self.rated == self.selected

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["scores"]
        out["mean_score"] = self.mean_score
        return out


class RateInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during `rate_decisions`; `.report` says what was done."""

    def __init__(self, report: RateReport) -> None:
        super().__init__("rating interrupted")
        self.report = report


def default_out_dir(paths: Iterable[str]) -> Path:
    first = Path(next(iter(paths))).expanduser()
    return first if first.is_dir() else first.parent


def _check(threshold: float, concurrency: int, max_retries: int, limit: int | None) -> None:
    if not 1 <= float(threshold) <= 5:
        raise ConfigError(f"--threshold: expected a score from 1 to 5, got {threshold!r}")
    if int(concurrency) < 1:
        raise ConfigError(f"--concurrency: expected at least 1, got {concurrency!r}")
    if int(max_retries) < 0:
        raise ConfigError(f"--max-retries: expected 0 or more, got {max_retries!r}")
    if limit is not None and int(limit) < 1:
        raise ConfigError(f"--limit: expected at least 1, got {limit!r}")


def rate_decisions(
    paths: Iterable[str],
    url: str,
    model: str,
    *,
    api_key: str | None = None,
    threshold: float = 4,
    concurrency: int = 4,
    max_retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
    rerate: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    agent_types: list[str] | None = None,
    max_tokens: int = 1024,
    temperature: float = 0.0,
    max_consecutive_failures: int = 20,
    check: bool = True,
    stop: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    on_done: Callable[[str], None] | None = None,
) -> RateReport:
    """Rate the unrated decisions in `paths` with the judge at `url` (see the module
    docstring). `api_key` defaults to $SIMTUNE_JUDGE_API_KEY, else $OPENAI_API_KEY.

    `stop` (set from another thread) ends the run after the decisions in flight;
    `on_start(n)` and `on_done(outcome)` (``rated``/``unparsable``/``failed``, called
    from worker threads) drive a progress display. Raises `RateInterrupted` (with the
    report) on KeyboardInterrupt, SimtuneError when the judge cannot be reached."""
    paths = [str(p) for p in paths]
    _check(threshold, concurrency, max_retries, limit)
    if not model or not str(model).strip():
        raise ConfigError("--judge_model: the judge's model name is required")
    if api_key is None:
        api_key = next((os.environ[k] for k in JUDGE_KEY_ENV if os.environ.get(k)), None)
    dataset = read_dataset(paths)
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(paths)
    _fold_ratings_beside(dataset.decisions, [f.path for f in dataset.files], out)

    report = RateReport(total=len(dataset.decisions), judge_model=model, out_dir=str(out))
    wanted = set(agent_types or ())
    candidates: list[Decision] = []
    for d in dataset.decisions:
        if wanted and d.agent_type not in wanted:
            continue
        source = d.metadata.get("rating_source")
        if source == "human":
            report.skipped_human += 1
        elif d.rating is not None and not (rerate and source == "llm"):
            report.skipped_rated += 1
        else:
            candidates.append(d)
    if limit is not None:
        candidates = candidates[: int(limit)]
    report.selected = len(candidates)
    if not candidates:
        return report
    if check:
        check_judge(url, timeout=min(float(timeout), 10.0), api_key=api_key)
    judge = JudgeReward(
        url,
        model,
        api_key,
        timeout=timeout,
        max_retries=max_retries,
        backoff=backoff,
        max_tokens=max_tokens,
        temperature=temperature,
    )
    run = _Run(
        judge,
        DecisionLog(out),
        report,
        threshold=float(threshold),
        stop=stop or threading.Event(),
        on_done=on_done,
        max_consecutive_failures=max(1, int(max_consecutive_failures)),
    )
    if on_start is not None:
        on_start(len(candidates))
    run.execute(candidates, int(concurrency))
    return report


def _fold_ratings_beside(decisions: list[Decision], read: list[str], folder: Path) -> None:
    """Fold the events of the output folder's logs that were not read already."""
    if not folder.is_dir():
        return
    seen = {Path(p).resolve() for p in read}
    extra = [f for f in sorted(folder.glob("decisions_*.jsonl")) if f.resolve() not in seen]
    if extra:
        fold_events({d.decision_id: d for d in decisions}, read_events(extra))


class _Run:
    """One rating run: daemon worker threads pull decisions from a queue, so an
    interrupt returns at once (the threads die with the process) and nothing is written
    after the log is closed."""

    def __init__(
        self,
        judge: JudgeReward,
        out: DecisionLog,
        report: RateReport,
        *,
        threshold: float,
        stop: threading.Event,
        on_done: Callable[[str], None] | None,
        max_consecutive_failures: int,
    ) -> None:
        self.judge, self.out, self.report = judge, out, report
        self.threshold, self.stop, self.on_done = threshold, stop, on_done
        self.max_consecutive_failures = max_consecutive_failures
        self.params = {"temperature": judge.temperature, "max_tokens": judge.max_tokens}
        self.lock = threading.Lock()
        self.closed = False
        self.consecutive_failures = 0

    def execute(self, candidates: list[Decision], concurrency: int) -> None:
        todo: queue.SimpleQueue[Decision] = queue.SimpleQueue()
        for d in candidates:
            todo.put(d)
        threads = [
            threading.Thread(target=self.worker, args=(todo,), name=f"judge-{i}", daemon=True)
            for i in range(min(concurrency, len(candidates)))
        ]
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():  # a short join keeps the main thread open to Ctrl-C
                    t.join(0.1)
        except KeyboardInterrupt:
            self.stop.set()
            self.finish(interrupted=True)
            raise RateInterrupted(self.report) from None
        self.finish(interrupted=self.stop.is_set() and self.report.aborted is None)

    def finish(self, interrupted: bool) -> None:
        with self.lock:
            self.closed = True  # in-flight workers must not open a new log file now
            self.out.close()
            r = self.report
            r.interrupted = interrupted
            r.not_done = r.selected - r.rated - r.unparsable - r.failed
            stats = self.judge.client.stats()
            r.calls, r.retries = int(stats["calls"]), int(stats["retries"])

    def worker(self, todo: queue.SimpleQueue[Decision]) -> None:
        while not self.stop.is_set():
            try:
                d = todo.get_nowait()
            except queue.Empty:
                return
            score: int | None = None
            error = None
            try:
                outcome, score = self.rate_one(d)
            except LLMError as exc:
                outcome, error = "failed", str(exc)
            except Exception as exc:  # a worker must report, not vanish with the decision
                outcome, error = "failed", f"{type(exc).__name__}: {exc}"
            if outcome == "stopped":
                return
            self.count(d, outcome, score, error)
            if self.on_done is not None:
                self.on_done(outcome)

    def count(self, d: Decision, outcome: str, score: int | None, error: str | None) -> None:
        with self.lock:
            r = self.report
            if outcome == "rated":
                r.rated += 1
                r.scores.append(score or 0)
                if score is not None and score < self.threshold:
                    r.refined += 1
                self.consecutive_failures = 0
            elif outcome == "unparsable":
                r.unparsable += 1
                self.consecutive_failures = 0
            else:
                r.failed += 1
                if len(r.errors) < 5:
                    r.errors.append(f"{d.decision_id}: {error}")
                self.consecutive_failures += 1
                if self.consecutive_failures >= self.max_consecutive_failures and not r.aborted:
                    r.aborted = (
                        f"stopped after {self.consecutive_failures} failures in a row "
                        f"(last: {error})"
                    )
                    self.stop.set()
        if error:
            log.warning("judge failed on decision %s (%s): %s", d.decision_id, d.source, error)

    def ask(self, messages: list[dict[str, str]]) -> str:
        return self.judge.client.chat(messages, **self.params)

    def rate_one(self, d: Decision) -> tuple[str, int | None]:
        messages = self.judge.messages(d.chat_prompt(), d.output)
        verdict = self.ask(messages)
        score = parse_judge_score(verdict)
        if score is None:
            log.warning(
                "judge answer for decision %s (%s) has no score 1-5; not rated: %r",
                d.decision_id,
                d.source,
                verdict[:200],
            )
            return "unparsable", None
        event: dict[str, Any] = {
            "event": "rating",
            "decision_id": d.decision_id,
            "value": float(score),
            "source": "llm",
            "judge_model": self.judge.model,
        }
        if score < self.threshold:
            if self.stop.is_set():
                return "stopped", None
            messages += [
                {"role": "assistant", "content": verdict},
                {"role": "user", "content": ANALYZE_PROMPT.format(score=score)},
            ]
            reason = self.ask(messages).strip()
            if self.stop.is_set():
                return "stopped", None
            messages += [
                {"role": "assistant", "content": reason},
                {"role": "user", "content": REFINE_PROMPT},
            ]
            improved = unfence(self.ask(messages).strip()).strip()
            if reason:
                event["reason"] = reason
            if improved:
                event["feedback"] = improved
        event["verdict"] = verdict.strip()
        event["timestamp"] = utc_now()
        with self.lock:
            if self.closed:
                return "stopped", None
            self.out.append(event)
            self.report.events_path = str(self.out.path)
        return "rated", score
