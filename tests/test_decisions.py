"""Decision readers (DESIGN.md §3): every accepted format, event folding, filters, errors.

Fast: no model, no torch. Seed-export tests use the `onesim` fixture (copies of the
YuLan-OneSim sample files); everything else is written into tmp_path here.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import SAMPLE

from simtune.decisions import Dataset, Decision, describe, read_dataset, select
from simtune.decisions.schema import unfence
from simtune.errors import DataError


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def rec(i: int | str, **extra: object) -> dict[str, object]:
    return {"decision_id": f"d{i}", "prompt": f"prompt {i}", "output": f"answer {i}", **extra}


def data_error(paths: list[Path | str]) -> DataError:
    with pytest.raises(DataError) as info:
        read_dataset([str(p) for p in paths])
    return info.value


# --- the seed simulator's export ------------------------------------------------------


def test_seed_processed_export(onesim: Path) -> None:
    path = onesim / "processed_data.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    ds = read_dataset([str(path)])

    assert len(ds.decisions) == 3
    assert ds.orphan_events == 0 and ds.duplicate_ids == 0
    assert [f.format for f in ds.files] == ["json"]
    assert ds.files[0].records == 3 and ds.files[0].events == 0
    assert [d.decision_id for d in ds.decisions] == [r["decision_id"] for r in raw]
    assert [d.run_id for d in ds.decisions] == [r["trail_id"] for r in raw]
    assert [d.latency_s for d in ds.decisions] == [r["processing_time"] for r in raw]
    assert [d.reward for d in ds.decisions] == [4.0, 8.0, 7.0]
    assert all(isinstance(d.reward, float) for d in ds.decisions)
    assert [d.agent_id for d in ds.decisions] == ["0", "5", "10"]
    assert [d.step for d in ds.decisions] == [1, 1, 1]
    assert all(d.rating is None for d in ds.decisions)  # llm_rating/human_rating are null
    # "[" is on line 1, each element starts with "  {" on its own line.
    starts = [n for n, ln in enumerate(path.read_text().split("\n"), 1) if ln == "  {"]
    assert [d.source for d in ds.decisions] == [f"{path}:{n}" for n in starts]
    assert starts[0] == 2

    for d, r in zip(ds.decisions, raw, strict=True):
        # The answer is kept as the simulator wrote it, ```json fence included (its
        # parser needs it); --unfence_outputs trains on the JSON inside.
        assert r["output"].lstrip().startswith("```json")
        assert d.output == r["output"]
        assert json.loads(unfence(d.output)) == json.loads(r["output"].strip()[len("```json") : -3])
        assert d.prompt == r["prompt"]
        # context arrives as a JSON string and is parsed.
        assert isinstance(d.context, dict)
        assert d.context == json.loads(r["context"])
        # Unknown keys are kept, nulls and consumed seed keys are not duplicated.
        assert d.metadata["universe_id"] == "main"
        assert d.metadata["created_at"] == r["created_at"]
        for gone in (
            "trail_id",
            "processing_time",
            "refined_output",
            "low_quality_reason",
            "llm_rating",
            "human_rating",
            "event_id",
        ):
            assert gone not in d.metadata

    first, second, third = ds.decisions
    # refined_output -> feedback (verbatim), which becomes the SFT target.
    for d, r in ((first, raw[0]), (third, raw[2])):
        assert r["refined_output"].lstrip().startswith("```json")
        assert d.feedback == r["refined_output"]
        # (--unfence_outputs: only the outer fence goes; the third one's refined JSON
        # quotes fences in strings.)
        inner = unfence(d.feedback)
        assert inner.startswith("{") and inner.endswith("}")
        assert json.loads(inner) == json.loads(r["refined_output"].strip()[len("```json") : -3])
        assert d.target == d.feedback != d.output
        assert d.reason == r["low_quality_reason"]
    assert json.loads(unfence(first.feedback))["quantity"] == 100
    assert json.loads(unfence(first.output))["quantity"] == 66
    assert second.feedback is None and second.reason is None
    assert second.target == second.output == '```json\n{\n    "target_id": "10"\n}\n```'


def test_seed_prompt_completion_pairs_have_stable_ids(onesim: Path, tmp_path: Path) -> None:
    path = onesim / "original_data.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    first = read_dataset([str(path)])
    second = read_dataset([str(path)])

    assert len(first.decisions) == 8
    assert [d.prompt for d in first.decisions] == [r["prompt"] for r in raw]
    assert [d.output for d in first.decisions] == [r["completion"] for r in raw]
    assert all(
        d.messages is None and d.reward is None and d.rating is None for d in first.decisions
    )
    ids = [d.decision_id for d in first.decisions]
    assert len(set(ids)) == 8 and all(len(i) == 32 for i in ids)
    assert ids == [d.decision_id for d in second.decisions]
    # A copy of the file elsewhere keeps its ids (they do not depend on the directory).
    moved = tmp_path / "elsewhere" / "original_data.json"
    moved.parent.mkdir()
    shutil.copyfile(path, moved)
    assert [d.decision_id for d in read_dataset([str(moved)]).decisions] == ids


def test_same_named_files_in_different_directories_are_not_duplicates(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "run1" / "decisions_x.jsonl", [{"prompt": "p1", "output": "o1"}])
    b = write_jsonl(tmp_path / "run2" / "decisions_x.jsonl", [{"prompt": "p2", "output": "o2"}])
    ds = read_dataset([str(a), str(b)])
    assert [d.prompt for d in ds.decisions] == ["p1", "p2"]
    assert ds.duplicate_ids == 0


# --- other record shapes ------------------------------------------------------------


def test_chat_messages_last_assistant_turn_is_the_output(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "You are a trader."},
                    {"role": "user", "content": "Buy or sell?"},
                    {"role": "assistant", "content": '```json\n{"action": "buy"}\n```'},
                ],
                "reward": 1,
            },
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Part one. "},
                            {"type": "text", "text": "Part two."},
                        ],
                    },
                    {"role": "assistant", "content": "ok"},
                ]
            },
        ],
    )
    first, second = read_dataset([str(path)]).decisions
    assert first.output == '```json\n{"action": "buy"}\n```'  # verbatim
    assert first.prompt is None
    assert first.messages == [
        {"role": "system", "content": "You are a trader."},
        {"role": "user", "content": "Buy or sell?"},
    ]
    assert first.chat_prompt("ignored: has a system turn") == first.messages
    assert first.reward == 1.0
    assert second.messages == [{"role": "user", "content": "Part one. Part two."}]
    assert second.output == "ok"
    assert second.chat_prompt("Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Part one. Part two."},
    ]


def test_trl_conversational_prompt_completion(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "trl.jsonl",
        [
            {
                "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q?"}],
                "completion": [{"role": "assistant", "content": "a!"}],
            }
        ],
    )
    (d,) = read_dataset([str(path)]).decisions
    assert d.messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q?"}]
    assert d.prompt is None
    assert d.output == "a!"
    assert d.target == "a!"


def test_design_record_all_fields(tmp_path: Path) -> None:
    record = {
        "decision_id": "abc123",
        "env_name": "market",
        "run_id": "run-7",
        "agent_id": "3",
        "agent_type": "Buyer",
        "step": 4,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "prompt": "How many?",
        "output": "2",
        "reward": 0.5,
        "rating": 4,
        "feedback": "3",
        "reason": "too few",
        "model": "qwen",
        "latency_s": 0.25,
        "context": {"price": 10},
        "metadata": {"k": "v"},
        "extra_key": [1, 2],
    }
    path = write_jsonl(tmp_path / "design.jsonl", [record])
    (d,) = read_dataset([str(path)]).decisions
    assert d == Decision(
        decision_id="abc123",
        output="2",
        prompt="How many?",
        messages=None,
        env_name="market",
        run_id="run-7",
        agent_id="3",
        agent_type="Buyer",
        step=4,
        timestamp="2026-01-01T00:00:00+00:00",
        reward=0.5,
        rating=4.0,
        feedback="3",
        reason="too few",
        model="qwen",
        latency_s=0.25,
        context={"price": 10},
        metadata={"k": "v", "extra_key": [1, 2]},
        source=f"{path}:1",
    )
    assert d.target == "3"
    assert d.chat_prompt() == [{"role": "user", "content": "How many?"}]


def test_agent_type_falls_back_to_context(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "ctx.jsonl",
        [
            rec(1, context=json.dumps({"agent_type": "Seller", "x": 1})),
            rec(2, context="not json {"),
        ],
    )
    first, second = read_dataset([str(path)]).decisions
    assert first.agent_type == "Seller" and first.context == {"agent_type": "Seller", "x": 1}
    assert second.agent_type is None and second.context == "not json {"


def test_raw_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False) writes U+2028/U+0085 raw; they are not line breaks.
    path = write_jsonl(
        tmp_path / "u.jsonl",
        [
            rec(1, output="a\u2028b"),
            rec(2, prompt="x\x85y"),
            rec(3),
        ],
    )
    ds = read_dataset([str(path)])
    assert [d.output for d in ds.decisions] == ["a\u2028b", "answer 2", "answer 3"]
    assert ds.decisions[1].prompt == "x\x85y"
    assert [d.source for d in ds.decisions] == [f"{path}:{n}" for n in (1, 2, 3)]


def test_crlf_bom_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "win.jsonl"
    lines = [json.dumps(rec(1)), "", json.dumps(rec(2)), "   "]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    ds = read_dataset([str(path)])
    assert [d.decision_id for d in ds.decisions] == ["d1", "d2"]
    assert [d.source for d in ds.decisions] == [f"{path}:1", f"{path}:3"]


def test_bundled_sample_reads() -> None:
    ds = read_dataset([str(SAMPLE)])
    assert len(ds.decisions) == 48
    assert ds.files[0].format == "jsonl"
    assert {d.env_name for d in ds.decisions} == {"job_market"}


# --- ratings and events -----------------------------------------------------------------


def test_human_rating_preferred_over_llm_rating(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            rec(1, human_rating=2, llm_rating=5),
            rec(2, llm_rating=3.5),
            rec(3, rating=4, llm_rating=1),
            rec(4, human_rating=None, llm_rating=None),
        ],
    )
    d1, d2, d3, d4 = read_dataset([str(path)]).decisions
    assert (d1.rating, d1.metadata["rating_source"]) == (2.0, "human")
    assert (d2.rating, d2.metadata["rating_source"]) == (3.5, "llm")
    assert d3.rating == 4.0 and "rating_source" not in d3.metadata
    assert d4.rating is None and "rating_source" not in d4.metadata


def test_events_are_folded(tmp_path: Path) -> None:
    log = write_jsonl(
        tmp_path / "decisions_1.jsonl",
        [
            # An event may come before its decision in the log.
            {"event": "reward", "decision_id": "a", "value": 0.25},
            rec("a", decision_id="a", reward=1.0),
            rec("b", decision_id="b", human_rating=4),
            rec("c", decision_id="c", llm_rating=2),
            rec("n", decision_id="n"),
            {"event": "reward", "decision_id": "a", "value": 2},
            {"event": "reward", "decision_id": "n", "value": -1},
            {"event": "rating", "decision_id": "a", "value": 1, "source": "llm"},
            {"event": "rating", "decision_id": "a", "value": 5},
            {"event": "rating", "decision_id": "b", "value": 1, "source": "llm"},
            {
                "event": "rating",
                "decision_id": "c",
                "value": 4.5,
                "source": "human",
                "feedback": '```json\n{"better": true}\n```',
                "reason": "was vague",
            },
            {"event": "rating", "decision_id": "c", "value": 0, "source": "llm"},
            {"event": "reward", "decision_id": "ghost", "value": 1},
            {"event": "rating", "decision_id": "ghost2", "value": 1},
            rec("a", decision_id="a", output="a later copy"),
        ],
    )
    # Events in another file fold into decisions of the first.
    late = write_jsonl(
        tmp_path / "decisions_2.jsonl",
        [
            {"event": "feedback", "decision_id": "n", "value": "```\nimproved\n```"},
            {"event": "feedback", "decision_id": "ghost3", "value": "x"},
        ],
    )
    ds = read_dataset([str(log), str(late)])
    by_id = {d.decision_id: d for d in ds.decisions}

    assert list(by_id) == ["b", "c", "n", "a"]  # a merged record sits at its last copy
    a, b, c, n = (by_id[k] for k in "abcn")
    assert a.reward == pytest.approx(3.25)  # 1.0 + 0.25 + 2: reward events add
    assert a.output == "a later copy"  # a later copy's non-null fields win
    assert (a.rating, a.metadata["rating_source"]) == (5.0, "human")  # newest rating wins
    assert (b.rating, b.metadata["rating_source"]) == (4.0, "human")  # judge can't override
    assert (c.rating, c.metadata["rating_source"]) == (4.5, "human")
    assert c.feedback == '```json\n{"better": true}\n```' and c.target == c.feedback
    assert c.reason == "was vague"
    assert n.reward == -1.0  # a reward event on an unrewarded decision sets it
    assert n.feedback == "```\nimproved\n```" and n.target == n.feedback  # verbatim
    assert ds.orphan_events == 3
    assert ds.duplicate_ids == 1
    assert [(f.records, f.events) for f in ds.files] == [(5, 10), (0, 2)]


def test_duplicate_ids_merge_in_file_order_across_files(tmp_path: Path) -> None:
    one = write_jsonl(tmp_path / "one.jsonl", [rec(1), rec(2)])
    two = write_jsonl(tmp_path / "two.jsonl", [rec(2, output="second"), rec(3), rec(1)])
    ds = read_dataset([str(one), str(two)])
    # Later copies win; a merged record sits at its last copy's place (where a streaming
    # pass can give it out) and keeps its first copy's source.
    assert [(d.decision_id, d.output) for d in ds.decisions] == [
        ("d2", "second"),
        ("d3", "answer 3"),
        ("d1", "answer 1"),
    ]
    assert ds.duplicate_ids == 2
    assert ds.decisions[0].source == f"{one}:2"


# --- files and directories --------------------------------------------------------------


def test_directory_input_is_recursive_and_ignores_other_files(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    write_jsonl(root / "decisions_a.jsonl", [rec(1)])
    sub = root / "run2" / "deeper"
    sub.mkdir(parents=True)
    (sub / "decisions_b.json").write_text(json.dumps([rec(2), rec(3)], indent=2))
    # None of these may be read: they would fail if they were.
    (root / "other.jsonl").write_text("not json\n")
    (root / "decisions_c.txt").write_text("not json\n")
    (root / "notes.md").write_text("# notes\n")
    (root / "decisions_d.json.bak").write_text("not json\n")
    (root / "decisions_dir.jsonl").mkdir()  # a directory with a matching name

    ds = read_dataset([str(root)])
    assert sorted(d.decision_id for d in ds.decisions) == ["d1", "d2", "d3"]
    assert sorted(Path(f.path).name for f in ds.files) == ["decisions_a.jsonl", "decisions_b.json"]
    assert {f.format for f in ds.files} == {"json", "jsonl"}


def test_several_paths_and_each_file_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "logs"
    a = write_jsonl(root / "decisions_a.jsonl", [rec(1)])
    extra = write_jsonl(tmp_path / "extra.jsonl", [rec(2)])
    monkeypatch.chdir(tmp_path)
    ds = read_dataset([str(root), str(a), "logs/decisions_a.jsonl", str(extra), "extra.jsonl"])
    assert [Path(f.path).resolve() for f in ds.files] == [a.resolve(), extra.resolve()]
    assert [d.decision_id for d in ds.decisions] == ["d1", "d2"]
    assert ds.duplicate_ids == 0


def test_directory_without_decision_files(tmp_path: Path) -> None:
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    (empty / "data.jsonl").write_text(json.dumps(rec(1)) + "\n")
    err = data_error([empty])
    assert str(err).startswith(f"{empty}: ")
    assert "decisions_*.json" in str(err)
    assert err.path == str(empty) and err.line is None


def test_file_sha256_recorded(tmp_path: Path) -> None:
    import hashlib

    path = write_jsonl(tmp_path / "h.jsonl", [rec(1)])
    ds = read_dataset([str(path)])
    assert ds.files[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# --- errors name file:line and field ------------------------------------------------


def test_bad_element_in_json_list_names_its_start_line(tmp_path: Path) -> None:
    records = [rec(1), rec(2), {"decision_id": "d3", "prompt": "p"}, rec(4)]
    path = tmp_path / "decisions_x.json"
    path.write_text(json.dumps(records, indent=2))
    starts = [n for n, ln in enumerate(path.read_text().split("\n"), 1) if ln == "  {"]
    assert len(starts) == 4 and starts[2] > 10
    err = data_error([path])
    assert str(err) == (
        f"{path}:{starts[2]}: field 'output': missing: a record needs 'output' (or 'completion')"
    )
    assert (err.path, err.line, err.field) == (str(path), starts[2], "output")


def test_invalid_json_inside_a_json_list_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "p", "output": "o"},\n  {"prompt": "p",\n   "output": }\n]\n')
    err = data_error([path])
    assert str(err).startswith(f"{path}:4: invalid JSON (")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('[{"prompt": "p", "output": "o"}\n', 2, "unterminated list"),
        ('[{"prompt": "p", "output": "o"} {"prompt": "q"}]', 1, "expected ',' or ']'"),
        ('[{"prompt": "p", "output": "o"}]\n\n[]\n', 3, "extra data after the list"),
    ],
)
def test_malformed_json_list_structure(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "l.json"
    path.write_text(text)
    assert str(data_error([path])) == f"{path}:{line}: invalid JSON ({message})"


def test_invalid_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec(1)) + "\n\n" + json.dumps(rec(2)) + '\n{"prompt": oops}\n')
    err = data_error([path])
    assert str(err).startswith(f"{path}:4: invalid JSON (Expecting value, column 12)")
    assert err.line == 4


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ('{"output": "o"}', "prompt", "missing: a record needs 'prompt' or 'messages'"),
        ('{"prompt": "   ", "output": "o"}', "prompt", "missing"),
        ('{"messages": [{"role": "assistant", "content": "only"}]}', "prompt", "missing"),
        ('{"prompt": "p"}', "output", "missing: a record needs 'output' (or 'completion')"),
        ('{"prompt": "p", "output": ""}', "output", "is empty"),
        ('{"prompt": "p", "output": "```json\\n\\n```"}', "output", "is empty"),
        ('{"prompt": "p", "output": 42}', "output", "expected a string, got int"),
        (
            '{"prompt": "p", "output": "o", "reward": "high"}',
            "reward",
            "expected a number, got 'high'",
        ),
        ('{"prompt": "p", "output": "o", "reward": true}', "reward", "expected a number, got True"),
        (
            '{"prompt": "p", "output": "o", "reward": Infinity}',
            "reward",
            "expected a finite number, got inf",
        ),
        (
            '{"prompt": "p", "output": "o", "reward": 1' + "0" * 400 + "}",
            "reward",
            "expected a finite number",
        ),
        (
            '{"prompt": "p", "output": "o", "rating": NaN}',
            "rating",
            "expected a finite number, got nan",
        ),
        ('{"prompt": "p", "output": "o", "human_rating": NaN}', "human_rating", "finite"),
        ('{"prompt": "p", "output": "o", "step": 1.5}', "step", "expected an integer, got 1.5"),
        ('{"prompt": "p", "output": "o", "step": "3"}', "step", "expected an integer, got '3'"),
        ('{"prompt": "p", "output": "o", "step": true}', "step", "expected an integer"),
        (
            '{"prompt": "p", "output": "o", "step": NaN}',
            "step",
            "expected a finite number, got nan",
        ),
        (
            '{"prompt": "p", "output": "o", "step": Infinity}',
            "step",
            "expected a finite number, got inf",
        ),
        ('{"prompt": "p", "output": "o", "feedback": 3}', "feedback", "expected a string, got int"),
        ('{"prompt": 7, "output": "o"}', "prompt", "expected a string or a list of chat messages"),
        ('{"messages": [{"content": "x"}], "output": "o"}', "messages[0]", "'role'"),
        (
            '{"messages": [{"role": "user", "content": 5}], "output": "o"}',
            "messages[0].content",
            "expected a string",
        ),
        (
            '{"messages": [{"role": "user", "content": [{"text": 5}]}], "output": "o"}',
            "messages[0].content",
            "expected a string",
        ),
        ('{"messages": [], "output": "o"}', "messages", "is an empty list"),
        ('{"event": "bonus", "decision_id": "x", "value": 1}', "event", "unknown event 'bonus'"),
        ('{"event": "reward", "value": 1}', "decision_id", "missing on a reward event"),
        ('{"event": "reward", "decision_id": "x"}', "value", "missing on a reward event"),
        ('{"event": "rating", "decision_id": "x", "value": NaN}', "value", "finite"),
        ('{"event": "feedback", "decision_id": "x", "value": 1}', "value", "string value"),
    ],
)
def test_bad_record_names_file_line_and_field(
    tmp_path: Path, line: str, field: str, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec(1)) + "\n" + json.dumps(rec(2)) + "\n" + line + "\n")
    err = data_error([path])
    prefix = f"{path}:3: field '{field}': "
    assert str(err).startswith(prefix), str(err)
    assert message in str(err)[len(prefix) :]
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert "\n" not in str(err)


def test_bad_record_in_json_list_names_field(tmp_path: Path) -> None:
    path = tmp_path / "decisions_r.json"
    path.write_text(
        '[\n  {"prompt": "p", "output": "o"},\n'
        '  {"prompt": "p", "output": "o",\n   "reward": "lots"}\n]\n'
    )
    assert str(data_error([path])) == f"{path}:3: field 'reward': expected a number, got 'lots'"


def test_empty_file(tmp_path: Path) -> None:
    for name, content in (("empty.jsonl", ""), ("blank.json", " \n\n\t\n")):
        path = tmp_path / name
        path.write_text(content)
        assert str(data_error([path])) == f"{path}: file is empty"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "decisions.jsonl"
    err = data_error([path])
    assert str(err) == f"{path}: no such file or directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(rec(1)).encode()
        + b"\n"
        + '{"prompt": "caf\u00e9", "output": "o"}\n'.encode("latin-1")
    )
    err = data_error([path])
    assert str(err) == f"{path}:2: not UTF-8 text"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42\n", "expected a JSON object, got int"),
        ('"a string"\n', "expected a JSON object, got str"),
        ("null\n", "expected a JSON object, got NoneType"),
        ('{\n  "records": [{"prompt": "p", "output": "o"}]\n}\n', "invalid JSON ("),
        ('{"records": [{"prompt": "p", "output": "o"}]}\n', "field 'prompt': missing"),
        ("[1, 2]\n", "expected a JSON object, got int"),
        ('[{"prompt": "p", "output": "o"}, ["x"]]\n', "expected a JSON object, got list"),
    ],
)
def test_top_level_value_that_is_not_a_record_list(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "top.json"
    path.write_text(text)
    err = data_error([path])
    assert str(err).startswith(f"{path}:1: {expected}")


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("deep.jsonl", '{"prompt": ' + "[" * 100_000 + "\n", "nested more than 100 levels deep"),
        ("deep.json", "[" + "[" * 100_000 + "\n", "nested more than 100 levels deep"),
        (
            "long.jsonl",
            '{"prompt": "p", "output": "o", "n": ' + "1" * 5000 + "}\n",
            "Exceeds the limit",
        ),
        (
            "long.json",
            '[\n{"prompt": "p", "output": "o", "n": ' + "1" * 5000 + "}]\n",
            "Exceeds the limit",
        ),
    ],
)
def test_undecodable_json_is_a_data_error(
    tmp_path: Path, name: str, text: str, problem: str
) -> None:
    # Not a RecursionError / ValueError traceback.
    path = tmp_path / name
    path.write_text(text)
    line = 2 if name == "long.json" else 1
    assert str(data_error([path])).startswith(f"{path}:{line}: invalid JSON ({problem}")


def test_json_list_line_numbers_stay_right_on_a_large_file(tmp_path: Path) -> None:
    import time

    path = tmp_path / "decisions_big.json"
    n = 20_000
    path.write_text(json.dumps([rec(i, output="x" * 50) for i in range(n)], indent=2))
    start = time.perf_counter()
    ds = read_dataset([str(path)])
    elapsed = time.perf_counter() - start
    # Each element spans 5 lines ("  {", 3 keys, "  },") and the first starts on line 2.
    assert [d.source for d in ds.decisions[::4999]] == [
        f"{path}:{2 + 5 * i}" for i in range(0, n, 4999)
    ]
    assert elapsed < 5  # was quadratic: every element recounted newlines from the top


# --- filters and statistics -------------------------------------------------------------


def handmade() -> list[Decision]:
    def d(i: int, **kw: object) -> Decision:
        return Decision(decision_id=f"d{i}", prompt="p", output="o" * (i + 1), **kw)  # type: ignore[arg-type]

    return [
        d(0, agent_type="Buyer", rating=5.0, reward=1.0),
        d(1, agent_type="Buyer", rating=2.0, reward=3.0, feedback="fixed!"),
        d(2, agent_type="Seller", rating=None, reward=-1.0),
        d(3, agent_type="Seller", rating=4.0, reward=None),
        d(4, agent_type=None, rating=4.5, reward=2.0),
    ]


def test_select_min_rating_drops_unrated_and_low_rated() -> None:
    sel = select(handmade(), min_rating=4.0)
    assert [d.decision_id for d in sel.decisions] == ["d0", "d3", "d4"]
    assert sel.dropped == {"min_rating": 2, "min_reward": 0, "agent_types": 0, "max_samples": 0}


def test_select_min_reward_drops_missing_and_low_rewards() -> None:
    sel = select(handmade(), min_reward=1.0)
    assert [d.decision_id for d in sel.decisions] == ["d0", "d1", "d4"]
    assert sel.dropped == {"min_rating": 0, "min_reward": 2, "agent_types": 0, "max_samples": 0}


def test_select_agent_types_and_max_samples_and_combined() -> None:
    sel = select(handmade(), agent_types=["Seller"])
    assert [d.decision_id for d in sel.decisions] == ["d2", "d3"]
    assert sel.dropped["agent_types"] == 3

    sel = select(handmade(), max_samples=2)
    assert [d.decision_id for d in sel.decisions] == ["d0", "d1"]
    assert sel.dropped == {"min_rating": 0, "min_reward": 0, "agent_types": 0, "max_samples": 3}

    sel = select(
        handmade(), agent_types=["Buyer", "Seller"], min_rating=3.0, min_reward=0.0, max_samples=1
    )
    # d4 (no type) -> agent_types; d1, d2 -> min_rating; d3 -> min_reward; d0 kept.
    assert [d.decision_id for d in sel.decisions] == ["d0"]
    assert sel.dropped == {"min_rating": 2, "min_reward": 1, "agent_types": 1, "max_samples": 0}

    unfiltered = select(handmade())
    assert len(unfiltered.decisions) == 5 and not any(unfiltered.dropped.values())


def test_describe_stats() -> None:
    decisions = handmade()
    ds = Dataset(decisions=decisions, files=[], orphan_events=2, duplicate_ids=1)
    stats = describe(ds, select(decisions, max_samples=4))
    assert stats["num_records"] == 5
    assert stats["num_used"] == 4
    assert stats["dropped"]["max_samples"] == 1
    assert stats["orphan_events"] == 2 and stats["duplicate_ids"] == 1
    assert stats["with_reward"] == 3  # d0, d1, d2
    assert stats["with_rating"] == 3  # d0, d1, d3
    assert stats["with_feedback_target"] == 1
    assert stats["mean_reward"] == 1.0  # (1 + 3 - 1) / 3
    assert stats["mean_rating"] == round(11 / 3, 4)
    # targets: "o", "fixed!", "ooo", "oooo" -> 1, 6, 3, 4 chars
    assert stats["mean_target_chars"] == 3.5
    assert stats["agent_types"] == ["Buyer", "Seller"]

    empty = describe(ds, select(decisions, min_rating=99))
    assert empty["num_used"] == 0
    assert empty["mean_reward"] is None and empty["mean_rating"] is None
    assert empty["mean_target_chars"] is None and empty["agent_types"] == []


def test_describe_files_from_a_read(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "decisions_s.jsonl",
        [
            rec(1, reward=1, rating=3),
            rec(2, reward=2),
            {"event": "rating", "decision_id": "d2", "value": 5},
        ],
    )
    ds = read_dataset([str(path)])
    stats = describe(ds, select(ds.decisions))
    assert stats["files"] == [
        {
            "path": str(path),
            "sha256": ds.files[0].sha256,
            "format": "jsonl",
            "records": 2,
            "events": 1,
        }
    ]
    assert stats["mean_reward"] == 1.5 and stats["mean_rating"] == 4.0
    json.dumps(stats)  # must be serialisable for simtune.json / MLflow
    assert not math.isnan(stats["mean_target_chars"])


# --- reading never writes ---------------------------------------------------------------


def test_reading_never_writes(onesim: Path, tmp_path: Path) -> None:
    log = write_jsonl(
        onesim / "decisions_live.jsonl",
        [
            rec(1),
            {"event": "reward", "decision_id": "d1", "value": 1.0},
            {"event": "reward", "decision_id": "gone", "value": 1.0},
            rec(1),
        ],
    )
    (onesim / "decisions_export.json").write_bytes((onesim / "processed_data.json").read_bytes())
    files = sorted(p for p in onesim.rglob("*"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_size) for p in files}
    dir_mtime = onesim.stat().st_mtime_ns

    ds = read_dataset(
        [
            str(onesim),
            str(onesim / "processed_data.json"),
            str(onesim / "original_data.json"),
            str(log),
        ]
    )
    assert len(ds.decisions) == 1 + 3 + 8  # the export copy repeats processed_data's ids
    assert ds.duplicate_ids == 1 + 3 and ds.orphan_events == 1
    select(ds.decisions, min_reward=0.5)
    describe(ds, select(ds.decisions))

    assert sorted(p for p in onesim.rglob("*")) == files
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_size) for p in files} == before
    assert onesim.stat().st_mtime_ns == dir_mtime
