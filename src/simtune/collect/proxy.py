"""Recording proxy: an OpenAI-compatible server that forwards to an upstream model and
records every exchange as a decision (DESIGN.md §3-4).

Point a simulation's base URL at the proxy instead of at the model server; nothing
else changes. From the command line::

    simtune collect proxy --upstream http://127.0.0.1:8000/v1 --env market
    # -> give the simulation  http://127.0.0.1:8100/v1  (or a per-agent base URL below)

From Python (a background thread, like `simtune.testing.stub_llm.StubLLM`)::

    with RecordingProxy(upstream="http://127.0.0.1:8000/v1", env_name="market") as proxy:
        client = openai.OpenAI(base_url=proxy.base_url(agent_id="a1"), api_key="x")

HTTP contract
-------------
Endpoints (each also under the path prefixes below):

- ``POST /v1/chat/completions``, ``POST /v1/completions``: forwarded to the upstream
  unchanged (same bytes, same headers minus hop-by-hop ones and ``X-Simtune-*``) and
  recorded. ``"stream": true`` is relayed event by event as the upstream sends it; the
  assembled answer is recorded when the upstream's stream ends normally (``[DONE]``,
  or EOF after a ``finish_reason``) and *before* the client sees its end, so a client
  that finished reading a stream finds its decision on disk. A stream that breaks
  (upstream gone, an ``error`` event, the client hanging up) is not recorded; the
  client gets an OpenAI-style ``error`` event, which the openai client raises.
- ``GET /v1/models`` and any other ``/v1/...`` path: passed through, not recorded.
- ``POST /v1/rewards``: ``{"decision_id": ..., "value": R}`` appends a reward event;
  ``{"agent_id": ..., "run_id": ..., "value": R, "rule"?: ..., "gamma"?: ...}`` (no
  decision id) is an *episode* reward: R is spread over that agent's decisions in that
  run since its last episode reward, by `simtune.decisions.writer.spread_return` (the
  rule of `Recorder.episode_reward`; default ``--credit``), and that episode is closed.
  ``agent_id`` and ``run_id`` default to the request's headers / path prefix, and the
  run to the proxy's own run id; with no agent id at all, every agent's open decisions
  in the run get R spread over them (as ``Recorder.episode_reward(agent_id=None)``).
  Answer: ``{"decision_ids": [...], "shares": [...]}`` (+ ``episode_return``, ``rule``,
  ``run_id``, ``agent_id`` for an episode). A reward for an id this proxy never saw
  is still written (it may belong to another file of the env; the reader counts it as
  an orphan otherwise).
- ``POST /v1/ratings``: ``{"decision_id", "rating", "feedback"?, "reason"?,
  "source"?: "human" | "llm"}`` appends a rating event like `Recorder.rate`.
  Both score endpoints also take a JSON list (a batch: all items are checked before any
  is written; the answer is the list of answers).
- ``GET /health``: ``{"status": "ok"}``, no key needed.

Attribution, per request: ``X-Simtune-Agent-Id``, ``X-Simtune-Agent-Type``,
``X-Simtune-Run-Id``, ``X-Simtune-Step`` (an integer; anything else is a 400 naming the
header), or a path prefix before ``/v1`` made of ``runs/<run_id>``,
``agents/<agent_id>`` and ``types/<agent_type>`` pairs in any order, e.g.
``/runs/r7/agents/alice/v1/chat/completions``, so that frameworks which only let you set
a base URL still attribute their calls. Segments are URL-decoded (``%2F`` for a slash)
and must be non-empty UTF-8 (else a 400 naming the segment). A header wins over the
path. Without either, the run is the proxy's run id (``--run-id``, default one per proxy
start) and agent id/type/step are null.

Responses of recorded calls carry the decision id as header ``X-Simtune-Decision-Id``
and as a top-level field ``simtune_decision_id`` (the openai client keeps unknown fields:
``resp.model_extra["simtune_decision_id"]``); in a stream, every chunk carries the field.
A call that is forwarded but cannot be recorded (an empty answer, which the reader
would refuse; a batched or token-id ``prompt``) gets no decision id.

Errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}``: a body that
is not strict JSON (`simtune.jsontext`: NaN/Infinity, lone surrogates, bytes that are not
UTF-8, nesting over ``REQUEST_MAX_DEPTH``; ``param`` names the field), a body that is
not an object, missing or empty ``messages`` / ``prompt``, a malformed message or an
unknown role, a bad ``X-Simtune-Step``, a header holding bytes that are not UTF-8 (all
checked before anything is forwarded, so a stream never starts) -> 400; a request
aiohttp's parser refuses (request line, headers) -> 400 in the same shape; unknown
path -> 404; wrong method -> 405; body over ``max_body_mb`` -> 413; missing or wrong key
when ``api_key`` is set -> 401 (``Authorization: Bearer KEY`` or ``X-Api-Key: KEY``);
upstream unreachable -> 502, upstream timeout -> 504. None of these is forwarded or
recorded. An upstream non-2xx answer is passed through unchanged (status, body bytes,
content type and the other end-to-end headers such as ``Retry-After``) and not recorded.

Upstream credentials: ``upstream_api_key`` is sent as ``Authorization: Bearer ...``;
without it the client's ``Authorization`` header is forwarded as is, unless it carries
the proxy's own ``api_key``.

Records (one JSONL file per proxy process in ``<workspace>/envs/<env>/datasets/``,
written by `DecisionLog`: one write(2) per line, durable against the proxy being
killed once the client has the answer) have the `Recorder` fields: ``decision_id``,
``env_name``, ``run_id``, ``agent_id``, ``agent_type``, ``step``, ``timestamp`` (when
the request arrived), ``messages`` (chat; a null ``content`` stored as ``""``) or
``prompt``, ``tools`` (the request's tool schemas, when it offered any), ``output``
(the first choice's text: ``""`` for an answer that only called tools), ``tool_calls``
(its tool calls, OpenAI's shape, when it made any), ``model`` (the upstream's answer,
else the request's), ``latency_s`` (request forwarded -> answer complete) and
``metadata``: ``source: "proxy"``, ``endpoint``, ``stream``, ``finish_reason``,
``usage``, ``upstream_id``, ``params`` (the other request fields: temperature,
tool_choice, ...). Assistant turns with ``tool_calls`` and ``tool`` results in the
messages are kept as sent.

Episodes are kept in memory (`Episodes`), keyed by (run id, agent id), in the order
the answers completed; a decision rewarded only by id stays in its open episode until
an episode reward closes it. Restarting the proxy forgets open episodes (never records).

Parsing: messages, answers and streams are read by `simtune.openai.protocol` (the
Recorder's and the server's parser too); listening and the non-loopback warning are
`simtune.openai.http.start_site` (shared with `serve`).

Performance: one shared upstream connection pool (``max_connections``), no per-request
logging (``access_log=None``), bodies forwarded as received and answers patched by
inserting the id field rather than re-encoding; see ``bench/proxy_overhead.py``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simtune.collect.rules import CallRules
from simtune.config import resolve_workspace
from simtune.config.proxy import DEFAULT_PORT  # declared with ProxyArgs (--port's default)
from simtune.decisions.schema import finite_number
from simtune.decisions.writer import (
    CREDIT_RULES,
    DecisionLog,
    Episodes,
    check_credit,
    datasets_dir,
    encode_line,
    new_decision_id,
    reward_events,
    spread_return,
    utc_now,
)
from simtune.errors import ConfigError
from simtune.openai.client import base_url as _normalise_url
from simtune.openai.http import (
    LoopThread,
    check_api_key,
    check_headers,
    error_response,
    parse_body,
    reject_from,
    start_site,
)
from simtune.openai.http import Reject as _Reject
from simtune.openai.protocol import (
    Answer,
    ProtocolError,
    StreamAssembly,
    answer_of,
    check_messages,
    check_tool_calls,
    check_tools,
    error_body,
    sse_event,
)
from simtune.util import check_name

if TYPE_CHECKING:
    from aiohttp import ClientResponse, ClientSession, web

log = logging.getLogger(__name__)

DECISION_HEADER = "X-Simtune-Decision-Id"
DECISION_FIELD = "simtune_decision_id"
HEADERS = {
    "agent_id": "X-Simtune-Agent-Id",
    "agent_type": "X-Simtune-Agent-Type",
    "run_id": "X-Simtune-Run-Id",
    "step": "X-Simtune-Step",
}
# Path prefix keys -> attribution fields: /runs/<run>/types/<type>/agents/<agent>/v1/...
PATH_KEYS = {"runs": "run_id", "agents": "agent_id", "types": "agent_type"}
MAX_ID_CHARS = 256
RATING_SOURCES = ("human", "llm")
_RECORDED = {"chat/completions", "completions"}
_SCORES = {"rewards", "ratings"}
# Not forwarded in either direction: hop-by-hop headers (RFC 9110 §7.6.1) and the ones
# aiohttp recomputes for the body it actually sends (length, encoding after it
# decompressed the upstream's answer) or sets itself.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-encoding",
}
_REQUEST_DROP = _HOP | {"host", "accept-encoding", "authorization", "expect"}
_RESPONSE_DROP = _HOP | {"date", "server"}
_UNRECORDED_PARAMS = {"messages", "prompt", "model", "stream", "tools"}  # the record's own


def upstream_base(url: str) -> str:
    """``http://h:p``, ``http://h:p/v1`` or ``.../v1/chat/completions`` -> the ``/v1``
    base; a base with some other path (``https://host/openai/v1``) is kept as given."""
    base = _normalise_url(url, "--upstream")
    if not urllib.parse.urlsplit(base).path:
        base += "/v1"
    return base


def parse_prefix(raw_path: str) -> tuple[dict[str, str], str] | None:
    """``/runs/r1/agents/a%2F1/v1/chat/completions`` ->
    ``({"run_id": "r1", "agent_id": "a/1"}, "chat/completions")``; None when the path is
    not ``[prefix]/v1/...``. Raises `_Reject` (400) on an empty segment."""
    if raw_path.startswith("/v1/"):  # the common case, no prefix
        return {}, raw_path[4:].rstrip("/")
    parts = raw_path.split("/")
    attrs: dict[str, str] = {}
    i = 1
    while i < len(parts):
        seg = parts[i]
        if seg == "v1":
            return attrs, "/".join(parts[i + 1 :]).rstrip("/")
        key = PATH_KEYS.get(seg)
        if key is None or key in attrs or i + 1 >= len(parts):
            return None
        try:
            value = urllib.parse.unquote(parts[i + 1], errors="strict")
        except UnicodeDecodeError:
            raise _Reject(
                400, f"the {seg}/<value> segment is not UTF-8 once URL-decoded", param=seg
            ) from None
        if not value.strip():
            raise _Reject(400, f"empty {seg}/<value> segment in the path {raw_path!r}")
        if len(value) > MAX_ID_CHARS:
            raise _Reject(400, f"{seg}/ segment longer than {MAX_ID_CHARS} characters")
        attrs[key] = value
        i += 2
    return None


def _inject(payload: bytes, field: bytes) -> bytes:
    """Insert ``"key":"value"`` as the first member of the JSON object text `payload`
    (already parsed by the caller). Cheaper than re-encoding and leaves the upstream's
    bytes as they were."""
    i = payload.find(b"{")
    rest = payload[i + 1 :]
    sep = b"" if rest.lstrip().startswith(b"}") else b","
    return payload[: i + 1] + field + sep + rest


def _check_prompt(value: Any) -> str | None:
    """The prompt to record, or None for a valid prompt that is not recordable as one
    text (a batch of prompts, token ids): forwarded, not recorded."""
    if value is None:
        raise _Reject(
            400, "'prompt' is required", param="prompt", code="missing_required_parameter"
        )
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        if not value.strip():
            raise _Reject(400, "'prompt' is empty", param="prompt")
        return value
    if isinstance(value, list) and value:
        return None
    raise _Reject(400, "'prompt' must be a non-empty string or list of prompts", param="prompt")


class RecordingProxy:
    """An OpenAI-compatible recording proxy (see the module docstring for the contract).

    Args:
        upstream: the model server's base URL (``http://host:port[/v1]``).
        env_name: the simulation's name: records go to ``envs/<env_name>/datasets``.
        host, port: where to listen (port 0: any free port; see `port` after `start`).
            Loopback by default; any other address logs a warning.
        api_key: clients must send this key (``Authorization: Bearer``) when set.
        upstream_api_key: key sent to the upstream (default: forward the client's).
        workspace: workspace root (default ``$SIMTUNE_HOME`` or the current directory).
        directory: write here instead of the workspace's env folder.
        run_id: default run id of requests that name none (default: a fresh one).
        fsync: `DecisionLog` policy: ``none``, ``always`` or ``close``.
        credit, gamma: default episode credit rule (`spread_return`).
        max_body_mb: largest request body accepted (413 above).
        timeout: seconds the upstream may stay silent (connect 10 s; no total limit,
            so long generations and streams are fine).
        max_connections: size of the upstream keep-alive pool (concurrent calls).
        shutdown_timeout: seconds `stop` waits for calls in flight to finish.
    """

    def __init__(
        self,
        upstream: str,
        env_name: str,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        api_key: str | None = None,
        upstream_api_key: str | None = None,
        workspace: str | os.PathLike[str] | None = None,
        directory: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        fsync: str = "none",
        credit: str = "uniform",
        gamma: float = 0.9,
        max_body_mb: float = 16.0,
        timeout: float = 600.0,
        max_connections: int = 256,
        shutdown_timeout: float = 10.0,
        rules: CallRules | None = None,
    ) -> None:
        from simtune.collect.recorder import new_run_id

        self.rules = rules
        self.skipped = 0  # calls the rules kept out of the log

        self.upstream = upstream_base(upstream)
        self.env_name = check_name(env_name, "env name (--env)")
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {port}")
        if credit not in CREDIT_RULES:
            raise ConfigError(f"--credit must be one of {', '.join(CREDIT_RULES)}, got {credit!r}")
        check_credit(credit, gamma)
        if not max_body_mb > 0:
            raise ConfigError(f"--max-body-mb must be positive, got {max_body_mb}")
        if not timeout > 0:
            raise ConfigError(f"--timeout must be positive, got {timeout}")
        if run_id is not None and not str(run_id).strip():
            raise ConfigError("--run-id must not be empty")
        self.host, self.port = host, int(port)
        self.api_key = api_key or None
        self.upstream_api_key = upstream_api_key or None
        self.run_id = str(run_id) if run_id is not None else new_run_id()
        self.credit, self.gamma = credit, float(gamma)
        self.max_body = int(max_body_mb * 1024 * 1024)
        self.timeout, self.max_connections = float(timeout), int(max_connections)
        self.shutdown_timeout = float(shutdown_timeout)
        root = resolve_workspace(workspace)
        self.directory = Path(directory) if directory else datasets_dir(root, self.env_name)
        self.log = DecisionLog(self.directory, fsync=fsync)
        self.decisions = 0  # recorded so far
        self.events = 0  # reward/rating lines so far
        self._episodes = Episodes()
        self._key = self.api_key.encode() if self.api_key else None
        self._upstream_urls: dict[str, Any] = {}
        self._session: ClientSession | None = None
        self._runner: Any = None
        # A thread of its own, or the foreground until a signal (shared with the server).
        self._lifecycle = LoopThread(
            self._startup,
            self._shutdown,
            name="simtune-proxy",
            join_timeout=self.shutdown_timeout + 30,
        )
        self._unrecordable_warned = False
        self._serving = False

    # --- public helpers ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """The ``/v1`` base URL to give a simulation."""
        return self.base_url()

    @property
    def path(self) -> Path | None:
        """The JSONL file written so far (None before the first record or event)."""
        return self.log.path

    def base_url(
        self,
        agent_id: str | None = None,
        *,
        run_id: str | None = None,
        agent_type: str | None = None,
    ) -> str:
        """A base URL whose path prefix attributes every call made through it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        prefix = ""
        for key, value in (("runs", run_id), ("types", agent_type), ("agents", agent_id)):
            if value is not None:
                prefix += f"/{key}/{urllib.parse.quote(str(value), safe='')}"
        return f"http://{host}:{self.port}{prefix}/v1"

    # --- lifecycle ----------------------------------------------------------------------

    async def _startup(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.timeout),
            # Never route the upstream through $HTTP_PROXY: it is usually on loopback.
            trust_env=False,
        )
        try:
            self._runner, self.port = await start_site(
                self._dispatch,
                host=self.host,
                port=self.port,
                max_body=self.max_body,
                shutdown_timeout=self.shutdown_timeout,
                keyed=self.api_key is not None,
                reach="upstream model",
            )
        except ConfigError:
            await self._shutdown()  # the upstream session and the log
            raise
        self._serving = True
        log.info(
            "recording proxy for env %r (run %s): give the simulation %s ; forwarding to %s ; "
            "decisions go to %s",
            self.env_name,
            self.run_id,
            self.url,
            self.upstream,
            self.directory / "decisions_<start>_<pid>_<hex>.jsonl",
        )

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.log.close()
        if not self._serving:  # start-up failed: the caller reports why
            return
        self._serving = False
        if self.log.path is not None:
            log.info(
                "proxy stopped: %d decision(s) and %d score event(s) in %s",
                self.decisions,
                self.events,
                self.log.path,
            )
        else:
            log.info("proxy stopped: nothing recorded")

    def start(self) -> RecordingProxy:
        """Serve in a background thread; returns once listening (`port` is then set)."""
        self._lifecycle.start()
        return self

    def stop(self) -> None:
        """Stop serving (calls in flight get `shutdown_timeout` to finish)."""
        self._lifecycle.stop()

    def __enter__(self) -> RecordingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT or SIGTERM, then shut down cleanly."""
        self._lifecycle.run_until_signal(
            f"stopping (waiting up to {self.shutdown_timeout:g}s for calls in flight)"
        )

    # --- request handling ---------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            raw_path = request.rel_url.raw_path
            route = parse_prefix(raw_path)
            if route is None:
                if raw_path == "/health" and request.method == "GET":
                    from aiohttp import web

                    return web.json_response({"status": "ok"})
                raise _Reject(
                    404,
                    f"unknown path {request.path!r}: use /v1/... optionally after "
                    "/runs/<run_id>, /types/<agent_type>, /agents/<agent_id>",
                    code="not_found",
                )
            self._check_key(request)
            check_headers(request.headers)
            attrs, endpoint = route
            if endpoint in _RECORDED or endpoint in _SCORES:
                if request.method != "POST":
                    raise _Reject(
                        405, f"/v1/{endpoint} takes POST, not {request.method}", code="method"
                    )
                if endpoint in _SCORES:
                    return await self._scores(request, attrs, endpoint)
                return await self._completion(request, attrs, endpoint)
            return await self._passthrough(request, endpoint)
        except _Reject as exc:
            return error_response(exc)
        except ConnectionError as exc:  # the client hung up (mid-body, say): not a bug
            log.info("client hung up during %s %s (%s)", request.method, request.path, exc)
            return error_response(_Reject(400, "the client hung up", code="client_gone"))
        except Exception:  # a bug: the client still gets an OpenAI-style answer
            log.exception("proxy error on %s %s", request.method, request.path)
            return error_response(
                _Reject(500, "internal error in the simtune proxy", type_="server_error")
            )

    def _check_key(self, request: web.Request) -> None:
        check_api_key(
            request.headers,
            self._key,
            "missing or wrong API key for the simtune proxy (send Authorization: Bearer KEY)",
        )

    async def _body(self, request: web.Request) -> bytes:
        from aiohttp import web

        too_big = _Reject(
            413,
            f"request body over the proxy's limit of {self.max_body} bytes (--max-body-mb)",
            code="request_too_large",
        )
        if request.content_length is not None and request.content_length > self.max_body:
            raise too_big
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:  # a chunked body that grew too large
            raise too_big from None

    async def _json(self, request: web.Request) -> Any:
        return parse_body(await self._body(request))

    def _who(self, request: web.Request, attrs: dict[str, str]) -> dict[str, Any]:
        """Attribution: headers, then path prefix, then the proxy's defaults."""
        h = request.headers
        who: dict[str, Any] = {}
        for key in ("run_id", "agent_id", "agent_type"):
            value = h.get(HEADERS[key]) or attrs.get(key)
            if value is not None and len(value) > MAX_ID_CHARS:
                raise _Reject(
                    400, f"{HEADERS[key]} longer than {MAX_ID_CHARS} characters", param=key
                )
            who[key] = value
        who["run_id"] = who["run_id"] or self.run_id
        step = h.get(HEADERS["step"])
        if step:
            try:
                who["step"] = int(step)
            except ValueError:
                raise _Reject(
                    400,
                    f"header {HEADERS['step']} must be an integer, got {step[:50]!r}",
                    param=HEADERS["step"],
                ) from None
        else:
            who["step"] = None
        return who

    def _forward_headers(self, request: web.Request) -> dict[str, str]:
        out = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in _REQUEST_DROP and not k.lower().startswith("x-simtune-")
        }
        if self._key is not None:
            out = {k: v for k, v in out.items() if k.lower() != "x-api-key"}
        if self.upstream_api_key:
            out["Authorization"] = f"Bearer {self.upstream_api_key}"
        else:
            auth = request.headers.get("Authorization")
            # The proxy's own key is for the proxy; never hand it to the upstream.
            if auth and not (self.api_key and self.api_key in auth):
                out["Authorization"] = auth
        return out

    def _upstream_url(self, endpoint: str, query: str = "") -> Any:
        from yarl import URL

        if query:
            return URL(f"{self.upstream}/{endpoint}?{query}", encoded=True)
        url = self._upstream_urls.get(endpoint)
        if url is None:
            # encoded=True: forward the path exactly as the client encoded it.
            url = URL(f"{self.upstream}/{endpoint}", encoded=True)
            if len(self._upstream_urls) < 64:  # only a handful of endpoints are real
                self._upstream_urls[endpoint] = url
        return url

    @staticmethod
    def _relay_headers(up: ClientResponse) -> dict[str, str]:
        return {k: v for k, v in up.headers.items() if k.lower() not in _RESPONSE_DROP}

    async def _passthrough(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        from aiohttp import web

        if ".." in urllib.parse.unquote(endpoint).split("/"):
            raise _Reject(404, f"unknown path {request.path!r}", code="not_found")
        body = await self._body(request) if request.body_exists else None
        url = self._upstream_url(endpoint, request.rel_url.raw_query_string)
        async with self._call_upstream(request.method, url, body, request) as up:
            raw = await up.read()
            return web.Response(body=raw, status=up.status, headers=self._relay_headers(up))

    def _call_upstream(self, method: str, url: Any, body: bytes | None, request: Any) -> Any:
        assert self._session is not None
        return _UpstreamCall(self._session, method, url, body, self._forward_headers(request))

    async def _completion(
        self, request: web.Request, attrs: dict[str, str], endpoint: str
    ) -> web.StreamResponse:
        from aiohttp import web

        chat = endpoint == "chat/completions"
        body = await self._body(request)
        payload = parse_body(body)
        if not isinstance(payload, dict):
            raise _Reject(400, "the request body must be a JSON object", code="invalid_json")
        who = self._who(request, attrs)
        tools = None
        if chat:
            try:
                # The request is forwarded as sent; these are the messages to record.
                messages: list[dict[str, Any]] | None = check_messages(payload.get("messages"))
                tools = check_tools(payload.get("tools"))
            except ProtocolError as exc:
                raise reject_from(exc) from None
            prompt = None
        else:
            messages, prompt = None, _check_prompt(payload.get("prompt"))
            if prompt is None and not self._unrecordable_warned:
                self._unrecordable_warned = True
                log.warning("a batched or token-id 'prompt' is forwarded but not recorded")
        recordable = messages is not None or prompt is not None
        exchange = _Exchange(
            self, who, endpoint, chat, messages, prompt, payload, new_decision_id(), recordable
        )
        exchange.tools = tools
        url = self._upstream_url(endpoint)
        async with self._call_upstream("POST", url, body, request) as up:
            headers = self._relay_headers(up)
            if not 200 <= up.status < 300:  # passed through as is, not a decision
                raw = await up.read()
                return web.Response(body=raw, status=up.status, headers=headers)
            if up.content_type == "text/event-stream":
                return await exchange.relay_stream(request, up, headers)
            raw = await up.read()
            if recordable and not _client_gone(request):
                raw = exchange.finish_json(raw, headers)
            return web.Response(body=raw, status=up.status, headers=headers)

    def _record(self, ex: _Exchange, answer: Answer) -> bool:
        """Write the decision record; False when it was not written (skipped by the call
        rules, or not encodable)."""
        output = answer.text
        label = None
        if self.rules:
            keep, label = self.rules.classify(ex.prompt, ex.messages, output)
            if not keep:
                self.skipped += 1
                return False
        who = ex.who
        rec: dict[str, Any] = {
            "decision_id": ex.decision_id,
            "env_name": self.env_name,
            "run_id": who["run_id"],
            "agent_id": who["agent_id"],
            "agent_type": who["agent_type"],
            "step": who["step"],
            "timestamp": ex.timestamp,
        }
        if ex.messages is not None:
            rec["messages"] = ex.messages
        else:
            rec["prompt"] = ex.prompt
        if ex.tools:
            rec["tools"] = ex.tools
        rec["output"] = output
        if answer.tool_calls:
            try:
                rec["tool_calls"] = check_tool_calls(answer.tool_calls)
            except ProtocolError as exc:  # the reader would refuse the record
                log.warning("decision %s not recorded: the answer's %s", ex.decision_id, exc)
                return False
        model = answer.model or ex.payload.get("model")
        if model:
            rec["model"] = str(model)
        rec["latency_s"] = round(time.perf_counter() - ex.started, 6)
        metadata: dict[str, Any] = {"source": "proxy", "endpoint": ex.endpoint}
        if label is not None:
            metadata["call"] = label
        metadata["stream"] = bool(ex.payload.get("stream"))
        meta = {
            "finish_reason": answer.finish_reason,
            "n_choices": answer.n_choices if answer.n_choices > 1 else None,
            "usage": answer.usage,
            "upstream_id": answer.id,
        }
        metadata.update((k, v) for k, v in meta.items() if v is not None)
        params = {k: v for k, v in ex.payload.items() if k not in _UNRECORDED_PARAMS}
        if params:
            metadata["params"] = params
        rec["metadata"] = metadata
        try:
            line = encode_line(rec)
        except ValueError as exc:  # e.g. the upstream answered with a lone surrogate
            log.warning("decision %s not recorded: %s", ex.decision_id, exc)
            return False
        first = self.log.path is None
        self.log.append_line(line)
        self.decisions += 1
        self._episodes.add((who["run_id"], who["agent_id"]), ex.decision_id)
        if first:
            log.info("writing %s", self.log.path)
        return True

    def _append_line(self, line: bytes) -> None:
        first = self.log.path is None
        self.log.append_line(line)
        self.events += 1
        if first:
            log.info("writing %s", self.log.path)

    # --- rewards and ratings ------------------------------------------------------------

    async def _scores(
        self, request: web.Request, attrs: dict[str, str], endpoint: str
    ) -> web.Response:
        from aiohttp import web

        payload = await self._json(request)
        who = self._who(request, attrs)
        batch = isinstance(payload, list)
        items = payload if batch else [payload]
        if not items:
            raise _Reject(400, "an empty list: nothing to record")
        plan = self._plan_reward if endpoint == "rewards" else self._plan_rating
        # Check every item before writing any, so a bad batch writes nothing.
        planned = [plan(item, f"[{i}]." if batch else "", who) for i, item in enumerate(items)]
        outcomes = [run() for run in planned]
        # Encode every line before writing any: the batch is written whole or not at all.
        lines: list[bytes] = []
        for i, (events, _) in enumerate(outcomes):
            for event in events:
                try:
                    lines.append(encode_line(event))
                except ValueError as exc:
                    where = f"[{i}]" if batch else "body"
                    raise _Reject(400, f"{where}: {exc}", param=where) from None
        for line in lines:
            self._append_line(line)
        results = [result for _, result in outcomes]
        return web.json_response(results if batch else results[0])

    @staticmethod
    def _number(item: dict[str, Any], key: str, where: str) -> float:
        try:
            value = finite_number(item.get(key))
        except ValueError as exc:
            raise _Reject(400, f"{where}{key}: {exc}", param=where + key) from None
        if value is None:
            raise _Reject(
                400,
                f"{where}{key}: a number is required",
                param=where + key,
                code="missing_required_parameter",
            )
        return value

    @staticmethod
    def _text(item: dict[str, Any], key: str, where: str, required: bool = False) -> str | None:
        value = item.get(key)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise _Reject(400, f"{where}{key}: a non-empty string is required", param=where + key)
        if len(str(value)) > MAX_ID_CHARS:
            raise _Reject(400, f"{where}{key}: longer than {MAX_ID_CHARS}", param=where + key)
        return str(value)

    def _plan_reward(self, item: Any, where: str, who: dict[str, Any]) -> Any:
        if not isinstance(item, dict):
            raise _Reject(400, f"{where or 'body'}: expected a JSON object")
        value = self._number(item, "value", where)
        if item.get("decision_id") is not None:
            did = self._text(item, "decision_id", where, required=True)

            def one() -> tuple[list[dict[str, Any]], dict[str, Any]]:
                event = {"event": "reward", "decision_id": did, "value": value}
                event["timestamp"] = utc_now()
                return [event], {"decision_ids": [did], "shares": [value]}

            return one
        agent = self._text(item, "agent_id", where) or who["agent_id"]
        run = self._text(item, "run_id", where) or who["run_id"]
        rule = item.get("rule") or self.credit
        gamma = self.gamma if item.get("gamma") is None else item.get("gamma")
        if rule not in CREDIT_RULES:
            raise _Reject(
                400, f"{where}rule must be one of {', '.join(CREDIT_RULES)}", param=where + "rule"
            )
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
            raise _Reject(400, f"{where}gamma must be a number in [0, 1]", param=where + "gamma")

        def episode() -> tuple[list[dict[str, Any]], dict[str, Any]]:
            groups = self._episodes.close(
                lambda k: k[0] == run and (agent is None or k[1] == agent)
            )
            ids: list[str] = []
            shares: list[float] = []
            for group in groups.values():
                ids += group
                shares += spread_return(value, len(group), rule, float(gamma))
            events = reward_events(
                zip(ids, shares, strict=True),
                value,
                rule,
                utc_now(),
                gamma=float(gamma) if rule == "discounted" else None,
            )
            return events, {
                "decision_ids": ids,
                "shares": shares,
                "episode_return": value,
                "rule": rule,
                "run_id": run,
                "agent_id": agent,
            }

        return episode

    def _plan_rating(self, item: Any, where: str, who: dict[str, Any]) -> Any:
        if not isinstance(item, dict):
            raise _Reject(400, f"{where or 'body'}: expected a JSON object")
        did = self._text(item, "decision_id", where, required=True)
        rating = self._number(item, "rating", where)
        source = item.get("source", "human")
        if source not in RATING_SOURCES:
            raise _Reject(
                400,
                f"{where}source must be 'human' or 'llm', got {source!r}",
                param=where + "source",
            )
        event: dict[str, Any] = {
            "event": "rating",
            "decision_id": did,
            "value": rating,
            "source": source,
            "timestamp": utc_now(),
        }
        for key in ("feedback", "reason"):
            value = item.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise _Reject(400, f"{where}{key} must be a string", param=where + key)
            event[key] = value

        def one() -> tuple[list[dict[str, Any]], dict[str, Any]]:
            return [event], {"decision_id": did, "rating": rating, "source": source}

        return one


def _client_gone(request: web.Request) -> bool:
    """The client hung up while the answer was being made: it never got the decision
    (so it is not recorded). aiohttp does not cancel the handler on a disconnect."""
    transport = request.transport
    return transport is None or transport.is_closing()


class _UpstreamCall:
    """``async with``: one upstream request; transport failures before the answer's
    headers become 502 (504 on a timeout), never a traceback."""

    __slots__ = ("session", "method", "url", "body", "headers", "_cm")

    def __init__(
        self, session: Any, method: str, url: Any, body: bytes | None, headers: dict[str, str]
    ) -> None:
        self.session, self.method, self.url, self.body, self.headers = (
            session,
            method,
            url,
            body,
            headers,
        )
        self._cm: Any = None

    async def __aenter__(self) -> ClientResponse:
        import aiohttp

        self._cm = self.session.request(
            self.method, self.url, data=self.body, headers=self.headers, allow_redirects=False
        )
        try:
            return await self._cm.__aenter__()
        except TimeoutError:
            raise _Reject(
                504,
                "the upstream model server did not answer in time",
                type_="upstream_error",
                code="upstream_timeout",
            ) from None
        except aiohttp.ClientError as exc:
            raise _Reject(
                502,
                f"cannot reach the upstream model server: {type(exc).__name__}: {exc}",
                type_="upstream_error",
                code="upstream_unreachable",
            ) from None

    async def __aexit__(self, *exc: Any) -> None:
        import aiohttp

        try:
            await self._cm.__aexit__(*exc)
        except aiohttp.ClientError:
            pass
        if exc[0] is not None and exc[0] is not _Reject:
            if issubclass(exc[0], TimeoutError):
                raise _Reject(
                    504,
                    "the upstream model server stopped answering (timeout)",
                    type_="upstream_error",
                    code="upstream_timeout",
                ) from None
            if issubclass(exc[0], aiohttp.ClientError):
                raise _Reject(
                    502,
                    f"the upstream model server broke off its answer: {exc[1]}",
                    type_="upstream_error",
                    code="upstream_unreachable",
                ) from None


class _Exchange:
    """One chat/completions call on its way through the proxy."""

    __slots__ = (
        "proxy",
        "who",
        "endpoint",
        "chat",
        "messages",
        "prompt",
        "payload",
        "decision_id",
        "timestamp",
        "started",
        "field",
        "recordable",
        "tools",
    )

    def __init__(
        self,
        proxy: RecordingProxy,
        who: dict[str, Any],
        endpoint: str,
        chat: bool,
        messages: list[dict[str, Any]] | None,
        prompt: str | None,
        payload: dict[str, Any],
        decision_id: str,
        recordable: bool = True,
    ) -> None:
        self.proxy, self.who, self.endpoint, self.chat = proxy, who, endpoint, chat
        self.recordable = recordable
        self.messages, self.prompt, self.payload = messages, prompt, payload
        self.decision_id = decision_id
        self.timestamp = utc_now()
        self.started = time.perf_counter()
        self.field = f'"{DECISION_FIELD}":"{decision_id}"'.encode()
        self.tools: list[dict[str, Any]] | None = None

    def finish_json(self, raw: bytes, headers: dict[str, str]) -> bytes:
        """Record a complete JSON answer; returns the body to send (with the id when
        recorded)."""
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return raw
        answer = answer_of(obj, self.chat)
        if answer.empty:
            return raw  # nothing a dataset could hold (the reader refuses empty outputs)
        if not self.proxy._record(self, answer):
            return raw
        headers[DECISION_HEADER] = self.decision_id
        return _inject(raw, self.field)

    async def relay_stream(
        self, request: web.Request, up: ClientResponse, headers: dict[str, str]
    ) -> web.StreamResponse:
        import aiohttp
        from aiohttp import web

        if self.recordable:
            headers[DECISION_HEADER] = self.decision_id
        resp = web.StreamResponse(status=up.status, headers=headers)
        await resp.prepare(request)
        state = StreamAssembly(self.chat)
        recorded = False
        pending = b""
        try:
            try:
                async for data in up.content.iter_any():
                    pending += data
                    cut = pending.rfind(b"\n")
                    if cut < 0:
                        continue
                    block, pending = pending[: cut + 1], pending[cut + 1 :]
                    out = self._transform(block, state)
                    if state.ended and not recorded:
                        # Record before the client sees [DONE]: once its stream ends,
                        # the decision is on disk.
                        recorded = self._record_stream(state, request)
                    await resp.write(out)
            except (aiohttp.ClientError, TimeoutError) as exc:
                state.bad = f"the upstream stream broke ({type(exc).__name__})"
                event = error_body(
                    f"upstream stream broke off: {type(exc).__name__}: {exc}",
                    type_="upstream_error",
                    code="upstream_stream_broken",
                )
                await resp.write(sse_event(event))
                await resp.write_eof()
                return resp
            if pending:
                out = self._transform(pending, state)  # a last line without a newline
                if state.ended and not recorded:
                    recorded = self._record_stream(state, request)
                await resp.write(out)
            if self.recordable and not recorded and state.finish is not None:
                self._record_stream(state, request)  # EOF after a finish, no [DONE]
            await resp.write_eof()
        except ConnectionError:  # the client hung up: its decision was never made
            log.debug("client disconnected during a stream; not recorded")
        return resp

    def _transform(self, block: bytes, state: StreamAssembly) -> bytes:
        """Feed each ``data:`` line to `state` and add the decision id to its chunks
        (the bytes are relayed as the upstream sent them otherwise)."""
        if not self.recordable:
            return block
        lines = block.split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b"data:") and state.feed_data(line[5:].strip()):
                lines[i] = _inject(line, self.field)
        return b"\n".join(lines)

    def _record_stream(self, state: StreamAssembly, request: web.Request) -> bool:
        if state.bad is None and _client_gone(request):
            state.bad = "the client hung up"
        if state.bad is not None:
            log.debug("stream %s not recorded: %s", self.decision_id, state.bad)
            return True  # settled: never record it
        answer = state.answer()
        if not answer.empty:
            self.proxy._record(self, answer)
        return True


def serve(upstream: str, env_name: str, **kwargs: Any) -> None:
    """Run a `RecordingProxy` in this thread until SIGINT/SIGTERM (the CLI's entry)."""
    RecordingProxy(upstream, env_name, **kwargs).serve_forever()
