"""What the args classes' fields say about themselves: docstrings, types, coercion.

A field's documentation is the string literal right below it (litgpt style); it is read
from the source with `ast` -- across the class's bases, so a composed class such as
`TuningConfig` documents every field it inherits -- and becomes `--help` and
docs/options.md.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import sys
import typing
from pathlib import Path
from typing import Any

from simtune.errors import ConfigError


def arg(default: Any = dataclasses.MISSING, **cli: Any) -> Any:
    """A dataclass field with its command-line details in `metadata` (see
    `simtune.config.cli_args.add_cli_args` for the keys). A list default is copied per
    instance."""
    if isinstance(default, list):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata=cli)
    return dataclasses.field(default=default, metadata=cli)


@functools.cache
def _module_docs(module: str) -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} of every class in a module, parsed once (cheaper
    than `inspect.getsource` per class, which re-parses the module each time)."""
    path = getattr(sys.modules[module], "__file__", None)
    if not path:
        return {}
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    out: dict[str, dict[str, str]] = {}
    for cls in tree.body:  # args classes are top-level; ast.walk would cost ~2 ms a module
        if not isinstance(cls, ast.ClassDef):
            continue
        docs: dict[str, str] = {}
        for node, nxt in zip(cls.body, cls.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
        out[cls.name] = docs
    return out


def own_docs(cls: type) -> dict[str, str]:
    """The docstrings of the fields `cls` itself declares."""
    return dict(_module_docs(cls.__module__).get(cls.__qualname__, {}))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> its docstring, over the whole MRO (a subclass that redeclares
    a field without a docstring keeps its base's)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(own_docs(klass))
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def own_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The dataclass fields `cls` declares itself (not those of its bases), in order."""
    mine = cls.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(cls) if f.name in mine]


def base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, is_list) of an annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return base_type(args[0])
    return tp, False


def coerce(name: str, value: Any, *, cls: type, source: str = "") -> Any:
    """Convert a YAML/CLI/keyword value to the type of `cls`'s field `name`, or raise
    naming the option."""
    where = f"{source}: " if source else ""
    annotation = field_types(cls)[name]
    tp, is_list = base_type(annotation)
    if value is None:
        if is_list:
            return []
        if type(None) not in typing.get_args(annotation):
            raise ConfigError(f"{where}--{name}: needs a value (got null/empty)")
        return None
    if is_list:
        items = value if isinstance(value, (list, tuple)) else [value]
        out: list[Any] = []
        for item in items:
            # "q_proj,v_proj" and ["q_proj", "v_proj"] both work.
            parts = str(item).split(",") if isinstance(item, str) else [item]
            out.extend(
                coerce_scalar(name, tp, p.strip() if isinstance(p, str) else p, where)
                for p in parts
                if not (isinstance(p, str) and not p.strip())
            )
        return out
    return coerce_scalar(name, tp, value, where)


def coerce_scalar(name: str, tp: type, value: Any, where: str) -> Any:
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}--{name}: expected {tp.__name__}, got {value!r}") from None
    return value
