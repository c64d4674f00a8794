"""Large datasets (issue 6, item 3): streaming reads in bounded memory, and results equal
to the in-memory path.

Memory is measured as the peak RSS of a real `simtune data stats` process (`os.wait4`
on it alone) on 100k and 400k records: what is kept per record (8-16 B of id
fingerprints) may add ~5 MB over the 300k more records, so the tolerance is 30 MB; an
in-memory read of the same files grows by several hundred MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import run_cli

from simtune.decisions import curate
from simtune.decisions.curate import (
    Filters,
    dataset_stats,
    export_records,
    render,
    split_decisions,
    stream_export,
    stream_split,
    stream_stats,
    write_export,
)
from simtune.decisions.reader import read_dataset, select, validate_dataset
from simtune.errors import DataError

RSS_TOLERANCE_MIB = 30


def generate(path: Path, n: int, *, event_every: int = 100) -> int:
    """`n` compact decision records (+ a rating event every `event_every`); returns events."""
    events = 0
    with path.open("w", encoding="utf-8", buffering=1 << 20) as fh:
        for i in range(n):
            fh.write(
                f'{{"decision_id": "d{i}", "env_name": "e", "run_id": "r{i // 5000}", '
                f'"agent_id": "{i % 500}", "agent_type": "T{i % 3}", "step": {i // 500}, '
                f'"prompt": "state {i % 97}: what now?", "output": "act {i % 7}", '
                f'"reward": {(i % 10) / 10}}}\n'
            )
            if i % event_every == event_every - 1:
                fh.write(f'{{"event": "rating", "decision_id": "d{i}", "value": {i % 5}}}\n')
                events += 1
    return events


def stats_rss(path: Path) -> tuple[dict, float]:
    """(`simtune data stats --json` of `path`, that process's peak RSS in MiB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "simtune.cli.main", "data", "stats", str(path), "--json"],
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        assert proc.returncode == 0, err.read().decode()
        return json.loads(out.read()), usage.ru_maxrss / 1024


def test_stats_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    small, big = tmp_path / "decisions_small.jsonl", tmp_path / "decisions_big.jsonl"
    ev_small, ev_big = generate(small, 100_000), generate(big, 400_000)
    stats_small, rss_small = stats_rss(small)
    stats_big, rss_big = stats_rss(big)
    assert stats_small["total"]["records"] == 100_000 and stats_small["events"] == ev_small
    assert stats_big["total"]["records"] == 400_000 and stats_big["events"] == ev_big
    assert stats_big["total"]["with_rating"] == ev_big and stats_big["orphan_events"] == 0
    assert stats_big["runs"] == 80 and stats_big["agents"] == 500
    assert rss_big - rss_small < RSS_TOLERANCE_MIB, (rss_small, rss_big)


def messy(root: Path) -> list[Path]:
    """Every shape the reader folds: events (one orphan), a repeated id, id-less records,
    chat messages, seed fields, fences; across two files."""
    root.mkdir(parents=True, exist_ok=True)
    a = root / "decisions_a.jsonl"
    b = root / "decisions_b.jsonl"
    rows_a = [
        {
            "decision_id": f"d{i}",
            "env_name": "e",
            "run_id": f"r{i % 7}",
            "agent_id": f"a{i % 4}",
            "agent_type": "Buyer" if i % 2 else "Seller",
            "prompt": f"p{i}",
            "output": f"o{i}",
            "reward": i / 10,
            "metadata": {"k": i},
        }
        for i in range(60)
    ]
    rows_a += [
        {"prompt": "no id", "output": "x", "run_id": "r1"},
        {"messages": [{"role": "user", "content": "hi"}], "output": "```json\n{}\n```"},
        {"trail_id": "t9", "prompt": "seed", "output": "y", "human_rating": 4, "context": "{}"},
        {"event": "rating", "decision_id": "d3", "value": 2, "source": "llm"},
        {"event": "reward", "decision_id": "d5", "value": 1.5},
        {"event": "feedback", "decision_id": "d7", "value": "better"},
        {"event": "rating", "decision_id": "nope", "value": 1},
    ]
    rows_b = [
        {"decision_id": "d2", "prompt": "again", "output": "dup"},
        {"decision_id": "b1", "prompt": "p", "output": "o", "agent_id": "z"},
        {"event": "rating", "decision_id": "b1", "value": 5},
    ]
    for path, rows in ((a, rows_a), (b, rows_b)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return [a, b]


def test_streaming_stats_equal_in_memory_sequential_and_parallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [str(p) for p in messy(tmp_path / "data")]
    expected = dataset_stats(read_dataset(paths))
    assert stream_stats(paths, workers=1) == expected
    # Force the process pool on a small file, cut into many ranges, so repeated ids
    # and events cross range boundaries.
    monkeypatch.setattr(curate, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(curate, "_CHUNK_BYTES", 300)
    assert stream_stats(paths, workers=2) == expected
    # A bad record deep in a file: the same first error as a strict read.
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"decision_id": f"x{i}", "prompt": "p", "output": "o"}) for i in range(50)]
    lines[37] = json.dumps({"decision_id": "x37", "prompt": "p", "output": "o", "step": "two"})
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as strict:
        read_dataset([str(bad)])
    with pytest.raises(DataError) as streamed:
        stream_stats([str(bad)], workers=2)
    assert (
        str(streamed.value)
        == str(strict.value)
        == (f"{bad}:38: field 'step': expected an integer, got 'two'")
    )


