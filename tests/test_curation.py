"""`simtune data stats|validate|export|split` and their library functions.

Fast: no model, no network. Data is written into tmp_path here; the seed-export round
trip uses the `onesim` fixture (copies of the YuLan-OneSim sample files).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import run_cli

from simtune.decisions import (
    dataset_stats,
    export_records,
    read_dataset,
    split_decisions,
    validate_dataset,
    write_export,
)
from simtune.decisions.schema import Decision
from simtune.errors import ConfigError, DataError


def write_jsonl(path: Path, records: list[object], *, torn: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text(text + (torn or ""), encoding="utf-8")
    return path


def rec(i: int | str, **extra: object) -> dict[str, object]:
    return {"decision_id": f"d{i}", "prompt": f"prompt {i}", "output": f"answer {i}", **extra}


def fields(d: Decision) -> dict[str, object]:
    """Everything a decision holds except where it was read from."""
    out = dataclasses.asdict(d)
    del out["source"]
    return out


@pytest.fixture
def rich_log(tmp_path: Path) -> Path:
    """A folder with every kind of record and event the export must carry over."""
    root = tmp_path / "data"
    write_jsonl(
        root / "decisions_1.jsonl",
        [
            rec(
                1,
                env_name="market",
                run_id="r1",
                agent_id="a1",
                agent_type="Buyer",
                step=0,
                timestamp="2025-01-01T00:00:00",
                reward=1.0,
                model="m",
                latency_s=0.5,
                context={"k": [1, 2]},
                metadata={"tag": "x"},
            ),
            {
                "decision_id": "d2",
                "env_name": "market",
                "run_id": "r1",
                "agent_id": "a2",
                "agent_type": "Seller",
                "messages": [
                    {"role": "system", "content": "sys"},
                    {"role": "user", "content": "sell?"},
                ],
                "output": '```json\n{"sell": 1}\n```',
                "human_rating": 2,
                "low_quality_reason": "too cheap",
                "universe_id": "main",
            },
            rec(3, env_name="market", run_id="r2", agent_id="a1", agent_type="Buyer", rating=4),
            rec(4, run_id="r2", llm_rating=3.5, refined_output="better 4", created_at="t"),
            rec(5, context='{"as": "string"}', step=7),
            {"event": "reward", "decision_id": "d1", "value": 0.5},
            {"event": "rating", "decision_id": "d1", "value": 1, "source": "llm", "reason": "r"},
            {"event": "rating", "decision_id": "d2", "value": 5, "source": "llm"},
            {"event": "feedback", "decision_id": "d3", "value": "improved 3"},
        ],
    )
    return root


# --- stats -----------------------------------------------------------------------------------


def test_stats_groups_coverage_and_means(rich_log: Path) -> None:
    write_jsonl(
        rich_log / "decisions_2.jsonl",
        [rec(1), {"event": "reward", "decision_id": "ghost", "value": 1}],
    )
    stats = dataset_stats(read_dataset([str(rich_log)]))
    groups = {(g["env_name"], g["agent_type"]): g for g in stats["groups"]}
    assert list(groups) == [(None, None), ("market", "Buyer"), ("market", "Seller")]
    buyer = groups[("market", "Buyer")]
    assert buyer["records"] == 2
    assert (buyer["with_reward"], buyer["reward_pct"]) == (1, 50.0)
    assert (buyer["with_rating"], buyer["rating_pct"]) == (2, 100.0)  # d1 by the judge's event
    assert buyer["with_feedback"] == 1  # d3's feedback event
    assert buyer["mean_reward"] == 1.5  # 1.0 + the 0.5 event
    assert buyer["mean_rating"] == 2.5  # (1 + 4) / 2
    assert buyer["rated_by_llm"] == 1
    seller = groups[("market", "Seller")]
    assert seller["mean_rating"] == 2.0 and seller["rated_by_human"] == 1  # judge can't override
    assert seller["mean_prompt_chars"] == len("sys") + len("sell?")
    assert seller["mean_output_chars"] == len('```json\n{"sell": 1}\n```')  # verbatim
    total = stats["total"]
    assert total["records"] == 5 and total["with_rating"] == 4
    assert (stats["files"], stats["events"]) == (2, 5)
    assert (stats["orphan_events"], stats["duplicate_ids"]) == (1, 1)
    assert (stats["runs"], stats["agents"]) == (3, 2)


def test_stats_cli_table_and_json(rich_log: Path, tmp_path: Path) -> None:
    res = run_cli("data", "stats", str(rich_log), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["total"]["records"] == 5
    res = run_cli("data", "stats", str(rich_log))
    assert res.returncode == 0, res.stderr
    assert "Buyer" in res.stdout and "Seller" in res.stdout and "50%" in res.stdout
    assert "4 event(s)" in res.stdout

    # --env reads <workspace>/envs/NAME/datasets.
    ws = tmp_path / "ws"
    write_jsonl(ws / "envs" / "market" / "datasets" / "decisions_x.jsonl", [rec(1), rec(2)])
    res = run_cli("data", "stats", "--env", "market", "--workspace", str(ws), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["total"]["records"] == 2
    res = run_cli("data", "stats", "--env", "nope", "--workspace", str(ws))
    assert res.returncode == 2
    assert "envs/nope/datasets" in res.stderr and "no such file" in res.stderr
    res = run_cli("data", "stats")
    assert res.returncode == 2 and "--env NAME" in res.stderr


def test_stats_stops_at_bad_input_with_one_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [rec(1), rec(2, reward="high")])
    res = run_cli("data", "stats", str(path))
    assert res.returncode == 2
    assert (
        res.stderr.strip()
        == f"simtune: error: {path}:2: field 'reward': expected a number, got 'high'"
    )


# --- validate --------------------------------------------------------------------------------


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    root = tmp_path / "broken"
    write_jsonl(
        root / "decisions_a.jsonl",
        [
            rec(1),
            "not an object",
            rec(3, output=""),
            rec(4, rating="good"),
            {"event": "rating", "decision_id": "d1"},
            {"event": "reward", "decision_id": "ghost", "value": 1},
            rec(1, output="again"),
            rec(8),
        ],
        torn='{"decision_id": "d9", "pro',
    )
    # Line 3 is not JSON: a JSONL file is checked on after it.
    lines = (root / "decisions_a.jsonl").read_text().split("\n")
    lines.insert(2, "{oops")
    (root / "decisions_a.jsonl").write_text("\n".join(lines))
    (root / "decisions_b.json").write_text(
        '[\n  {"prompt": "p", "output": "o"},\n  {"prompt": "p"},\n  {"prompt": "q", "output": 3} \n'
        '  {"prompt": "r", "output": "never checked"}\n]\n'
    )
    (root / "decisions_c.jsonl").write_text("")
    return root


EXPECTED = [
    ("a", 2, None, "expected a JSON object, got str", "error"),
    (
        "a",
        3,
        None,
        "invalid JSON (Expecting property name enclosed in double quotes, column 2)",
        "error",
    ),
    ("a", 4, "output", "is empty", "error"),
    ("a", 5, "rating", "expected a number, got 'good'", "error"),
    ("a", 6, "value", "missing on a rating event", "error"),
    ("a", 8, "decision_id", "repeats decision 'd1' first read at", "warning"),
    ("a", 10, None, "skipped a torn last line", "warning"),
    ("b", 3, "output", "missing", "error"),
    ("b", 4, "output", "expected a string, got int", "error"),
    ("b", 5, None, "expected ',' or ']'", "error"),
    ("c", None, None, "file is empty", "error"),
    ("a", 7, "decision_id", "reward event names decision 'ghost'", "warning"),
]


def test_validate_collects_every_problem(broken: Path) -> None:
    dataset, problems = validate_dataset([str(broken)])
    got = [(Path(p.path or "").stem[-1], p.line, p.field, p.text, p.severity) for p in problems]
    assert len(got) == len(EXPECTED), "\n".join(p.text for p in problems)
    for (f, line, fld, text, sev), (ef, eline, efld, etext, esev) in zip(
        got, EXPECTED, strict=True
    ):
        assert (f, line, fld, sev) == (ef, eline, efld, esev), text
        assert etext in text
        where = f"decisions_{ef}.json" + ("l" if ef != "b" else "")
        prefix = f"{broken / where}:{eline}: " if eline else f"{broken / where}: "
        assert text.startswith(prefix + (f"field '{efld}': " if efld else ""))
    # What is good is still read: d1, d8 from a; the first element of b.
    assert {"d1", "d8"} <= {d.decision_id for d in dataset.decisions}
    assert len(dataset.decisions) == 3
    assert dataset.orphan_events == 1 and dataset.duplicate_ids == 1

    # The strict read (training) still stops at the first problem, unchanged.
    with pytest.raises(DataError, match=r"decisions_a\.jsonl:2: expected a JSON object"):
        read_dataset([str(broken)])


def test_validate_cli_prints_every_problem_and_exits_2(broken: Path, tmp_path: Path) -> None:
    res = run_cli("data", "validate", str(broken), str(tmp_path / "missing.jsonl"))
    assert res.returncode == 2
    out = res.stdout.strip().split("\n")
    assert len(out) == len(EXPECTED) + 2  # + the missing path + the summary
    assert out[0] == f"{tmp_path / 'missing.jsonl'}: no such file or directory"
    assert out[1] == f"{broken / 'decisions_a.jsonl'}:2: expected a JSON object, got str"
    assert (
        out[4] == f"{broken / 'decisions_a.jsonl'}:5: field 'rating': expected a number, got 'good'"
    )
    assert out[6].endswith("(warning)") and ":8: field 'decision_id': repeats" in out[6]
    assert out[-1].startswith(
        "FAILED: 10 error(s), 3 warning(s); read 4 record(s) and 1 event(s) from 2"
    )
    assert res.stderr == ""  # no log chatter besides the list

    res = run_cli("data", "validate", str(broken), "--json")
    report = json.loads(res.stdout)
    assert (report["errors"], report["warnings"]) == (9, 3)
    assert report["problems"][0]["line"] == 2


def test_validate_clean_and_warning_only_data_pass(tmp_path: Path) -> None:
    clean = write_jsonl(tmp_path / "clean" / "decisions_1.jsonl", [rec(1), rec(2)])
    res = run_cli("data", "validate", str(clean))
    assert res.returncode == 0, res.stdout
    assert (
        res.stdout.strip()
        == "ok: 0 error(s), 0 warning(s); read 2 record(s) and 0 event(s) from 1 file(s)"
    )
    warn = write_jsonl(
        tmp_path / "warn.jsonl", [rec(1), {"event": "reward", "decision_id": "zz", "value": 1}]
    )
    res = run_cli("data", "validate", str(warn))
    assert res.returncode == 0
    assert [p.text for p in validate_dataset([])[1]] == ["no dataset files given"]
    assert f"{warn}:2: field 'decision_id': reward event names decision 'zz'" in res.stdout


# --- export ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "seed"])
def test_export_round_trips_folded_decisions(rich_log: Path, tmp_path: Path, fmt: str) -> None:
    before = read_dataset([str(rich_log)]).decisions
    out = write_export(tmp_path / f"out.{fmt}", before, fmt)
    again = read_dataset([str(out)])
    assert again.files[0].events == 0  # events are folded into the records
    assert [fields(d) for d in again.decisions] == [fields(d) for d in before]
    d1, d2, d3, d4, _ = again.decisions
    assert (d1.reward, d1.rating, d1.reason) == (1.5, 1.0, "r")
    assert (d2.rating, d2.metadata["rating_source"], d2.reason) == (2.0, "human", "too cheap")
    assert d3.feedback == "improved 3" and d4.feedback == "better 4"

    raw = json.loads(out.read_text()) if fmt == "seed" else None
    if raw is not None:  # the seed's own keys, by rating source
        assert isinstance(raw, list) and len(raw) == 5
        assert (raw[1]["human_rating"], raw[1]["llm_rating"]) == (2.0, None)
        assert (raw[0]["llm_rating"], raw[0]["human_rating"]) == (1.0, None)
        assert raw[2]["rating"] == 4.0 and raw[2]["human_rating"] is None  # unknown source
        assert raw[3]["refined_output"] == "better 4" and raw[3]["trail_id"] == "r2"
        assert raw[1]["universe_id"] == "main" and raw[1]["low_quality_reason"] == "too cheap"
        assert raw[0]["processing_time"] == 0.5
        assert json.loads(raw[0]["context"]) == {"k": [1, 2]}  # a JSON string, like the seed


def test_seed_fixture_round_trips_through_both_formats(onesim: Path, tmp_path: Path) -> None:
    src = onesim / "processed_data.json"
    before = read_dataset([str(src)]).decisions
    seed = write_export(tmp_path / "seed.json", before, "seed")
    raw = json.loads(src.read_text())
    exported = json.loads(seed.read_text())
    assert set(raw[0]) <= set(exported[0])  # every key the seed writes is there
    assert [r["trail_id"] for r in exported] == [r["trail_id"] for r in raw]
    assert [r["reward"] for r in exported] == [4.0, 8.0, 7.0]
    for fmt, path in (("seed", seed), ("jsonl", tmp_path / "x.jsonl")):
        if fmt == "jsonl":
            write_export(path, before, fmt)
        assert [fields(d) for d in read_dataset([str(path)]).decisions] == [
            fields(d) for d in before
        ]


def test_export_records_drop_none_fields() -> None:
    d = Decision("x", "out", prompt="p")
    assert export_records([d]) == [{"decision_id": "x", "prompt": "p", "output": "out"}]
    with pytest.raises(ConfigError, match="--format"):
        export_records([d], "csv")


def test_export_cli_filters_overwrite_and_atomicity(rich_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "export" / "good.jsonl"
    res = run_cli("data", "export", str(rich_log), "-o", str(out), "--min-rating", "3")
    assert res.returncode == 0, res.stderr
    assert "exported 2 of 5 decision(s) (jsonl)" in res.stdout and "3 by --min-rating" in res.stdout
    assert [json.loads(x)["decision_id"] for x in out.read_text().splitlines()] == ["d3", "d4"]

    before = out.read_bytes()
    res = run_cli("data", "export", str(rich_log), "-o", str(out))
    assert res.returncode == 2 and "already exists; pass --force" in res.stderr
    assert out.read_bytes() == before
    res = run_cli(
        "data",
        "export",
        str(rich_log),
        "-o",
        str(out),
        "--force",
        "--agent-types",
        "Buyer",
        "--max-samples",
        "1",
    )
    assert res.returncode == 0, res.stderr
    assert [json.loads(x)["decision_id"] for x in out.read_text().splitlines()] == ["d1"]

    seed = tmp_path / "export" / "all.json"  # .json -> the seed's JSON list
    res = run_cli("data", "export", str(rich_log), "-o", str(seed))
    assert res.returncode == 0 and "(seed)" in res.stdout
    assert len(json.loads(seed.read_text())) == 5

    res = run_cli(
        "data", "export", str(rich_log), "-o", str(tmp_path / "none.jsonl"), "--min-reward", "100"
    )
    assert (
        res.returncode == 2 and "nothing to export" in res.stderr and "--min-reward" in res.stderr
    )
    assert not (tmp_path / "none.jsonl").exists()
    # Bad input: one line, nothing written.
    bad = write_jsonl(tmp_path / "bad.jsonl", [rec(1), rec(2, step="two")])
    res = run_cli("data", "export", str(bad), "-o", str(tmp_path / "bad-out.jsonl"))
    assert res.returncode == 2
    assert res.stderr.strip().endswith(f"{bad}:2: field 'step': expected an integer, got 'two'")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["all.json", "good.jsonl"]
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary files left behind
    assert not (tmp_path / "bad-out.jsonl").exists()


# --- split -----------------------------------------------------------------------------------


def runs(n_runs: int, per_run: int = 3, env: str = "e") -> list[Decision]:
    return [
        Decision(
            f"{env}-{r}-{i}", "o", prompt="p", env_name=env, run_id=f"run{r}", agent_id=f"a{i}"
        )
        for r in range(n_runs)
        for i in range(per_run)
    ]


def test_split_keeps_groups_whole_and_is_deterministic() -> None:
    data = runs(40)
    split = split_decisions(data, by="run", held_out=0.25, seed=1)
    assert len(split.train) + len(split.heldout) == len(data)
    train_runs = {d.run_id for d in split.train}
    held_runs = {d.run_id for d in split.heldout}
    assert not train_runs & held_runs
    assert split.train_groups + split.heldout_groups == 40
    assert 3 <= split.heldout_groups <= 20  # about a quarter of 40
    again = split_decisions(list(reversed(data)), by="run", held_out=0.25, seed=1)
    assert {d.run_id for d in again.heldout} == held_runs  # order does not matter

    # More data (new runs, more decisions of old runs) never moves an existing run.
    grown = split_decisions(data + runs(60, per_run=5), by="run", held_out=0.25, seed=1)
    assert held_runs <= {d.run_id for d in grown.heldout}
    assert train_runs <= {d.run_id for d in grown.train}
    # Another seed, another split; by agent keeps each agent on one side.
    assert {d.run_id for d in split_decisions(data, held_out=0.25, seed=2).heldout} != held_runs
    by_agent = split_decisions(runs(5, per_run=30), by="agent", held_out=0.3)
    assert not {d.agent_id for d in by_agent.train} & {d.agent_id for d in by_agent.heldout}


def test_split_refuses_an_empty_side_and_bad_flags() -> None:
    with pytest.raises(
        ConfigError,
        match=r"--held-out 0.2: the (train|held-out) side would be empty "
        r"\(1 run group\(s\).*use --by agent",
    ):
        split_decisions(runs(1, per_run=50), by="run")
    with pytest.raises(ConfigError, match="--held-out: expected a fraction"):
        split_decisions(runs(3), held_out=1.0)
    with pytest.raises(ConfigError, match="--by: expected one of run, agent"):
        split_decisions(runs(3), by="step")


def test_split_groups_keyless_decisions_by_file(tmp_path: Path) -> None:
    for k in range(30):
        write_jsonl(tmp_path / f"decisions_{k}.jsonl", [rec(f"{k}-{i}") for i in range(2)])
    split = split_decisions(read_dataset([str(tmp_path)]).decisions, held_out=0.3)
    assert split.keyless == 60
    files = lambda ds: {d.source.rpartition(":")[0] for d in ds}  # noqa: E731
    assert not files(split.train) & files(split.heldout)


def test_split_cli_writes_both_files_atomically(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_jsonl(
        data / "decisions_1.jsonl",
        [rec(f"{r}-{i}", run_id=f"run{r}", reward=float(i)) for r in range(20) for i in range(3)]
        + [{"event": "rating", "decision_id": "d0-0", "value": 5}],
    )
    out = tmp_path / "split"
    res = run_cli("data", "split", str(data), "--out", str(out), "--held-out", "0.3", "--seed", "7")
    assert res.returncode == 0, res.stderr
    train = read_dataset([str(out / "train.jsonl")]).decisions
    held = read_dataset([str(out / "heldout.jsonl")]).decisions
    assert len(train) + len(held) == 60
    assert f"train: {len(train)} decision(s)" in res.stdout
    assert not {d.run_id for d in train} & {d.run_id for d in held}
    folded = {d.decision_id: d for d in train + held}["d0-0"]
    assert folded.rating == 5.0 and folded.metadata["rating_source"] == "human"

    again = tmp_path / "split2"
    res = run_cli(
        "data", "split", str(data), "--out", str(again), "--held_out", "0.3", "--seed", "7"
    )
    assert (again / "heldout.jsonl").read_bytes() == (out / "heldout.jsonl").read_bytes()

    res = run_cli("data", "split", str(data), "--out", str(out))
    assert res.returncode == 2 and "already exists; pass --force" in res.stderr
    res = run_cli("data", "split", str(data), "--out", str(out), "--force", "--min-reward", "1")
    assert res.returncode == 0 and "dropped 20 by --min-reward" in res.stdout
    res = run_cli("data", "split", str(data), "--out", str(tmp_path / "x"), "--held-out", "2")
    assert res.returncode == 2 and "--held-out: expected a fraction" in res.stderr
    res = run_cli("data", "split", str(data), "--out", str(tmp_path / "y"), "--min-reward", "9")
    assert res.returncode == 2 and "nothing to split" in res.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert sorted(p.name for p in out.iterdir()) == ["heldout.jsonl", "train.jsonl"]
