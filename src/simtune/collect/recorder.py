"""Record agent decisions from inside a running Python simulation (DESIGN.md §4).

    import simtune

    with simtune.Recorder(env_name="market", run_id="run-1") as rec:
        answer = llm(prompt)
        did = rec.record(prompt=prompt, output=answer, agent_id="a1", agent_type="Trader", step=3)
        rec.reward(did, 0.5)                    # an immediate reward
        rec.rate(did, 4, feedback="better answer")   # a person's (or a judge's) rating
        rec.episode_reward(2.0, agent_id="a1")  # spread over a1's decisions since its last one

Each decision goes to ``<workspace>/envs/<env_name>/datasets/decisions_<ts>_….jsonl``
with one append write; rewards and ratings are appended as event lines (see
`simtune.decisions.writer` for the durability contract and the episode credit rules).
Safe to call from several threads and asyncio tasks (each call is one short,
non-blocking write); several processes each write their own file in the same folder,
and a process forked from a recording one starts its own file.

Capturing every model call instead of calling `record` by hand:

- ``client = rec.wrap(openai.OpenAI(...), agent_type="Trader")`` (or an
  ``AsyncOpenAI``; any object shaped like them): ``client.chat.completions.create(...)``
  and ``client.completions.create(...)`` record the messages (or prompt), the request's
  ``tools``, the first choice's answer (its text as ``output``, its tool calls as
  ``tool_calls``), the model the response names, ``latency_s`` and ``usage`` (into
  metadata). Everything else is the
  client's own (``with_options``/``copy`` return a wrapped client again; calls made
  through ``with_raw_response`` are not recorded). The decision id is set on the
  response as ``response.simtune_decision_id`` and kept in `Recorder.last_decision_id`.
  A call that raises records nothing.
- Streams (``stream=True``, sync or async, iterated directly or used as a context
  manager) hand every chunk to the caller unchanged and record the assembled answer
  once, when the stream has been read to its end (``latency_s`` is then the time to the
  last chunk, metadata ``first_chunk_s`` the time to the first one). A stream that raises
  or is closed or abandoned before its end is not recorded: its text is a fragment, and
  training on fragments teaches a model to stop mid-answer.
- ``@rec.llm`` or ``@rec.llm(agent_type="Trader", model="gpt-x")`` on a
  ``def llm(prompt) -> str`` or ``async def llm(prompt) -> str``: the first argument (or
  ``prompt=``/``messages=``) is the input, a string or a list of chat messages; the
  returned string is the output. Exceptions propagate and record nothing.

Attribution (agent id, agent type, step, extra metadata) of captured calls comes from,
later ones winning field by field: the defaults given to `wrap`/`llm`; the innermost
``with rec.agent(agent_id, agent_type=..., step=..., **metadata):`` block (held in a
context variable, so each thread and each asyncio task sees its own; a nested block
inherits the fields it leaves unset); and, for wrapped clients, a per-call
``simtune={"agent_id": ..., "step": ..., ...}`` keyword, removed before the client sees
the call (keys other than agent_id/agent_type/step go into metadata). `record` itself
uses the ``rec.agent`` block for the fields it is not given.

Messages, answers and stream chunks are read by `simtune.openai.protocol`, the parser
the recording proxy uses on the wire, so a call records the same through either.

Recording a captured call never hides the model's answer from the caller: an answer
that cannot be a training record (empty text, a batch of prompts, token-id prompts) is
skipped with a logged warning. A failure to write (a full disk) does propagate: once a
call returns normally, its record is on disk.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar, Token
from datetime import datetime, timezone
from json.encoder import encode_basestring as _quote  # str -> JSON string literal (C)
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from simtune.collect.rules import CallRules
from simtune.config import resolve_workspace
from simtune.decisions.schema import finite_number
from simtune.decisions.writer import (
    DecisionLog,
    Episodes,
    check_credit,
    datasets_dir,
    encode_json,
    encode_line,
    fork_generation,
    new_decision_id,
    reward_events,
    spread_return,
    utc_now,
)
from simtune.openai.protocol import (
    ProtocolError,
    StreamAssembly,
    answer_of,
    check_messages,
    check_tool_calls,
    check_tools,
    plain,
)
from simtune.util import check_name

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C")
_ATTRIBUTION_KEYS = ("agent_id", "agent_type", "step")


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


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    """The shape the dataset reader accepts (the proxy's and the server's check; null
    content refused), checked before anything is written. A `ProtocolError` is a
    ValueError, the Recorder's error for a bad argument."""
    try:
        return check_messages(messages, null_content=False)
    except ProtocolError as exc:
        raise ProtocolError(f"record: {exc.message}", param=exc.param, code=exc.code) from None


