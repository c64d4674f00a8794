"""TuningConfig (defaults < YAML < overrides, validation) and the CLI surface.

Fast: nothing here trains a model or imports torch. CLI behaviour is checked on the
real console script (`run_cli`) and, for argument parsing, in process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import SAMPLE, run_cli

from simtune.cli import main as cli
from simtune.config import TuningConfig, build_config, coerce, field_docs
from simtune.errors import ConfigError

FIELDS = [f.name for f in dataclasses.fields(TuningConfig)]
REQUIRED = {"llm_path": "some/model", "dataset_path": ["data.jsonl"]}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(*args, **kwargs)
    return str(info.value)


# --- build_config -----------------------------------------------------------------------


def test_precedence_defaults_then_yaml_then_overrides(tmp_path: Path) -> None:
    defaults = build_config(overrides=REQUIRED)
    assert defaults.learning_rate == 2e-4 and defaults.lora_r == 16
    assert defaults.lr_scheduler_type == "cosine"
    assert defaults.lora_target_modules == ["all-linear"]

    yml = write(
        tmp_path / "job.yaml",
        "llm_path: from/yaml\n"
        "dataset_path: [a.jsonl, b.jsonl]\n"
        "learning_rate: 0.01\n"
        "lora_r: 8\n"
        "bf16: true\n",
    )
    from_yaml = build_config(str(yml))
    assert from_yaml.llm_path == "from/yaml"
    assert from_yaml.dataset_path == ["a.jsonl", "b.jsonl"]
    assert (from_yaml.learning_rate, from_yaml.lora_r, from_yaml.bf16) == (0.01, 8, True)
    assert from_yaml.num_train_epochs == 3.0  # untouched default

    both = build_config(str(yml), {"learning_rate": "0.5", "llm_path": "from/flag"})
    assert both.learning_rate == 0.5 and both.llm_path == "from/flag"
    assert both.lora_r == 8 and both.dataset_path == ["a.jsonl", "b.jsonl"]  # YAML survives

    # A TuningConfig as base (run_tuning(cfg, **kw)); the base itself is not modified.
    base = TuningConfig(llm_path="m", dataset_path=["d"], seed=7)
    derived = build_config(overrides={"seed": 9}, base=base)
    assert (derived.seed, base.seed, derived.llm_path) == (9, 7, "m")


def test_yaml_kebab_case_keys(tmp_path: Path) -> None:
    yml = write(
        tmp_path / "kebab.yaml",
        "llm-path: m\n"
        "dataset-path: [x.jsonl]\n"
        "learning-rate: 0.003\n"
        "lora-target-modules: q_proj,v_proj\n"
        "per-device-train-batch-size: 2\n"
        "gradient-checkpointing: yes\n",
    )
    cfg = build_config(str(yml))
    assert cfg.learning_rate == 0.003
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.per_device_train_batch_size == 2
    assert cfg.gradient_checkpointing is True
    assert cfg.dataset_path == ["x.jsonl"]


def test_unknown_yaml_key_names_it_and_suggests(tmp_path: Path) -> None:
    yml = write(tmp_path / "typo.yaml", "llm_path: m\ndataset_path: [d]\nlearnin_rate: 0.1\n")
    msg = config_error(str(yml))
    assert msg == f"{yml}: unknown option 'learnin_rate' (did you mean --learning_rate?)"

    kebab = write(tmp_path / "typo2.yaml", "lora-alfa: 3\n")
    assert config_error(str(kebab)) == (
        f"{kebab}: unknown option 'lora-alfa' (did you mean --lora_alpha?)"
    )

    far = write(tmp_path / "far.yaml", "zzzzzz: 1\n")
    assert config_error(str(far)) == f"{far}: unknown option 'zzzzzz'"

    # Keyword overrides get the same check, without a file prefix.
    assert config_error(overrides={**REQUIRED, "num_epochs": 1}) == (
        "unknown option 'num_epochs' (did you mean --num_train_epochs?)"
    )


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    yml = write(tmp_path / "broken.yaml", "llm_path: m\n  lora_r: 8\n")
    msg = config_error(str(yml))
    assert msg.startswith(f"{yml}:2: invalid YAML (")
    assert "\n" not in msg

    not_a_mapping = write(tmp_path / "list.yaml", "- a\n- b\n")
    assert config_error(str(not_a_mapping)) == (
        f"{not_a_mapping}: expected a mapping of option names to values"
    )
    missing = tmp_path / "missing.yaml"
    assert config_error(str(missing)) == f"--config: no such file: {missing}"


def test_empty_yaml_is_all_defaults(tmp_path: Path) -> None:
    yml = write(tmp_path / "empty.yaml", "# nothing\n")
    assert build_config(str(yml), REQUIRED) == build_config(overrides=REQUIRED)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"learning_rate": -0.1}, "--learning_rate: must be a positive number, got -0.1"),
        ({"learning_rate": 0}, "--learning_rate: must be a positive number"),
        ({"learning_rate": "abc"}, "--learning_rate: expected float, got 'abc'"),
        ({"learning_rate": "nan"}, "--learning_rate: must be a positive number"),
        ({"lr_scheduler_type": "sawtooth"}, "--lr_scheduler_type: unknown schedule 'sawtooth'"),
        ({"devices": "a,b"}, "--devices: expected GPU indices like '0' or '0,1', got 'a,b'"),
        ({"devices": ""}, "--devices: expected GPU indices like '0' or '0,1', got ''"),
        ({"bf16": True, "fp16": True}, "--bf16 and --fp16 exclude each other"),
        ({"precision": "fp8"}, "--precision: unknown value 'fp8' (choose from auto, bf16,"),
        ({"bf16": True, "precision": "fp32"}, "--bf16 contradicts --precision fp32"),
        ({"fp16": True, "precision": "bf16"}, "--fp16 contradicts --precision bf16"),
        ({"warmup_ratio": 1.5}, "--warmup_ratio: must be in [0, 1), got 1.5"),
        ({"lora_dropout": -0.1}, "--lora_dropout: must be in [0, 1)"),
        (
            {"tuning_mode": "rlhf"},
            "--tuning_mode: unknown mode 'rlhf' (choose from sft, ppo, reward, grpo, dpo, kto)",
        ),
        ({"llm_path": None}, "--llm_path is required"),
        ({"dataset_path": []}, "--dataset_path is required"),
        ({"per_device_train_batch_size": 2.5}, "--per_device_train_batch_size: expected int"),
        ({"lora_r": "8.5"}, "--lora_r: expected int, got '8.5'"),
        ({"lora_r": 0}, "--lora_r: must be a positive number"),
        ({"max_samples": 0}, "--max_samples: must be positive"),
        ({"save_steps": -1}, "--save_steps: must be >= 0"),
        ({"num_train_epochs": 0}, "--num_train_epochs: must be a finite number > 0"),
        ({"bf16": "maybe"}, "--bf16: expected bool, got 'maybe'"),
        ({"logging_steps": True}, "--logging_steps: expected int, got True"),
        ({"experiment_name": "  "}, "--experiment_name: must not be empty"),
        ({"agent_types": [{"a": 1}]}, "--agent_types: expected str"),
    ],
)
def test_bad_values_name_the_flag(overrides: dict[str, Any], expected: str) -> None:
    msg = config_error(overrides={**REQUIRED, **overrides})
    assert msg.startswith(expected), msg
    assert "\n" not in msg


def test_bad_value_in_yaml_names_file_and_flag(tmp_path: Path) -> None:
    yml = write(tmp_path / "bad.yaml", "llm_path: m\ndataset_path: d\nlearning_rate: fast\n")
    assert config_error(str(yml)) == f"{yml}: --learning_rate: expected float, got 'fast'"


def test_max_steps_alone_allows_zero_epochs() -> None:
    cfg = build_config(overrides={**REQUIRED, "num_train_epochs": 0, "max_steps": 10})
    assert (cfg.max_steps, cfg.num_train_epochs) == (10, 0.0)


def test_coerce() -> None:
    assert coerce("lora_target_modules", "q_proj,v_proj", cls=TuningConfig) == ["q_proj", "v_proj"]
    assert coerce("lora_target_modules", ["q_proj", "v_proj"], cls=TuningConfig) == [
        "q_proj",
        "v_proj",
    ]
    assert coerce("lora_target_modules", ["q_proj, k_proj", "v_proj"], cls=TuningConfig) == [
        "q_proj",
        "k_proj",
        "v_proj",
    ]
    assert coerce("lora_target_modules", "q_proj,,", cls=TuningConfig) == ["q_proj"]
    assert coerce("dataset_path", "one.jsonl", cls=TuningConfig) == ["one.jsonl"]
    assert coerce("dataset_path", None, cls=TuningConfig) == []
    assert coerce("agent_types", ("A", "B"), cls=TuningConfig) == ["A", "B"]
    for text in ("true", "True", "yes", "on", "1", " YES "):
        assert coerce("bf16", text, cls=TuningConfig) is True
    for text in ("false", "FALSE", "no", "off", "0"):
        assert coerce("bf16", text, cls=TuningConfig) is False
    assert (
        coerce("bf16", True, cls=TuningConfig) is True
        and coerce("bf16", False, cls=TuningConfig) is False
    )
    assert (
        coerce("max_samples", "10", cls=TuningConfig) == 10
        and coerce("max_samples", 4.0, cls=TuningConfig) == 4
    )
    assert coerce("max_samples", None, cls=TuningConfig) is None
    assert (
        coerce("learning_rate", "1e-3", cls=TuningConfig) == 0.001
        and coerce("learning_rate", 1, cls=TuningConfig) == 1.0
    )
    assert coerce("llm_path", 5, cls=TuningConfig) == "5"
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: --fp16: expected bool, got 'perhaps'$"):
        coerce("fp16", "perhaps", source="cfg.yaml", cls=TuningConfig)
    with pytest.raises(ConfigError, match=r"^--learning_rate: expected float, got True$"):
        coerce("learning_rate", True, cls=TuningConfig)


def test_field_docs_cover_every_field() -> None:
    docs = field_docs(TuningConfig)
    assert set(docs) == set(FIELDS)
    for name in FIELDS:
        assert docs[name].strip() and docs[name].endswith((".", ")")), name
        assert "\n" not in docs[name] and "  " not in docs[name], name
    assert docs["learning_rate"] == "Peak learning rate of AdamW."


# --- CLI parsing (in process) ---------------------------------------------------------


def test_kebab_and_snake_flags_parse_alike() -> None:
    parser = cli.build_parser()
    kebab = parser.parse_args(
        [
            "train",
            "--llm-path",
            "X",
            "--dataset-path",
            "a",
            "b",
            "--learning-rate",
            "0.1",
            "--bf16",
            "--lora-target-modules",
            "q_proj",
            "v_proj",
            "--trust-remote-code",
            "false",
        ]
    )
    snake = parser.parse_args(
        [
            "train",
            "--llm_path",
            "X",
            "--dataset_path",
            "a",
            "b",
            "--learning_rate",
            "0.1",
            "--bf16",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--trust_remote_code",
            "false",
        ]
    )
    assert kebab == snake
    assert kebab.command == "train"
    assert kebab.llm_path == "X"
    assert kebab.dataset_path == ["a", "b"]
    assert kebab.learning_rate == "0.1"  # typed by build_config, which names the flag
    assert kebab.bf16 == "true"
    assert kebab.trust_remote_code == "false"
    assert kebab.config is None and kebab.json is False
    # Flags not given are absent, so they cannot override a --config file.
    for name in ("lora_r", "seed", "fp16", "num_train_epochs", "workspace"):
        assert not hasattr(kebab, name), name

    options = {
        k: v for k, v in vars(kebab).items() if k not in ("command", "config", "json", "debug")
    }
    cfg = build_config(None, options)
    assert (cfg.llm_path, cfg.dataset_path, cfg.learning_rate) == ("X", ["a", "b"], 0.1)
    assert cfg.bf16 is True and cfg.trust_remote_code is False
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_every_field_is_a_flag_in_both_spellings() -> None:
    parser = cli.build_parser()
    values = {"dataset_path": ["d"], "agent_types": ["A"], "lora_target_modules": ["q"]}
    for name in FIELDS:
        for flag in {f"--{name}", "--" + name.replace("_", "-")}:
            value = values.get(name, ["v"])
            ns = parser.parse_args(["train", flag, *value])
            assert getattr(ns, name) == (value if name in values else "v"), flag


def test_cmd_train_merges_config_file_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import simtune.training.run

    yml = write(
        tmp_path / "job.yaml",
        "llm-path: yaml/model\ndataset_path: [y.jsonl]\nlearning_rate: 0.01\nlora_r: 4\nseed: 1\n",
    )
    seen: dict[str, Any] = {}

    def fake_run_tuning(config: Any = None, /, **options: Any) -> Any:
        seen["config"], seen["options"] = config, options
        seen["cfg"] = build_config(config, options)
        return SimpleNamespace(to_dict=lambda: {"model_id": "fake"})

    monkeypatch.setattr(simtune.training.run, "run_tuning", fake_run_tuning)
    args = cli.build_parser().parse_args(
        ["train", "--config", str(yml), "--learning-rate", "0.5", "--seed", "3", "--json"]
    )
    assert cli.cmd_train(args) == 0
    assert json.loads(capsys.readouterr().out) == {"model_id": "fake"}
    assert seen["config"] == str(yml)
    assert seen["options"] == {"learning_rate": "0.5", "seed": "3"}
    cfg: TuningConfig = seen["cfg"]
    assert (cfg.llm_path, cfg.dataset_path) == ("yaml/model", ["y.jsonl"])
    assert (cfg.learning_rate, cfg.seed, cfg.lora_r) == (0.5, 3, 4)


# --- the console script -----------------------------------------------------------------


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_help() -> None:
    top = run_cli("--help", timeout=60)
    assert top.returncode == 0, top.stderr
    for command in ("train", "models", "ui", "make-tiny-model", "demo"):
        assert command in top.stdout

    proc = run_cli("train", "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # undo argparse's line wrapping
    defaults = TuningConfig()
    docs = field_docs(TuningConfig)
    for name in FIELDS:
        assert f"--{name} " in text or f"--{name}," in text, name
        if "_" in name:
            assert "--" + name.replace("_", "-") in text, name
        # The doc's first words are shown (wrapping may hyphenate later ones).
        assert " ".join(docs[name].split()[:3]) in text, name
    for name in (
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "seed",
        "experiment_name",
        "lr_scheduler_type",
        "warmup_ratio",
        "tuning_mode",
        "bf16",
    ):
        assert f"(default: {getattr(defaults, name)})" in text, name
    assert "(default: all-linear)" in text
    assert "--config YAML" in text


def test_no_command_prints_help_and_exits_2() -> None:
    proc = run_cli(timeout=60)
    assert proc.returncode == 2
    assert proc.stdout.startswith("usage: simtune")
    assert "COMMAND" in proc.stdout


def test_unknown_tuning_mode(tmp_path: Path) -> None:
    proc = run_cli(
        "train",
        "--llm_path",
        "m",
        "--dataset_path",
        str(SAMPLE),
        "--tuning_mode",
        "rlhf",
        cwd=tmp_path,
        timeout=60,
    )
    line = one_line_error(proc)
    assert (
        line == "simtune: error: --tuning_mode: unknown mode 'rlhf' "
        "(choose from sft, ppo, reward, grpo, dpo, kto)"
    )
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bad_learning_rate(tmp_path: Path) -> None:
    proc = run_cli(
        "train",
        "--llm-path",
        "m",
        "--dataset-path",
        str(SAMPLE),
        "--learning_rate",
        "abc",
        cwd=tmp_path,
        timeout=60,
    )
    assert one_line_error(proc) == "simtune: error: --learning_rate: expected float, got 'abc'"
    assert list(tmp_path.iterdir()) == []


def test_every_bad_option_is_reported_at_once(tmp_path: Path) -> None:
    """Options of different concerns (LoRA, optimisation, launch) that are all wrong:
    one error listing each, one per line, exit 2, nothing written."""
    proc = run_cli(
        "train",
        "--llm_path",
        "m",
        "--dataset_path",
        str(SAMPLE),
        "--lora_r",
        "0",
        "--seed",
        "-1",
        "--nnodes",
        "0",
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "simtune: error: 3 problems:",
        "  --nnodes: must be >= 1, got 0",
        "  --seed: must be in [0, 2**32), got -1",
        "  --lora_r: must be a positive number, got 0",
    ]
    assert list(tmp_path.iterdir()) == []


def test_validate_collects_every_concern() -> None:
    with pytest.raises(ConfigError) as info:
        TuningConfig(tuning_mode="rlhf", llm_path=None, lora_dropout=1.0, gamma=2.0).validate()
    problems = info.value.problems  # type: ignore[attr-defined]
    assert problems == [
        "--tuning_mode: unknown mode 'rlhf' (choose from sft, ppo, reward, grpo, dpo, kto)",
        "--llm_path is required (a model directory, adapter or model id)",
        "--dataset_path is required (one or more files or directories), or --env NAME "
        "for <workspace>/envs/NAME/datasets",
        "--lora_dropout: must be in [0, 1), got 1.0",
        "--gamma: must be in [0, 1], got 2.0",
    ]
    assert str(info.value).splitlines()[1:] == [f"  {p}" for p in problems]


def test_missing_dataset_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "decisions.jsonl"
    proc = run_cli(
        "train", "--llm_path", "m", "--dataset_path", str(missing), cwd=tmp_path, timeout=60
    )
    assert one_line_error(proc) == f"simtune: error: {missing}: no such file or directory"
    assert list(tmp_path.iterdir()) == []


def test_bad_record_through_the_cli(tmp_path: Path) -> None:
    data = write(
        tmp_path / "decisions_1.jsonl",
        '{"prompt": "p", "output": "o"}\n{"prompt": "p", "output": "o", "reward": "x"}\n',
    )
    proc = run_cli(
        "train", "--llm_path", "m", "--dataset_path", str(data), cwd=tmp_path, timeout=60
    )
    assert one_line_error(proc) == (
        f"simtune: error: {data}:2: field 'reward': expected a number, got 'x'"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decisions_1.jsonl"]


def test_config_file_errors_through_the_cli(tmp_path: Path) -> None:
    yml = write(tmp_path / "job.yaml", "llm_path: m\nlearning_rat: 1\n")
    proc = run_cli("train", "--config", str(yml), cwd=tmp_path, timeout=60)
    assert one_line_error(proc) == (
        f"simtune: error: {yml}: unknown option 'learning_rat' (did you mean --learning_rate?)"
    )


def test_argparse_usage_errors_are_one_line() -> None:
    proc = run_cli("train", "--no-such-flag", timeout=60)
    assert one_line_error(proc) == (
        "simtune: error: unrecognized arguments: --no-such-flag (see --help)"
    )
    proc = run_cli("train", "--llm_path", timeout=60)
    assert one_line_error(proc) == (
        "simtune train: error: argument --llm_path/--llm-path: expected one argument (see --help)"
    )


def test_importing_the_cli_stays_light() -> None:
    code = (
        "import json, sys\n"
        "import simtune.cli.main\n"
        "p = simtune.cli.main.build_parser()\n"
        "p._subparsers._group_actions[0].choices['train'].format_help()\n"
        "heavy = ('torch', 'transformers', 'mlflow', 'trl', 'peft', 'datasets', 'accelerate')\n"
        "print(json.dumps({'loaded': sorted(m for m in heavy if m in sys.modules),\n"
        "                  'cli': 'simtune.cli.main' in sys.modules}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    result = json.loads(proc.stdout)
    assert result == {"loaded": [], "cli": True}


def test_parser_is_argparse_with_one_line_errors() -> None:
    parser = cli.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["train", "--lora_r"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("key", "value", "flag"),
    [
        ("save_steps", None, "--save_steps"),
        ("seed", None, "--seed"),
        ("bf16", None, "--bf16"),
        ("num_train_epochs", float("inf"), "--num_train_epochs"),
        ("weight_decay", -5, "--weight_decay"),
        ("min_rating", float("nan"), "--min_rating"),
    ],
)
def test_null_or_non_finite_values_name_the_flag(key, value, flag):
    overrides = {"llm_path": "m", "dataset_path": ["d"], key: value}
    with pytest.raises(ConfigError, match=flag):
        build_config(overrides=overrides)


@pytest.mark.parametrize("flag", ["--learning_rat", "--max_step", "--lora"])
def test_abbreviated_flags_are_rejected_not_guessed(flag: str) -> None:
    """argparse would take `--learning_rat 1` as --learning_rate 1 and train with it."""
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["train", "--llm_path", "m", flag, "1"])
    assert exc.value.code == 2
