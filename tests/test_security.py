"""Security hygiene (issue 6 item 5): names that could escape a directory are refused at
every entry point, servers bind loopback by default, remote code and pickles stay off,
and no shell command is ever built from a string."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from simtune.errors import ConfigError

TRAVERSAL = ["../evil", "..", "a/../../b", "/etc", "a/b", "a\\b", "a\x00b", "", " "]


@pytest.mark.parametrize("name", TRAVERSAL)
def test_env_names_and_model_ids_are_checked_in_the_library(name: str, tmp_path: Path) -> None:
    from simtune import Recorder
    from simtune.decisions.writer import datasets_dir
    from simtune.tracking.registry import Registry

    with pytest.raises(ConfigError):
        Recorder(name, workspace=tmp_path)
    with pytest.raises(ConfigError):
        datasets_dir(tmp_path, name)
    with pytest.raises(ConfigError):
        Registry(tmp_path).get(name)
    assert list(tmp_path.iterdir()) == []  # nothing created on the way to the error


CLI_CASES = [
    ("sims", "run", "job_market", "--expert", "--episodes", "1", "--env", "../evil"),
    ("data", "stats", "--env", "../evil"),
    ("collect", "proxy", "--upstream", "http://127.0.0.1:9/v1", "--env", "../evil"),
    ("models", "show", "../../etc"),
    ("models", "delete", "../x"),
]


@pytest.mark.parametrize("argv", CLI_CASES, ids=lambda a: " ".join(a[:2]))
def test_cli_refuses_traversal_in_one_line(argv: tuple[str, ...], tmp_path: Path) -> None:
    victim = tmp_path / "x"
    victim.mkdir()
    ws_flag = () if argv[0] == "models" else ("--workspace", str(tmp_path / "ws"))
    pre = ("models", "--workspace", str(tmp_path / "ws")) if argv[0] == "models" else ()
    args = pre + argv[1:] if pre else argv + ws_flag
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "simtune: error:" in lines[0], proc.stderr
    assert victim.is_dir()  # `models delete ../x` must not have reached it
    assert not (tmp_path / "evil").exists()


def _parser_default(argv: list[str], dest: str) -> object:
    from simtune.cli.main import build_parser

    return getattr(build_parser().parse_args(argv), dest)


def test_servers_bind_loopback_by_default() -> None:
    from simtune.collect.proxy import RecordingProxy
    from simtune.serving.server import Server
    from simtune.testing.stub_llm import StubLLM

    assert _parser_default(["ui"], "host") == "127.0.0.1"
    assert (
        _parser_default(["collect", "proxy", "--upstream", "http://x/v1", "--env", "e"], "host")
        == "127.0.0.1"
    )
    assert _parser_default(["serve", "--model", "m"], "host") == "127.0.0.1"
    for cls in (RecordingProxy, Server, StubLLM):
        import inspect

        assert inspect.signature(cls).parameters["host"].default == "127.0.0.1", cls


def test_remote_code_is_off_unless_asked() -> None:
    from simtune.config import TuningConfig

    assert TuningConfig().trust_remote_code is False
    assert _parser_default(["serve", "--model", "m"], "trust_remote_code") in (False, None)


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_no_shell_strings_no_pickles_in_the_package() -> None:
    """Every subprocess gets an argument list; nothing unpickles arbitrary objects:
    no pickle, and torch.load only with weights_only=True (torch's restricted loader of
    tensors and plain containers, used for optimizer state in checkpoints; model
    weights are safetensors)."""
    offenders = []
    for path in sorted((REPO / "src" / "simtune").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree):
            name = ast.unparse(call.func)
            if name in ("os.system", "os.popen", "pickle.load", "pickle.loads"):
                offenders.append(f"{path.name}:{call.lineno}: {name}")
            if name == "torch.load" and not any(
                kw.arg == "weights_only"
                and isinstance(kw.value, ast.Constant)
                and kw.value.value is True
                for kw in call.keywords
            ):
                offenders.append(f"{path.name}:{call.lineno}: torch.load without weights_only")
            for kw in call.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    offenders.append(f"{path.name}:{call.lineno}: shell=")
    assert offenders == []