def _check_tools(tools: Any, tool_calls: Any) -> tuple[Any, Any]:
    """`tools` and `tool_calls` in OpenAI's shape (`simtune.openai.protocol`), or a
    ValueError naming the field."""
    try:
        tools = check_tools(tools)
        tool_calls = None if tool_calls is None else check_tool_calls(tool_calls)
    except ProtocolError as exc:
        raise ProtocolError(f"record: {exc.message}", param=exc.param, code=exc.code) from None
    return tools, tool_calls


def _step(step: Any) -> int:
    if isinstance(step, bool):
        raise TypeError(f"record: step must be an integer, got {step!r}")
    try:
        return int(step.__index__())  # ints and integer-like (numpy) scalars only
    except AttributeError:
        raise TypeError(f"record: step must be an integer, got {step!r}") from None


class Attribution(NamedTuple):
    """Who made a captured call: see the module docstring for where each field comes from."""

    agent_id: Any = None
    agent_type: str | None = None
    step: int | None = None
    metadata: dict[str, Any] = {}  # never mutated: merged into new dicts

    def over(
        self, agent_id: Any, agent_type: Any, step: Any, metadata: dict[str, Any]
    ) -> Attribution:
        """These fields, with the given ones (those not None) taking precedence."""
        return Attribution(
            self.agent_id if agent_id is None else agent_id,
            self.agent_type if agent_type is None else agent_type,
            self.step if step is None else step,
            {**self.metadata, **metadata} if metadata else self.metadata,
        )


_NOBODY = Attribution()


