"""The leaf's JSON Lines: line-numbered errors, the three rules for a torn last line, appends."""

import json
import logging

import pytest

from factedit.jsonl import JsonlAppender, JsonlError, parse_lines, read_jsonl, read_numbered, write_jsonl


def test_parse_lines_numbers_lines_and_skips_blank_ones():
    assert list(parse_lines('{"a": 1}\n\n  \n[2]\n')) == [(1, {"a": 1}), (4, [2])]


def test_a_bad_line_names_the_file_line_and_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n\n{"b": \n{"c": 3}\n')
    for torn_tail in ("error", "skip", "repair"):  # not the last line: damaged whatever the rule
        with pytest.raises(JsonlError, match=r"data\.jsonl: line 3 is not valid JSON") as info:
            read_jsonl(path, torn_tail=torn_tail)
        assert (info.value.line, info.value.index) == (3, 1)


def test_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "cases.jsonl"
    torn = '{"a": 1}\n{"b": 2}\n{"c": '
    path.write_text(torn)
    with pytest.raises(JsonlError, match="line 3"):
        read_jsonl(path)
    with caplog.at_level(logging.WARNING, logger="factedit.jsonl"):
        assert read_numbered(path, torn_tail="skip") == [(1, {"a": 1}), (2, {"b": 2})]
    assert path.read_text() == torn and "incomplete last line" in caplog.text  # another process's file: left alone
    assert read_jsonl(path, torn_tail="repair") == [{"a": 1}, {"b": 2}]
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'  # trimmed, so appends go on from a whole line
    with pytest.raises(ValueError, match="torn_tail"):
        read_jsonl(path, torn_tail="ignore")


def test_missing_file_reads_as_empty_and_writes_round_trip(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl") == []
    write_jsonl(tmp_path / "sub" / "out.jsonl", [{"text": "é"}, [1]], ensure_ascii=False)
    assert (tmp_path / "sub" / "out.jsonl").read_text(encoding="utf-8") == '{"text": "é"}\n[1]\n'
    with JsonlAppender(tmp_path / "sub" / "out.jsonl") as appender:
        appender.write({"n": 3})
    assert read_jsonl(tmp_path / "sub" / "out.jsonl") == [{"text": "é"}, [1], {"n": 3}]
    assert [json.loads(line) for line in (tmp_path / "sub" / "out.jsonl").read_text().splitlines()][-1] == {"n": 3}
