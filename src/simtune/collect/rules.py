"""Which captured model calls are decisions (`simtune collect proxy` and `Recorder`).

A simulation may send more than its agents' decisions through one model config:
YuLan-OneSim's agents also plan (``planning`` module) and summarise / reflect on
memory (``memory`` module) through the same ``config/model_config.json`` entry as the
decisions ``generate_reaction`` asks for. Rules tell them apart without touching the
simulation, by regular expressions (Python `re.search`) on the call:

- ``skip``: ``[WHERE=]REGEX`` -- a call that matches is not recorded;
- ``label``: ``NAME=[WHERE=]REGEX`` -- a recorded call that matches gets
  ``metadata.call = NAME`` (the first label that matches; filter on it later);
- ``require_output``: ``REGEX`` -- only answers that match are recorded (OneSim's
  decisions are asked for as a ```` ```json ```` block its ``JsonBlockParser`` needs:
  ``--require-output '```json'`` keeps exactly those).

``WHERE`` is ``system`` (the system messages), ``prompt`` (the whole input: every
message, or the prompt string; the default) or ``output`` (the answer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from simtune.errors import ConfigError

WHERE = ("system", "prompt", "output")


def _compile(text: str, flag: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise ConfigError(f"{flag} {text!r}: not a regular expression ({exc})") from None


def _where(spec: str, flag: str, given: str | None = None) -> tuple[str, re.Pattern[str]]:
    head, sep, rest = spec.partition("=")
    try:
        if sep and head in WHERE:
            return head, _compile(rest, flag)
        return "prompt", _compile(spec, flag)
    except ConfigError as exc:
        shown = given if given is not None else spec
        raise ConfigError(f"{flag} {shown!r}: {str(exc).split(': ', 1)[1]}") from None


@dataclass
class CallRules:
    skip: list[tuple[str, re.Pattern[str]]] = field(default_factory=list)
    label: list[tuple[str, str, re.Pattern[str]]] = field(default_factory=list)
    require_output: re.Pattern[str] | None = None

    @classmethod
    def parse(
        cls,
        skip: Iterable[str] = (),
        label: Iterable[str] = (),
        require_output: str | None = None,
    ) -> CallRules:
        """From the flags' strings; raises ConfigError naming the bad one."""
        rules = cls()
        for spec in skip:
            rules.skip.append(_where(spec, "--skip-calls"))
        for spec in label:
            name, sep, rest = spec.partition("=")
            if not sep or not name:
                raise ConfigError(f"--label-calls {spec!r}: expected NAME=[WHERE=]REGEX")
            rules.label.append((name, *_where(rest, "--label-calls", spec)))
        if require_output is not None:
            rules.require_output = _compile(require_output, "--require-output")
        return rules

    def __bool__(self) -> bool:
        return bool(self.skip or self.label or self.require_output)

    def classify(
        self, prompt: str | None, messages: Sequence[dict[str, Any]] | None, output: str
    ) -> tuple[bool, str | None]:
        """(record it?, its label or None)."""
        if self.require_output is not None and not self.require_output.search(output):
            return False, None
        texts = {"output": output}

        def text(where: str) -> str:
            if where not in texts:
                msgs = messages or []
                if where == "system":
                    texts[where] = "\n".join(
                        str(m.get("content") or "") for m in msgs if m.get("role") == "system"
                    )
                else:
                    texts[where] = (
                        "\n".join(str(m.get("content") or "") for m in msgs)
                        if messages
                        else prompt or ""
                    )
            return texts[where]

        if any(p.search(text(w)) for w, p in self.skip):
            return False, None
        for name, w, p in self.label:
            if p.search(text(w)):
                return True, name
        return True, None