class _AgentScope:
    """``with rec.agent(...)``: sets the attribution for the block (this thread/task only)."""

    __slots__ = ("_var", "_fields", "_token")

    def __init__(self, var: ContextVar[Attribution], fields: tuple[Any, ...]) -> None:
        self._var, self._fields = var, fields
        self._token: Token[Attribution] | None = None

    def __enter__(self) -> Attribution:
        value = self._var.get().over(*self._fields)
        self._token = self._var.set(value)
        return value

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            self._var.reset(self._token)
            self._token = None


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
        rules: CallRules | None = None,
    ) -> None:
        self.rules = rules
        """Which calls of a wrapped client are decisions (`simtune.collect.rules`)."""
        self.env_name = check_name(env_name, "env name")
        self.run_id = str(run_id) if run_id is not None else new_run_id()
        check_credit(credit, gamma)
        self.credit, self.gamma, self.model = credit, float(gamma), model
        root = resolve_workspace(workspace)
        self.directory = Path(directory) if directory else datasets_dir(root, self.env_name)
        self.log = DecisionLog(self.directory, fsync=fsync)
        self._episodes = Episodes()
        self._generation = fork_generation()
        self._head = (
            f',"env_name":{_quote(self.env_name)},"run_id":{_quote(self.run_id)},"agent_id":'
        )
        # Per recorder, so two recorders in one task keep separate attributions.
        self._agent: ContextVar[Attribution] = ContextVar(
            f"simtune_agent_{id(self)}", default=_NOBODY
        )
        self._last: ContextVar[str | None] = ContextVar(f"simtune_last_{id(self)}", default=None)

    @property
    def path(self) -> Path | None:
        """The file written so far (None before the first record)."""
        return self.log.path

    @property
    def last_decision_id(self) -> str | None:
        """The id of the last decision recorded by this thread or asyncio task."""
        return self._last.get()

    # --- recording ------------------------------------------------------------------------

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
        tools: list[dict[str, Any]] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        **metadata: Any,
    ) -> str:
        """Append one decision and return its id. Durable once this returns.

        `tools` are the tool schemas the model was offered and `tool_calls` the calls it
        answered with, both in OpenAI's shape (an answer that only called tools has
        ``output=""``); messages may hold assistant turns with ``tool_calls`` and ``tool``
        results (with their ``tool_call_id``).

        Fields not given (agent_id, agent_type, step) come from the enclosing
        ``with rec.agent(...)`` block, whose metadata is merged under ``metadata``.
        """
        scope = self._agent.get()
        if scope is not _NOBODY:
            agent_id, agent_type, step, metadata = scope.over(agent_id, agent_type, step, metadata)
        return self._record(
            output,
            prompt,
            messages,
            agent_id,
            agent_type,
            step,
            model,
            latency_s,
            context,
            reward,
            decision_id,
            metadata,
            tools,
            tool_calls,
        )

    def _record(
        self,
        output: Any,
        prompt: Any,
        messages: Any,
        agent_id: Any,
        agent_type: Any,
        step: Any,
        model: Any,
        latency_s: Any,
        context: Any,
        reward: Any,
        decision_id: Any,
        metadata: dict[str, Any],
        tools: Any = None,
        tool_calls: Any = None,
    ) -> str:
        # Every check comes before the write: a bad call raises and leaves nothing behind.
        if prompt is None:
            if messages is None:
                raise ValueError("record: give exactly one of prompt= or messages=")
            messages = _check_messages(messages)
        elif messages is not None:
            raise ValueError("record: give exactly one of prompt= or messages=")
        elif not isinstance(prompt, str):
            raise TypeError(f"record: prompt must be a string, got {type(prompt).__name__}")
        elif not prompt or prompt.isspace():
            raise ValueError("record: prompt is empty")
        if not isinstance(output, str):
            raise TypeError(f"record: output must be a string, got {type(output).__name__}")
        if tools is not None or tool_calls is not None:
            tools, tool_calls = _check_tools(tools, tool_calls)
        if not tool_calls and (not output or output.isspace()):
            raise ValueError("record: output is empty (the dataset reader would refuse it)")
        if step is not None and type(step) is not int:
            step = _step(step)
        if agent_type is not None and type(agent_type) is not str:
            agent_type = str(agent_type)
        if decision_id is None:
            did = new_decision_id()
        elif isinstance(decision_id, str) and decision_id:
            did = decision_id
        else:
            raise ValueError(f"record: decision_id must be a non-empty string, got {decision_id!r}")
        if agent_id is not None and type(agent_id) is not str:
            agent_id = str(agent_id)
        # The line is assembled from pre-encoded pieces rather than json.dumps of a dict:
        # the same JSON, in half the time (most of a record's cost is encoding).
        parts = [
            '{"decision_id":',
            _quote(did),
            self._head,
            "null" if agent_id is None else _quote(agent_id),
            ',"agent_type":',
            "null" if agent_type is None else _quote(agent_type),
            ',"step":',
            "null" if step is None else str(step),
            ',"timestamp":"',
            utc_now(),
        ]
        if messages is None:
            parts += ('","prompt":', _quote(prompt))
        else:
            parts += ('","messages":', encode_json(messages))
        parts += (',"output":', _quote(output))
        if tools:
            parts += (',"tools":', encode_json(tools))
        if tool_calls:
            parts += (',"tool_calls":', encode_json(tool_calls))
        model = model or self.model
        if model:
            parts += (',"model":', _quote(str(model)))
        if latency_s is not None:
            parts += (',"latency_s":', repr(round(_score(latency_s, "record: latency_s"), 6)))
        if reward is not None:
            parts += (',"reward":', repr(_score(reward, "record: reward")))
        if context is not None:
            parts += (',"context":', encode_json(context))
        if metadata:
            parts += (',"metadata":', encode_json(metadata))
        parts.append("}\n")
        try:
            line = "".join(parts).encode()
        except UnicodeEncodeError:  # a lone surrogate: not writable as UTF-8
            raise ValueError(
                "record: a text field holds a lone surrogate (not valid Unicode)"
            ) from None
        if self._generation != fork_generation():
            # A forked child: the parent's open episodes are the parent's to reward.
            self._episodes, self._generation = Episodes(), fork_generation()
        self.log.append_line(line)
        self._episodes.add(agent_id, did)
        self._last.set(did)
        return did

    def reward(self, decision_id: str, value: float, **extra: Any) -> None:
        """Append a reward event; rewards for the same decision add up on load."""
        event = {
            **extra,
            "event": "reward",
            "decision_id": _decision_id(decision_id, "reward"),
            "value": _score(value, "reward"),
            "timestamp": utc_now(),
        }
        self.log.append_line(encode_line(event))

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
            "decision_id": _decision_id(decision_id, "rate"),
            "value": _score(rating, "rating"),
            "source": source,
            "timestamp": utc_now(),
        }
        if not isinstance(source, str) or not source:
            raise ValueError(
                f"rate: source must be a non-empty string such as 'human' or 'llm', got {source!r}"
            )
        if feedback is not None:
            if not isinstance(feedback, str):
                raise TypeError(f"rate: feedback must be a string, got {type(feedback).__name__}")
            event["feedback"] = feedback
        if reason is not None:
            event["reason"] = str(reason)
        self.log.append_line(encode_line(event))

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
        over them by the rule). Decisions recorded without an agent id form their own
        episode, closed only by ``agent_id=None``. Returns ``{decision_id: share}``
        (empty when nothing was open). The rule (``credit`` of the recorder unless
        given) is written into every event line with the episode's return.
        """
        value = _score(value, "episode reward")
        rule = rule or self.credit
        gamma = self.gamma if gamma is None else gamma
        check_credit(rule, gamma)
        gamma = float(gamma)
        key = None if agent_id is None else str(agent_id)
        if self._generation != fork_generation():
            self._episodes, self._generation = Episodes(), fork_generation()
        shares: dict[str, float] = {}
        for ids in self._episodes.close(lambda k: key is None or k == key).values():
            shares.update(zip(ids, spread_return(value, len(ids), rule, gamma), strict=True))
        # Encode every line before writing any: a batch is written whole or not at all.
        events = reward_events(shares.items(), value, rule, utc_now())
        lines = [encode_line(event) for event in events]
        for line in lines:
            self.log.append_line(line)
        return shares

    # --- attribution and capture ----------------------------------------------------------

    def agent(
        self,
        agent_id: Any = None,
        agent_type: str | None = None,
        step: int | None = None,
        **metadata: Any,
    ) -> _AgentScope:
        """``with rec.agent("a1", agent_type="Trader", step=3):`` attributes the decisions
        recorded in the block (by `record`, wrapped clients and `llm` functions) to that
        agent. Per thread and per asyncio task; a nested block inherits unset fields."""
        return _AgentScope(self._agent, (agent_id, agent_type, step, metadata))

    def _attribution(self, defaults: Attribution, per_call: Any = None) -> Attribution:
        scope = self._agent.get()
        who = defaults if scope is _NOBODY else defaults.over(*scope)
        if per_call is None:
            return who
        if not isinstance(per_call, dict):
            raise TypeError(f"simtune= must be a dict, got {type(per_call).__name__}")
        extra = {k: v for k, v in per_call.items() if k not in _ATTRIBUTION_KEYS}
        return who.over(
            per_call.get("agent_id"), per_call.get("agent_type"), per_call.get("step"), extra
        )

    def _capture(
        self,
        who: Attribution,
        source: Any,
        output: Any,
        *,
        model: Any,
        latency_s: float,
        metadata: dict[str, Any] | None = None,
        tools: Any = None,
        tool_calls: Any = None,
    ) -> str | None:
        """Record one captured call; None (and a warning) when it can't be a record."""
        if isinstance(source, str):
            prompt, messages = source, None
        elif isinstance(source, (list, tuple)) and source and not isinstance(source[0], (str, int)):
            # Response message objects appended to the history become plain dicts.
            try:
                prompt, messages = None, check_messages([plain(m) for m in source])
            except ProtocolError as exc:
                log.warning("simtune: call not recorded: %s", exc)
                return None
        elif isinstance(source, list) and len(source) == 1 and isinstance(source[0], str):
            prompt, messages = source[0], None
        else:
            log.warning(
                "simtune: call not recorded: its input is neither a prompt string nor chat messages"
            )
            return None
        if not isinstance(output, str) or (not tool_calls and (not output or output.isspace())):
            log.warning("simtune: call not recorded: the model's answer is empty or not text")
            return None
        meta = {**who.metadata, **metadata} if metadata else who.metadata
        if self.rules:
            keep, label = self.rules.classify(prompt, messages, output)
            if not keep:
                return None
            if label is not None:
                meta = {**meta, "call": label}
        try:
            return self._record(
                output,
                prompt,
                messages,
                who.agent_id,
                who.agent_type,
                who.step,
                model,
                latency_s,
                None,
                None,
                None,
                dict(meta),
                tools,
                tool_calls,
            )
        except (TypeError, ValueError) as exc:
            log.warning("simtune: call not recorded: %s", exc)
            return None

    def wrap(
        self,
        client: C,
        *,
        agent_id: Any = None,
        agent_type: str | None = None,
        step: int | None = None,
        **metadata: Any,
    ) -> C:
        """An OpenAI-style client (``openai.OpenAI``/``AsyncOpenAI`` or alike) whose
        completion calls are recorded; see the module docstring. Typed as the client it
        wraps (it behaves as one), so editors and type checkers keep the client's API."""
        wrapped = _WrappedClient(self, client, Attribution(agent_id, agent_type, step, metadata))
        return wrapped  # type: ignore[return-value]

    def llm(
        self,
        fn: F | None = None,
        /,
        *,
        agent_id: Any = None,
        agent_type: str | None = None,
        step: int | None = None,
        model: str | None = None,
        **metadata: Any,
    ) -> Any:
        """Decorator recording every call of ``llm(prompt) -> str`` (sync or async):
        ``@rec.llm`` or ``@rec.llm(agent_type=..., model=...)``."""
        defaults = Attribution(agent_id, agent_type, step, metadata)

        def decorate(func: F) -> F:
            if inspect.iscoroutinefunction(func):

                @functools.wraps(func)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    who = self._attribution(defaults)
                    t0 = time.perf_counter()
                    out = await func(*args, **kwargs)
                    self._capture(
                        who,
                        _llm_input(args, kwargs),
                        out,
                        model=model,
                        latency_s=time.perf_counter() - t0,
                    )
                    return out

                return async_wrapper  # type: ignore[return-value]

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                who = self._attribution(defaults)
                t0 = time.perf_counter()
                out = func(*args, **kwargs)
                if inspect.isawaitable(out):  # an async callable that isn't an `async def`
                    return self._capture_later(out, who, _llm_input(args, kwargs), model, t0)
                self._capture(
                    who,
                    _llm_input(args, kwargs),
                    out,
                    model=model,
                    latency_s=time.perf_counter() - t0,
                )
                return out

            return wrapper  # type: ignore[return-value]

        return decorate(fn) if fn is not None else decorate

    async def _capture_later(
        self, pending: Any, who: Attribution, source: Any, model: Any, t0: float
    ) -> Any:
        out = await pending
        self._capture(who, source, out, model=model, latency_s=time.perf_counter() - t0)
        return out

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decision_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what}: decision_id must be a non-empty string, got {value!r}")
    return value


