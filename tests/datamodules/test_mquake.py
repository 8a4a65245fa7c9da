"""MQuAKE records: one case becomes a group of requests; multi-hop probes on the last; bad records
named by file, record and field; limits never split a group; the bundled demo and the download."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from factedit import datamodules
from factedit.datamodules.formats.mquake import MULTI_HOP_KIND, SINGLE_HOP_KIND
from factedit.datamodules.records import (
    RecordError,
    dataset_to_requests,
    detect_format,
    load_requests,
    parse_records,
    requests_to_dataset,
    validate_records,
)
from factedit.datamodules.rows import RawRecord
from factedit.datamodules.sources import SOURCES, SourceError, ensure_downloaded, resolve_source, source_path
from factedit.editors.base import QA, EditRequest


def hop(question: str, cloze: str, answer: str, aliases: list[str] | None = None) -> dict[str, Any]:
    return {"question": question, "cloze": cloze, "answer": answer, "answer_alias": aliases or []}


def mquake_record(case_id: int = 7) -> dict[str, Any]:
    """A two-edit chain: Obama's citizenship and that country's capital."""
    return {
        "case_id": case_id,
        "requested_rewrite": [
            {
                "prompt": "{} is a citizen of",
                "relation_id": "P27",
                "target_new": {"str": "Canada", "id": "Q16"},
                "target_true": {"str": "United States of America", "id": "Q30"},
                "subject": "Barack Obama",
                "question": "What is the country of citizenship of Barack Obama?",
            },
            {
                "prompt": "The capital of {} is",
                "relation_id": "P36",
                "target_new": {"str": "Toronto"},
                "target_true": {"str": "Ottawa"},
                "subject": "Canada",
            },
        ],
        "questions": [
            "What is the capital of the country of which Barack Obama is a citizen?",
            "Barack Obama is a citizen of a country; what is its capital?",
            "Which city is the capital of Barack Obama's country?",
        ],
        "answer": "Washington, D.C.",
        "answer_alias": ["Washington"],
        "new_answer": "Toronto",
        "new_answer_alias": ["City of Toronto", "Toronto"],
        "single_hops": [hop("Whose citizen is Obama?", "Barack Obama is a citizen of", "United States of America")],
        "new_single_hops": [
            hop("What is the country of citizenship of Barack Obama?", "Barack Obama is a citizen of", "Canada", ["CA"]),
            hop("What is the capital of Canada?", "", "Toronto"),  # no cloze: asked as the question
        ],
        "orig": {"triples": [["Q76", "P27", "Q30"]]},
    }


def single_record(case_id: int = 8) -> dict[str, Any]:
    record = mquake_record(case_id)
    record["requested_rewrite"] = record["requested_rewrite"][1:]
    record["questions"] = record["questions"][:1]
    record["new_single_hops"] = []
    return record


def write_json(path: Path, records: list[Any]) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def test_one_case_becomes_a_group_of_requests(tmp_path):
    first, second, alone = load_requests(write_json(tmp_path / "mquake.json", [mquake_record(), single_record()]))
    assert first == EditRequest(
        case_id="7/0",
        prompt="Barack Obama is a citizen of",
        subject="Barack Obama",
        target_new="Canada",
        target_true="United States of America",
        rephrase_prompts=("What is the country of citizenship of Barack Obama?",),
        group="7",
    )
    multi_hop = tuple(
        QA(q, "Toronto", aliases=("Toronto", "City of Toronto"), kind=MULTI_HOP_KIND) for q in mquake_record()["questions"]
    )
    assert second == EditRequest(
        case_id="7/1",
        prompt="The capital of Canada is",
        subject="Canada",
        target_new="Toronto",
        target_true="Ottawa",
        portability=multi_hop
        + (
            QA("Barack Obama is a citizen of", "Canada", aliases=("Canada", "CA"), kind=SINGLE_HOP_KIND),
            QA("What is the capital of Canada?", "Toronto", aliases=("Toronto",), kind=SINGLE_HOP_KIND),
        ),
        group="7",
    )
    assert (alone.case_id, alone.group, len(alone.portability)) == ("8/0", "8", 1)


def test_detection_and_parse_functions():
    assert detect_format(mquake_record()) == "mquake"
    assert detect_format(single_record()) == "mquake"
    cf_like = {k: v for k, v in mquake_record().items() if k in ("case_id", "requested_rewrite")}
    assert detect_format(cf_like) == "mquake"  # a list of rewrites is MQuAKE's
    raw = RawRecord(0, None, mquake_record())
    assert [r.case_id for r in parse_records(raw, "mquake")] == ["7/0", "7/1"]
    assert [r.case_id for r in parse_records(RawRecord(0, None, single_record()), "mquake")] == ["8/0"]


def test_group_is_validated_and_round_trips_through_datasets(tmp_path):
    with pytest.raises(ValueError, match="'group'"):
        EditRequest(case_id="x", prompt="a b", subject="a", target_new="c", group="  ")
    with pytest.raises(ValueError, match="'group'"):
        EditRequest(case_id="x", prompt="a b", subject="a", target_new="c", group=3)  # type: ignore[arg-type]
    requests = load_requests(write_json(tmp_path / "mquake.json", [mquake_record()]))
    requests.append(EditRequest(case_id="alone", prompt="a b", subject="a", target_new="c"))
    dataset = requests_to_dataset(requests)
    assert dataset["group"] == ["7", "7", None]
    assert dataset_to_requests(dataset) == requests


# --------------------------------------------------------------------------------------------
# Bad records
# --------------------------------------------------------------------------------------------


def _changed(path: str, value: Any) -> dict[str, Any]:
    record = copy.deepcopy(mquake_record(9))
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = record
    for key in keys[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return record


_DELETE = object()

BAD = [
    ("missing-questions", "questions", _DELETE, "questions", "missing"),
    ("empty-questions", "questions", [], "questions", "is empty"),
    ("question-type", "questions.1", 5, "questions[1]", "expected a string, got number"),
    ("blank-question", "questions.2", " ", "questions[2]", "is empty"),
    ("rewrite-object", "requested_rewrite", {"prompt": "{} is", "subject": "x"}, "requested_rewrite", "expected a list"),
    ("no-rewrites", "requested_rewrite", [], "requested_rewrite", "is empty"),
    ("null-rewrite", "requested_rewrite.1", None, "requested_rewrite[1]", "expected an object, got null"),
    ("second-subject", "requested_rewrite.1.subject", _DELETE, "requested_rewrite[1].subject", "missing"),
    ("no-placeholder", "requested_rewrite.0.prompt", "Obama is a citizen of", "requested_rewrite[0].prompt", "'{}'"),
    ("target-type", "requested_rewrite.1.target_new.str", 42, "requested_rewrite[1].target_new.str", "expected a string, got number"),
    ("empty-target", "requested_rewrite.1.target_new.str", "", "requested_rewrite[1].target_new.str", "empty"),
    ("empty-true", "requested_rewrite.0.target_true.str", " ", "requested_rewrite[0].target_true.str", "empty"),
    ("new-answer", "new_answer", "", "new_answer", "is empty"),
    ("alias-type", "new_answer_alias", [1], "new_answer_alias[0]", "expected a string"),
    ("hops-type", "new_single_hops", "Canada", "new_single_hops", "expected a list"),
    ("hop-type", "new_single_hops.0", "Canada", "new_single_hops[0]", "expected an object"),
    ("hop-answer", "new_single_hops.1.answer", _DELETE, "new_single_hops[1].answer", "missing"),
    ("bad-case-id", "case_id", [1], "case_id", "string or an integer"),
]


@pytest.mark.parametrize("path, value, field, reason", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_record_names_file_record_and_field(tmp_path, path, value, field, reason):
    file = write_json(tmp_path / "mquake.json", [mquake_record(1), _changed(path, value)])
    with pytest.raises(RecordError) as info:
        load_requests(file, format="mquake")
    err = info.value
    assert (err.path, err.index, err.field) == (file, 1, field)
    message = str(err)
    assert "mquake.json" in message and "record 1" in message and f"field {field!r}" in message and reason in message
    if field != "case_id":
        assert "(case_id 9)" in message


def test_a_bad_rewrite_rejects_its_whole_case(tmp_path, caplog):
    bad = _changed("requested_rewrite.1.prompt", "The capital of Canada is")  # no placeholder
    file = write_json(tmp_path / "mquake.json", [mquake_record(1), bad, single_record(3)])
    requests, errors = validate_records(file)
    assert [r.case_id for r in requests] == ["1/0", "1/1", "3/0"]  # nothing of case 9 is kept
    assert [(e.index, e.field) for e in errors] == [(1, "requested_rewrite[1].prompt")]
    with caplog.at_level(logging.WARNING, logger="factedit.datamodules.records"):
        assert [r.case_id for r in load_requests(file, skip_invalid=True)] == ["1/0", "1/1", "3/0"]
    assert "record 1" in caplog.text


def test_duplicate_cases(tmp_path):
    file = write_json(tmp_path / "mquake.json", [mquake_record(4), single_record(4)])
    with pytest.raises(RecordError, match=r"record 1 \(case_id 4\): field 'case_id': duplicate case_id \(first used by record 0\)"):
        load_requests(file)


def test_limit_counts_cases_and_never_splits_a_group(tmp_path):
    file = write_json(tmp_path / "mquake.json", [single_record(1), mquake_record(2), single_record(3)])
    assert [r.case_id for r in load_requests(file, limit=1)] == ["1/0"]
    assert [r.case_id for r in load_requests(file, limit=2)] == ["1/0", "2/0", "2/1"]
    assert load_requests(file, limit=0) == []


# --------------------------------------------------------------------------------------------
# Named sources: the bundled demo and the full download
# --------------------------------------------------------------------------------------------


def test_demo_set_loads_from_inside_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = SOURCES["mquake-demo"]
    assert entry.format == "mquake" and entry.bundled
    assert source_path(entry) == Path(datamodules.__file__).resolve().parent / "demo" / "mquake_demo.json"
    requests = load_requests("mquake-demo")
    groups: dict[str, list[EditRequest]] = {}
    for request in requests:
        groups.setdefault(request.group, []).append(request)
    assert 5 <= len(groups) <= 8 and len(requests) > len(groups)  # some cases edit two facts
    for group, members in groups.items():
        assert [r.case_id for r in members] == [f"{group}/{k}" for k in range(len(members))]
        *rest, last = members
        assert all(not r.portability for r in rest)
        kinds = [q.kind for q in last.portability]
        assert kinds.count(MULTI_HOP_KIND) == 3 and kinds.count(SINGLE_HOP_KIND) == 2
        assert all(r.subject in r.prompt and r.target_true and r.rephrase_prompts for r in members)
    assert requests[0].prompt == "The Eiffel Tower is located in the city of" and requests[0].target_new == "Rome"


def test_full_set_is_downloaded_from_the_mquake_repository(tmp_path, monkeypatch, caplog):
    entry = SOURCES["mquake"]
    assert entry.format == "mquake" and entry.filename == "MQuAKE-CF-3k.json"
    assert entry.url == "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets/MQuAKE-CF-3k.json"
    assert entry.sha256 is None and entry.git_blob  # no published SHA-256: verified by the blob id the repository lists
    # the download path, served from a local file (whose content is not the real file's: no blob id)
    origin = write_json(tmp_path / "origin.json", [mquake_record(1)])
    served = dataclasses.replace(entry, url=origin.as_uri(), git_blob=None)
    with caplog.at_level(logging.WARNING, logger="factedit.datamodules.sources"):
        path = ensure_downloaded(served, directory=tmp_path / "cache")
    assert path == tmp_path / "cache" / "MQuAKE-CF-3k.json" and "no checksum is recorded" in caplog.text
    # a cached copy is what the name reads, once it has the repository's blob id
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "root"))
    cached = tmp_path / "root" / "data" / entry.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    with pytest.raises(SourceError, match="not downloaded yet"):  # not the file the repository lists
        resolve_source("mquake", download=False)
    from types import MappingProxyType

    import factedit.datamodules.sources as sources

    monkeypatch.setattr(sources, "SOURCES", MappingProxyType({**sources.SOURCES, "mquake": dataclasses.replace(entry, git_blob=sources.git_blob_of(cached))}))
    assert resolve_source("mquake", download=False) == (cached, "mquake")
    assert [r.case_id for r in load_requests("mquake")] == ["1/0", "1/1"]
