"""A small client for OpenAI-compatible chat endpoints (judges, simulated agents).

Standard library only (urllib), so it works in any process without the `openai`
package and starts fast. Transport failures -- no connection, a timeout, HTTP 408, 409,
429 or 5xx (the statuses the official openai client retries) -- are retried with
jittered exponential backoff (a draw from [1/2, 1] x ``backoff * 2**attempt`` seconds,
at most 30 s; or the server's ``Retry-After`` when it is shorter than a minute) up to
``max_retries`` times; other HTTP errors fail at once. Every error names the option the URL came from
(``what``, e.g. ``--judge_url``), so the CLI can print it as one line.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from simtune.errors import ConfigError, SimtuneError

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class LLMError(SimtuneError):
    """The endpoint could not be reached after retries, refused, or answered nonsense."""


def base_url(url: str, what: str = "--judge_url") -> str:
    """Normalise ``http://host:port/v1[/chat/completions|/models]`` to the ``/v1`` base."""
    base = (url or "").strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", base):
        raise ConfigError(
            f"{what}: expected an http(s) base URL such as http://127.0.0.1:8000/v1, got {url!r}"
        )
    for suffix in ("/chat/completions", "/completions", "/models"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def request_json(
    url: str, payload: dict[str, Any] | None, api_key: str | None, timeout: float
) -> dict[str, Any]:
    """POST `payload` (GET when None) and decode the JSON answer; ValueError if not JSON."""
    headers = {"Accept": "application/json"}
    data = None
    if payload is not None:
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"not JSON: {body[:200]!r}") from None


# Statuses worth asking again, as the official openai client retries them: 408 Request
# Timeout and 409 Conflict (a lock or a busy replica), 429 Too Many Requests, any 5xx.
RETRY_STATUSES = frozenset({408, 409, 429})
MAX_DELAY_S = 30.0  # no single wait longer than this, whatever the attempt


def transient(exc: BaseException) -> bool:
    """Worth retrying: no connection, a timeout, a 408, 409, 429 or any 5xx."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in RETRY_STATUSES
    return isinstance(exc, (urllib.error.URLError, TimeoutError, ConnectionError, OSError))


def backoff_delay(backoff: float, attempt: int, rng: random.Random) -> float:
    """Exponential back-off with jitter: a uniform draw from [1/2, 1] x backoff x 2^attempt,
    at most MAX_DELAY_S. Without the jitter, judge workers that failed together (a rate
    limit hits them all at once) retry together and collide again; the draw spreads them
    while keeping at least half of each wait (AWS's "equal jitter")."""
    return min(MAX_DELAY_S, backoff * 2**attempt * rng.uniform(0.5, 1.0))


def describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _retry_after(exc: BaseException) -> float | None:
    if isinstance(exc, urllib.error.HTTPError) and exc.headers is not None:
        try:
            value = float(exc.headers.get("Retry-After", ""))
        except ValueError:
            return None
        return value if 0 <= value < 60 else None
    return None


def check_endpoint(
    url: str,
    what: str,
    timeout: float = 10.0,
    api_key: str | None = None,
    label: str = "endpoint",
) -> None:
    """One ``GET {url}/models``; raises naming `what` when the endpoint cannot be reached
    (no connection, timeout, 5xx) or rejects the key. A 404 passes: not every server
    lists its models."""
    base = base_url(url, what)
    try:
        request_json(f"{base}/models", None, api_key, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise SimtuneError(
                f"{what}: {label} at {base} refused the request ({describe(exc)}); "
                "check the API key"
            ) from None
        if exc.code >= 500:
            raise SimtuneError(
                f"{what}: cannot reach {label} at {base} ({describe(exc)})"
            ) from None
    except ValueError:
        pass  # it answered, just not with JSON
    except OSError as exc:
        raise SimtuneError(f"{what}: cannot reach {label} at {base} ({describe(exc)})") from None


class ChatClient:
    """``chat(messages) -> str`` against ``{base}/chat/completions``, with retries.

    Thread-safe; `stats()` counts calls (requests answered), retries and failures
    (failed attempts, retried or not)."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        what: str = "--judge_url",
        label: str = "endpoint",
    ) -> None:
        self.what, self.label = what, label
        self.base = base_url(url, what)
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.rng = random.Random()  # the jitter's draws; tests may seed it
        self._lock = threading.Lock()
        self.counts = {"calls": 0, "retries": 0, "failures": 0}

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {k: float(v) for k, v in self.counts.items()}

    def complete(self, messages: Messages, **params: Any) -> dict[str, Any]:
        """The whole chat-completion JSON (retrying transient failures)."""
        payload = {"model": self.model, "messages": messages, **params}
        url = f"{self.base}/chat/completions"
        for attempt in range(self.max_retries + 1):
            try:
                answer = request_json(url, payload, self.api_key, self.timeout)
            except urllib.error.HTTPError as exc:
                if not transient(exc):
                    detail = exc.read()[:300].decode(errors="replace").strip()
                    self.count("failures")
                    raise LLMError(
                        f"{self.what}: {self.label} at {self.base} refused the request "
                        f"({describe(exc)}{': ' + detail if detail else ''})"
                    ) from None
                error: BaseException = exc
            except ValueError as exc:
                self.count("failures")
                raise LLMError(
                    f"{self.what}: {url} did not answer with an OpenAI chat completion ({exc})"
                ) from None
            except OSError as exc:
                error = exc
            else:
                self.count("calls")
                return answer
            self.count("failures")
            if attempt == self.max_retries:
                raise LLMError(
                    f"{self.what}: cannot reach {self.label} at {self.base} ({describe(error)}; "
                    f"{self.max_retries + 1} attempts)"
                )
            self.count("retries")
            delay = _retry_after(error)  # the server's Retry-After, when it gives one
            if delay is None:
                delay = backoff_delay(self.backoff, attempt, self.rng)
            log.warning(
                "%s at %s: %s; retrying in %.2fs", self.label, self.base, describe(error), delay
            )
            time.sleep(delay)
        raise AssertionError("unreachable")

    def chat(self, messages: Messages, **params: Any) -> str:
        """The first choice's message content."""
        answer = self.complete(messages, **params)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMError(
                f"{self.what}: {self.base}/chat/completions did not answer with an OpenAI chat "
                f"completion (got {json.dumps(answer)[:200]})"
            ) from None
        return content if isinstance(content, str) else ""