def _llm_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return kwargs.get("prompt", kwargs.get("messages"))


# --- OpenAI-shaped clients ----------------------------------------------------------------


class _StreamState:
    """What a stream has said so far (`StreamAssembly`, shared with the proxy), and when
    its first chunk came."""

    __slots__ = ("assembly", "t0", "first_chunk_s", "done")

    def __init__(self, chat: bool, t0: float) -> None:
        self.assembly = StreamAssembly(chat)
        self.t0 = t0
        self.first_chunk_s: float | None = None
        self.done = False  # recorded, or closed before its end: never record (again)

    def add(self, chunk: Any) -> None:
        if self.first_chunk_s is None:
            self.first_chunk_s = time.perf_counter() - self.t0
        self.assembly.feed(chunk)


class _Call:
    """One captured completion call: what was asked, and how to record the answer."""

    __slots__ = ("rec", "who", "source", "model", "chat", "stream", "extra", "tools", "t0")

    def __init__(self, rec: Recorder, who: Attribution, kwargs: dict[str, Any], chat: bool) -> None:
        self.rec, self.who, self.chat = rec, who, chat
        self.source = kwargs.get("messages") if chat else kwargs.get("prompt")
        self.model = kwargs.get("model")
        self.stream = bool(kwargs.get("stream"))
        self.extra: dict[str, Any] = {}
        # Checked (and a bad one logged, unrecorded) when the answer comes: the client
        # may accept what the reader would not.
        tools = kwargs.get("tools")
        self.tools = [plain(t) for t in tools] if isinstance(tools, (list, tuple)) else tools
        self.t0 = time.perf_counter()

    def response(self, response: Any) -> None:
        latency = time.perf_counter() - self.t0
        meta = dict(self.extra)
        answer = answer_of(response, self.chat)
        if answer.usage:
            meta["usage"] = answer.usage
        did = self.rec._capture(
            self.who,
            self.source,
            answer.text,
            model=answer.model or self.model,
            latency_s=latency,
            metadata=meta,
            tools=self.tools,
            tool_calls=answer.tool_calls,
        )
        if did is not None:
            try:
                response.simtune_decision_id = did
            except Exception:  # a frozen or slotted response: the id is in last_decision_id
                pass

    def stream_end(self, state: _StreamState) -> None:
        state.done = True
        answer = state.assembly.answer()
        if state.assembly.bad is not None:  # an error event: the text is a fragment
            log.warning("simtune: stream not recorded: %s", state.assembly.bad)
            return
        meta = dict(self.extra)
        if answer.usage:
            meta["usage"] = answer.usage
        if state.first_chunk_s is not None:
            meta["first_chunk_s"] = round(state.first_chunk_s, 6)
        self.rec._capture(
            self.who,
            self.source,
            answer.text,
            model=answer.model or self.model,
            latency_s=time.perf_counter() - self.t0,
            metadata=meta,
            tools=self.tools,
            tool_calls=answer.tool_calls,
        )