@pytest.mark.parametrize(
    "line,field",
    [
        ('{"decision_id": "x9", "prompt": "a\\ud800", "output": "o"}', "prompt"),
        ('{"decision_id": "x9", "prompt": "p", "output": "o", "metadata": {"t": NaN}}',
         "metadata.t"),
    ],
)  # fmt: skip
def test_parallel_stats_refuse_what_the_strict_parser_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, field: str
) -> None:
    """Issue 14: the parallel stats workers parse with the same strict rules."""
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"decision_id": f"x{i}", "prompt": "p", "output": "o"}) for i in range(20)]
    lines[9] = line
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(curate, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(curate, "_CHUNK_BYTES", 300)
    with pytest.raises(DataError) as strict:
        read_dataset([str(bad)])
    with pytest.raises(DataError) as streamed:
        stream_stats([str(bad)], workers=2)
    assert str(streamed.value) == str(strict.value)
    assert str(strict.value).startswith(f"{bad}:10: field '{field}': ")


def test_validate_reports_every_bad_line_among_many(tmp_path: Path) -> None:
    path = tmp_path / "decisions_v.jsonl"
    lines = [
        json.dumps({"decision_id": f"d{i}", "prompt": "p", "output": "o"}) for i in range(20_000)
    ]
    bad = {1234: "{not json", 5000: '{"decision_id": "d5000", "prompt": "p"}', 17_777: "[]"}
    for i, text in bad.items():
        lines[i] = text
    lines.append('{"decision_id": "d1", "prompt": "p", "output": "again"}')
    path.write_text("\n".join(lines) + "\n" + '{"torn', encoding="utf-8")
    _, expected = validate_dataset([str(path)])
    res = run_cli("data", "validate", str(path), "--json")
    assert res.returncode == 2, res.stderr
    report = json.loads(res.stdout)
    assert report["errors"] == 3 and report["warnings"] == 2  # repeated id, torn line
    assert [(p["line"], p["severity"]) for p in report["problems"]] == [
        (1235, "error"),
        (5001, "error"),
        (17_778, "error"),
        (20_001, "warning"),
        (20_002, "warning"),
    ]
    assert [p["message"] for p in report["problems"]] == [p.text for p in expected]
    assert report["records"] == 19_998 and report["decisions"] == 19_997


@pytest.mark.parametrize("fmt", ["jsonl", "seed"])
def test_streaming_export_writes_the_in_memory_bytes(tmp_path: Path, fmt: str) -> None:
    paths = [str(p) for p in messy(tmp_path / "data")]
    ref = tmp_path / f"ref.{fmt}"
    write_export(ref, select(read_dataset(paths).decisions, min_reward=0.2).decisions, fmt)
    out = tmp_path / "out" / f"streamed.{fmt}"
    filters = Filters(min_reward=0.2)
    path, scan = stream_export(paths, out, fmt, filters)
    assert path == out and out.read_bytes() == ref.read_bytes()
    assert filters.dropped == select(read_dataset(paths).decisions, min_reward=0.2).dropped
    assert scan.decisions == len(read_dataset(paths).decisions)
    # Nothing left: an error, and no file or folder behind.
    with pytest.raises(DataError, match="nothing to export"):
        stream_export(paths, tmp_path / "none" / "x.jsonl", fmt, Filters(min_reward=99))
    assert not (tmp_path / "none").exists()


def test_streaming_split_writes_the_in_memory_files(tmp_path: Path) -> None:
    paths = [str(p) for p in messy(tmp_path / "data")]
    decisions = select(read_dataset(paths).decisions, max_samples=50).decisions
    ref = split_decisions(decisions, by="run", held_out=0.3, seed=3)
    counts = stream_split(
        paths, tmp_path / "split", Filters(max_samples=50), by="run", held_out=0.3, seed=3
    )
    assert (tmp_path / "split" / "train.jsonl").read_bytes() == render(
        export_records(ref.train), "jsonl"
    )
    assert (tmp_path / "split" / "heldout.jsonl").read_bytes() == render(
        export_records(ref.heldout), "jsonl"
    )
    assert (counts.train, counts.heldout) == (len(ref.train), len(ref.heldout))
    assert (counts.train_groups, counts.heldout_groups, counts.keyless) == (
        ref.train_groups,
        ref.heldout_groups,
        ref.keyless,
    )


def test_examples_are_tokenized_in_batches_and_cached(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from simtune.config import build_config
    from simtune.training.model import load_tokenizer, resolve_model
    from simtune.training.sft import build_examples, split_prompt_answer

    sample = Path(__file__).parents[1] / "src" / "simtune" / "data" / "sample_decisions.jsonl"
    cfg = build_config(overrides={"llm_path": str(tiny_model), "dataset_path": [str(sample)]})
    tok = load_tokenizer(resolve_model(str(tiny_model)))
    decisions = read_dataset([str(sample)]).decisions
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="simtune.training.sft")

    first = build_examples(decisions, tok, cfg, cache_dir=cache, batch_size=7)
    assert "cache miss" in caplog.text and len(list(cache.glob("*.json"))) == 1
    # Batched ids are the per-example ids.
    for d, ids in zip(decisions[:5], first.input_ids, strict=False):
        p, a = split_prompt_answer(tok, d.chat_prompt(cfg.system_prompt), d.target)
        assert ids == (p + a)[-cfg.max_length :]
    caplog.clear()
    second = build_examples(decisions, tok, cfg, cache_dir=cache)
    assert "cache hit" in caplog.text and second == first

    # Other data or another max_length: a miss and a new file.
    caplog.clear()
    shorter = build_config(
        overrides={"llm_path": str(tiny_model), "dataset_path": [str(sample)], "max_length": 64}
    )
    build_examples(decisions, tok, shorter, cache_dir=cache)
    assert "cache miss" in caplog.text
    caplog.clear()
    build_examples(decisions[1:], tok, cfg, cache_dir=cache)
    assert "cache miss" in caplog.text and len(list(cache.glob("*.json"))) == 3
