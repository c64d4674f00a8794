"""Strict JSON: the one parser for text that simtune did not write itself (HTTP request
bodies of the proxy and `serve`, dataset lines) and the rules its writer keeps.

Refused, as `JSONTextError` (a ValueError naming the field where there is one):

- text that is not UTF-8 (RFC 8259 §8.1), including UTF-8-encoded surrogates;
- ``NaN``, ``Infinity``, ``-Infinity`` and numbers too large for a float (``1e999``):
  not JSON to a strict parser, and not a score;
- lone surrogates (``"\\ud800"`` escapes not paired): not Unicode, so not writable as UTF-8;
- nesting deeper than `MAX_DEPTH` levels (a record written from a request is nested at
  most `RECORD_EXTRA_DEPTH` levels deeper, so requests are held to `REQUEST_MAX_DEPTH`
  and every record written stays readable).

The checks cost two C-speed scans of the text in the common case; the parsed value is
walked only when the text could hold a surrogate escape or more brackets than the limit.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 100
"""Deepest nesting (objects and arrays) of a dataset line; the writer keeps to it too."""
RECORD_EXTRA_DEPTH = 4
"""How much deeper a request's values sit in the record made of it (``metadata.params``)."""
REQUEST_MAX_DEPTH = MAX_DEPTH - RECORD_EXTRA_DEPTH
"""Deepest nesting of an HTTP request body (proxy, `serve`)."""

# Text that may hold a lone surrogate escape: only then are its strings looked at.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONTextError(ValueError):
    """Text that is not strict JSON; `field` names where (``messages[0].content``) when
    the problem is inside a value, `line`/`column` where in the text when known."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        line: int | None = None,
        column: int | None = None,
        pos: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.field, self.line, self.column = message, field, line, column
        self.pos = pos


class _NonFinite(JSONTextError):
    """NaN, Infinity or an out-of-range number: located by a lenient re-parse."""


def _constant(name: str) -> Any:
    raise _NonFinite(f"{name} is not valid JSON (only finite numbers are)")


def _float(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # inf (1e999): not a finite number
        raise _NonFinite(f"the number {text[:40]} is too large for a float")
    return value


_lenient = json.JSONDecoder()  # takes NaN and Infinity: only to find where they are


_decoder = json.JSONDecoder(parse_constant=_constant, parse_float=_float)


def field_path(path: tuple[Any, ...]) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content``."""
    out = ""
    for key in path:
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            out += f".{key}" if out else str(key)
    return out or "body"


def find_problem(value: Any, max_depth: int = MAX_DEPTH) -> JSONTextError | None:
    """The first lone surrogate or over-deep nesting in a parsed value, or None."""
    stack: list[tuple[Any, tuple[Any, ...], int]] = [(value, (), 1)]
    while stack:
        obj, path, depth = stack.pop()
        if isinstance(obj, str):
            if _SURROGATE.search(obj):
                return JSONTextError(
                    "holds a lone surrogate (an unpaired \\ud800-\\udfff escape or a byte "
                    "that is not UTF-8): not valid Unicode",
                    field=field_path(path),
                )
            continue
        if isinstance(obj, float) and not math.isfinite(obj):
            return JSONTextError(
                f"expected a finite number, got {obj!r} (NaN and Infinity are not JSON)",
                field=field_path(path),
            )
        if isinstance(obj, (dict, list)):
            if depth > max_depth:
                where = field_path(path[:4]) + ("..." if len(path) > 4 else "")
                return JSONTextError(f"nested more than {max_depth} levels deep", field=where)
            if isinstance(obj, dict):
                for k, v in obj.items():
                    if isinstance(k, str) and _SURROGATE.search(k):
                        return JSONTextError(
                            "a key holds a lone surrogate: not valid Unicode",
                            field=field_path(path),
                        )
                    stack.append((v, (*path, k), depth + 1))
            else:
                stack.extend((v, (*path, i), depth + 1) for i, v in enumerate(obj))
    return None


def _check(value: Any, text: str, max_depth: int) -> None:
    if text.count("[") + text.count("{") > max_depth or (
        "\\u" in text and _SURROGATE_ESCAPE.search(text)
    ):
        problem = find_problem(value, max_depth)
        if problem is not None:
            raise problem


def _decode_error(exc: BaseException, max_depth: int) -> JSONTextError:
    if isinstance(exc, JSONTextError):
        return exc
    if isinstance(exc, json.JSONDecodeError):
        return JSONTextError(
            f"{exc.msg} at line {exc.lineno} column {exc.colno}",
            line=exc.lineno,
            column=exc.colno,
            pos=exc.pos,
        )
    if isinstance(exc, RecursionError):
        return JSONTextError(f"nested more than {max_depth} levels deep")
    return JSONTextError(str(exc).split(";")[0])  # e.g. an integer with too many digits


def loads(data: bytes | bytearray | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse strict JSON (see the module docstring); raises `JSONTextError`."""
    if isinstance(data, (bytes, bytearray)):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8(bytes(data), exc.start, max_depth) from None
    else:
        text = data
    try:
        value = _decoder.decode(text)
    except _NonFinite as exc:
        raise _locate(exc, text, max_depth) from None
    except (ValueError, RecursionError) as exc:
        raise _decode_error(exc, max_depth) from None
    _check(value, text, max_depth)
    return value


def _locate(exc: JSONTextError, text: str, max_depth: int) -> JSONTextError:
    """`exc` with the field of the non-finite number it is about, when one is found."""
    try:
        problem = find_problem(_lenient.decode(text), max_depth)
    except (ValueError, RecursionError):
        return exc
    return problem if problem is not None else exc


def _not_utf8(data: bytes, start: int, max_depth: int) -> JSONTextError:
    """The error for bytes that are not UTF-8, naming the field that holds them when
    the text parses with the bad bytes kept as surrogate escapes."""
    error = JSONTextError(f"not UTF-8 text (byte {start})")
    try:
        value = _decoder.decode(data.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return error
    problem = find_problem(value, max_depth)
    if problem is not None and problem.field is not None:
        error.field = problem.field
    return error


def raw_decode(text: str, pos: int, *, max_depth: int = MAX_DEPTH) -> tuple[Any, int]:
    """`json.JSONDecoder.raw_decode` with the strict rules: (value, end position)."""
    try:
        value, end = _decoder.raw_decode(text, pos)
    except _NonFinite as exc:
        try:
            _, end = _lenient.raw_decode(text, pos)
        except (ValueError, RecursionError):
            raise exc from None
        raise _locate(exc, text[pos:end], max_depth) from None
    except (ValueError, RecursionError) as exc:
        raise _decode_error(exc, max_depth) from None
    _check(value, text[pos:end], max_depth)
    return value, end


def has_surrogate(text: str) -> bool:
    """Whether `text` holds a surrogate code point (e.g. an undecodable header byte,
    which aiohttp keeps as a surrogate escape)."""
    return not text.isascii() and _SURROGATE.search(text) is not None
