"""One dataclass -> argparse generator, used by every command (vLLM's `add_cli_args`).

Each args class becomes one flag group (its `cli_group` ClassVar; none: the command's
own options). A field becomes a flag named after it, with help from its docstring;
what argparse needs beyond that sits in the field's metadata (`simtune.config.arg`):

- ``flag``: the primary spelling (default ``--<name>``), ``aliases``: more spellings.
  Each spelling with '_' or '-' also answers to the other one (``--max-new-tokens`` and
  ``--max_new_tokens``) unless ``variants=False``.
- ``positional``: an argument without dashes, named after the field.
- ``action``, ``type``, ``nargs``, ``metavar``, ``choices``, ``required``, ``const``: as
  in `add_argument`; ``env``: the default is this environment variable (read when the
  parser is built); ``group``: a titled sub-group; ``exclusive``: the title of a
  required mutually exclusive group ("" for an untitled, optional one).
- help may say ``{default}`` and ``{env}``. ``help`` in metadata replaces the docstring,
  for the few flags many commands share (`simtune.config.common.workspace_arg`): one
  text, not one copy per class.

Two styles: ``flags`` (the default: typed values, argparse defaults) and ``config``
(`simtune train`: only flags given override the YAML file, so nothing has a default
here; values stay text until `coerce` types them with the YAML's values; booleans take
an optional value; help ends with the default).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable
from typing import Any

from simtune.config.checks import raise_problems
from simtune.config.fields import base_type, field_docs, field_types, own_fields

_PASSED = ("action", "type", "nargs", "metavar", "choices", "required", "const")


def variant(flag: str) -> str | None:
    """The other spelling of a long flag: `--a_b` <-> `--a-b` (None when it has none)."""
    body = flag[2:]
    if not flag.startswith("--"):
        return None
    if "_" in body:
        return "--" + body.replace("_", "-")
    if "-" in body:
        return "--" + body.replace("-", "_")
    return None


def option_strings(f: dataclasses.Field[Any]) -> list[str]:
    meta = f.metadata
    out: list[str] = []
    for spelling in [meta.get("flag", f"--{f.name}"), *meta.get("aliases", ())]:
        out.append(spelling)
        other = variant(spelling) if meta.get("variants", True) else None
        if other and other not in out:
            out.append(other)
    return out


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.metadata.get("env"):
        return os.environ.get(f.metadata["env"])
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _help(doc: str, f: dataclasses.Field[Any], default: Any, style: str) -> str | None:
    if not doc:
        return None
    text = doc.replace("{default}", str(default)).replace("{env}", f.metadata.get("env", ""))
    if style == "config" and "(default" not in text:
        shown = (",".join(default) or "none") if isinstance(default, list) else default
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")  # argparse %-formats help


def add_cli_args(
    parser: Any,
    cls: type,
    *,
    style: str = "flags",
    fields: Iterable[str] | None = None,
    title: str | None = None,
) -> None:
    """Add `cls`'s fields (all, inherited ones first, or the named ones) to `parser` as
    flags, in one group titled `title` or `cls.cli_group`."""
    docs, types = field_docs(cls), field_types(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    chosen = list(by_name.values()) if fields is None else [by_name[n] for n in fields]
    title = title if title is not None else cls.__dict__.get("cli_group")
    target = parser.add_argument_group(title) if title else parser
    subgroups: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    for f in chosen:
        meta = f.metadata
        tp, is_list = base_type(types[f.name])
        default = _default(f)
        kwargs: dict[str, Any] = {k: meta[k] for k in _PASSED if k in meta}
        kwargs["help"] = _help(meta.get("help") or docs.get(f.name, ""), f, default, style)
        if style == "config":
            kwargs.update(dest=f.name, default=argparse.SUPPRESS)
            if tp is bool:
                kwargs.update(nargs="?", const="true", metavar="BOOL")
            elif is_list:
                kwargs.setdefault("nargs", "+")
                kwargs.setdefault("metavar", f.name.upper().rstrip("S"))
            else:
                kwargs.setdefault("metavar", {"str": "VALUE"}.get(tp.__name__, tp.__name__.upper()))
        else:
            kwargs["default"] = default
            action = kwargs.get("action")
            if tp is bool and action is None:
                kwargs["action"] = "store_true"
            elif action is None and "type" not in kwargs and tp in (int, float):
                kwargs["type"] = tp
            if is_list and action is None:
                kwargs.setdefault("nargs", "+")
                kwargs.setdefault("metavar", f.name.upper().rstrip("S"))
        group = target
        if "group" in meta:
            if meta["group"] not in subgroups:
                subgroups[meta["group"]] = parser.add_argument_group(meta["group"])
            group = subgroups[meta["group"]]
        if "exclusive" in meta:
            name = meta["exclusive"]
            if name not in exclusive:
                exclusive[name] = (
                    parser.add_argument_group(name).add_mutually_exclusive_group(required=True)
                    if name
                    else group.add_mutually_exclusive_group()
                )
            group = exclusive[name]
        if meta.get("positional"):
            # argparse's own defaults ([] for nargs="*"); one given would also make a
            # "*" positional optional, which changes how it combines with others.
            kwargs.pop("default", None)
            group.add_argument(f.name, **kwargs)
        else:
            kwargs.setdefault("dest", f.name)
            group.add_argument(*option_strings(f), **kwargs)


def add_config_args(parser: Any, cls: type) -> None:
    """A composed config (`TuningConfig`): one group per part, in field order."""
    for part in config_parts(cls):
        add_cli_args(parser, part, style="config", fields=[f.name for f in own_fields(part)])


def config_parts(cls: type) -> list[type]:
    """The args classes a composed config is made of, base first (their field order)."""
    return [
        k
        for k in reversed(cls.__mro__)
        if dataclasses.is_dataclass(k) and k.__dict__.get("__annotations__")
    ]


def namespace_to(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """An instance of `cls` from the parsed flags it declares (and `extra`), checked:
    a class with `problems()` raises one ConfigError naming every problem."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    values.update(extra)
    out = cls(**values)
    if hasattr(out, "problems"):
        raise_problems(out.problems())
    return out
