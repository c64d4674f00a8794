"""The user guide in docs/ is kept true by running it.

- Every fenced block whose info string is ``bash runnable`` or ``python runnable`` is
  extracted and executed, page by page, in order, in one fresh temporary directory per
  page (later blocks use what earlier ones made), on the tiny random model: ``$MODEL``
  is its path, ``SIMTUNE_HOME`` the page's directory, ``HF_HUB_OFFLINE=1``, the venv's
  ``bin`` first on ``PATH``. bash blocks run under ``bash -euo pipefail``, python blocks
  with the venv's python. A failure names the page, the block's line and its output.
- docs/options.md must equal what `simtune.docs_gen.render()` makes of the config.
- Relative links and #anchors between the pages (and from README.md) must resolve.
- Every `--flag` that a ``simtune ...`` command line in the docs uses must exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
BIN = Path(sys.executable).parent
BLOCK_TIMEOUT = 300
# Pages whose runnable blocks train or start servers: minutes in all, so slow.
SLOW_PAGES = {"README.md", "training.md", "tracking.md", "serving.md", "best-practices.md"}
# Flags of features still being built (their examples are marked illustrative and
# carry a TODO comment); accepted by the flag check until they exist.
PENDING_FLAGS: set[str] = set()


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    runnable: bool
    code: str


def blocks(page: Path) -> list[Block]:
    out: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group(1), m.group(2), m.group(3).split()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line)
            i += 1
        i += 1
        lang = info[0] if info else ""
        out.append(Block(page, start + 1, lang, "runnable" in info[1:], "\n".join(body) + "\n"))
    return out


def runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(b.runnable for b in blocks(p))]


def _param(page: Path):
    marks = [pytest.mark.slow] if page.name in SLOW_PAGES else []
    return pytest.param(page, id=page.name, marks=marks)


def _env(home: Path, model: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "PYTHONPATH")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        SIMTUNE_HOME=str(home),
        MODEL=str(model),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def test_docs_exist_and_are_linked_from_readme():
    assert (DOCS / "README.md").is_file()
    assert "docs/README.md" in (REPO / "README.md").read_text(encoding="utf-8")
    assert len(runnable_pages()) >= 4, "most pages should have runnable examples"


@pytest.mark.parametrize("page", [_param(p) for p in runnable_pages()])
def test_runnable_examples(page: Path, tiny_model: Path, tmp_path: Path):
    env = _env(tmp_path, tiny_model)
    for n, block in enumerate(b for b in blocks(page) if b.runnable):
        if block.lang == "bash":
            script = tmp_path / f".block{n}.sh"
            cmd = ["bash", "-euo", "pipefail", str(script)]
        elif block.lang == "python":
            script = tmp_path / f".block{n}.py"
            cmd = [sys.executable, str(script)]
        else:
            pytest.fail(
                f"{page.name}:{block.line}: runnable block of unknown language {block.lang!r}"
            )
        script.write_text(block.code, encoding="utf-8")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                cmd,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"") + (exc.stderr or b"")
            tail = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
            pytest.fail(
                f"docs/{page.name}:{block.line}: {block.lang} block timed out after "
                f"{BLOCK_TIMEOUT}s\n{tail[-3000:]}"
            )
        print(f"docs/{page.name}:{block.line}: {time.monotonic() - t0:.1f}s")
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-4000:]
            pytest.fail(
                f"docs/{page.name}:{block.line}: {block.lang} block failed with exit code "
                f"{proc.returncode}\n--- code ---\n{block.code}--- output tail ---\n{tail}"
            )


def test_options_reference_is_current():
    from simtune.docs_gen import STALE, render

    page = DOCS / "options.md"
    assert page.is_file(), STALE
    assert page.read_text(encoding="utf-8") == render(), STALE


# --- links -----------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(page: Path) -> str:
    """The page without its fenced code blocks and inline code."""
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^([ \t]*)(```+|~~~+).*?^\1\2[ \t]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    from simtune.docs_gen import slug

    text = re.sub(
        r"^([ \t]*)(```+|~~~+).*?^\1\2[ \t]*$",
        "",
        page.read_text(encoding="utf-8"),
        flags=re.S | re.M,
    )
    found: set[str] = set()
    seen: dict[str, int] = {}
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        base = slug(re.sub(r"[`*]", "", m.group(1)))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return found


@pytest.mark.parametrize("page", [*PAGES, REPO / "README.md"], ids=lambda p: p.name)
def test_links_resolve(page: Path):
    problems = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: {dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not problems, f"{page.name}: broken links:\n" + "\n".join(problems)


# --- flags -----------------------------------------------------------------------------


def _subparser(parser, words: list[str]):
    """The deepest subparser that the command's words name."""
    import argparse

    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and word in subs[0].choices:
            parser = subs[0].choices[word]
    return parser


def _commands(code: str) -> list[str]:
    """`simtune ...` command lines (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0]
        for part in re.split(r"(?:&&|\|\||;|\||\$\(|!)", line):
            part = part.strip()
            if part.startswith("simtune "):
                out.append(part)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_flags_exist(page: Path):
    from simtune.cli.main import build_parser

    parser = build_parser()
    problems = []
    for block in blocks(page):
        if block.lang not in ("bash", "sh", "console", ""):
            continue
        for command in _commands(block.code):
            words = command.split()[1:]
            sub = _subparser(parser, [w for w in words if not w.startswith("-")])
            known = {s for a in sub._actions for s in a.option_strings}
            for flag in re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", command):
                if flag not in known and flag not in PENDING_FLAGS:
                    problems.append(f"line {block.line}: {command[:60]}...: unknown {flag}")
    assert not problems, f"docs/{page.name}:\n" + "\n".join(problems)