class _RecordedStream:
    """A sync stream: yields the client's chunks unchanged, records at the end."""

    def __init__(self, stream: Any, call: _Call) -> None:
        self._stream, self._call = stream, call
        self._state = _StreamState(call.chat, call.t0)
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> _RecordedStream:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = iter(self._stream)
        try:
            chunk = next(self._it)
        except StopIteration:
            if not self._state.done:
                self._call.stream_end(self._state)
            raise
        self._state.add(chunk)
        return chunk

    def __enter__(self) -> _RecordedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._state.done = True  # closed: whatever was not read yet never counts
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _RecordedAsyncStream:
    """An async stream: yields the client's chunks unchanged, records at the end."""

    def __init__(self, stream: Any, call: _Call) -> None:
        self._stream, self._call = stream, call
        self._state = _StreamState(call.chat, call.t0)
        self._it: AsyncIterator[Any] | None = None

    def __aiter__(self) -> _RecordedAsyncStream:
        return self

    async def __anext__(self) -> Any:
        if self._it is None:
            self._it = self._stream.__aiter__()
        try:
            chunk = await self._it.__anext__()
        except StopAsyncIteration:
            if not self._state.done:
                self._call.stream_end(self._state)
            raise
        self._state.add(chunk)
        return chunk

    async def __aenter__(self) -> _RecordedAsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._state.done = True
        close = getattr(self._stream, "close", None)
        if close is not None:
            result = close()
            if inspect.isawaitable(result):
                await result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _WrappedCompletions:
    """``client.chat.completions`` or ``client.completions`` with a recording ``create``."""

    def __init__(self, rec: Recorder, target: Any, defaults: Attribution, chat: bool) -> None:
        self._rec, self._target, self._defaults, self._chat = rec, target, defaults, chat

    def create(self, *args: Any, **kwargs: Any) -> Any:
        # Attribution is taken now, where the caller's `with rec.agent(...)` holds, even if
        # an async call is awaited later.
        who = self._rec._attribution(self._defaults, kwargs.pop("simtune", None))
        call = _Call(self._rec, who, kwargs, self._chat)
        result = self._target.create(*args, **kwargs)
        if inspect.isawaitable(result):
            return self._finish_async(result, call)
        if call.stream:
            return _RecordedStream(result, call)
        call.response(result)
        return result

    async def _finish_async(self, pending: Any, call: _Call) -> Any:
        call.t0 = time.perf_counter()  # the request starts now, not when create() was called
        result = await pending
        if call.stream:
            return _RecordedAsyncStream(result, call)
        call.response(result)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class _WrappedChat:
    def __init__(self, rec: Recorder, target: Any, defaults: Attribution) -> None:
        self._target = target
        self.completions = _WrappedCompletions(rec, target.completions, defaults, chat=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class _WrappedClient:
    """The client, with its ``chat.completions.create`` and ``completions.create`` recorded."""

    def __init__(self, rec: Recorder, client: Any, defaults: Attribution) -> None:
        self._simtune = (rec, client, defaults)
        self._parts: dict[str, Any] = {}

    @property
    def chat(self) -> Any:
        if "chat" not in self._parts:
            rec, client, defaults = self._simtune
            self._parts["chat"] = _WrappedChat(rec, client.chat, defaults)
        return self._parts["chat"]

    @property
    def completions(self) -> Any:
        if "completions" not in self._parts:
            rec, client, defaults = self._simtune
            self._parts["completions"] = _WrappedCompletions(
                rec, client.completions, defaults, chat=False
            )
        return self._parts["completions"]

    @property
    def unwrapped(self) -> Any:
        """The client itself (calls through it are not recorded)."""
        return self._simtune[1]

    def with_options(self, *args: Any, **kwargs: Any) -> _WrappedClient:
        rec, client, defaults = self._simtune
        return _WrappedClient(rec, client.with_options(*args, **kwargs), defaults)

    def copy(self, *args: Any, **kwargs: Any) -> _WrappedClient:
        rec, client, defaults = self._simtune
        return _WrappedClient(rec, client.copy(*args, **kwargs), defaults)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._simtune[1], name)

    def __enter__(self) -> _WrappedClient:
        self._simtune[1].__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._simtune[1].__exit__(*exc)

    async def __aenter__(self) -> _WrappedClient:
        await self._simtune[1].__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._simtune[1].__aexit__(*exc)

    def __repr__(self) -> str:
        return f"<recorded {self._simtune[1]!r}>"
