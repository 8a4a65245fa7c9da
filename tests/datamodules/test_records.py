"""Raw JSON rows to EditRequests: each format, detection, every kind of bad record, datasets round trip."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from factedit.datamodules.records import (
    FORMATS,
    RecordError,
    dataset_to_requests,
    detect_format,
    load_requests,
    requests_to_dataset,
    validate_records,
)
from factedit.datamodules.rows import read_raw_records
from factedit.datamodules.sources import SourceError
from factedit.editors.base import QA, EditRequest

# --------------------------------------------------------------------------------------------
# Hand-written records, one per format
# --------------------------------------------------------------------------------------------


def rome_record(case_id: int = 345, subject: str = "Danielle Darrieux") -> dict[str, Any]:
    return {
        "case_id": case_id,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": subject,
        },
        "paraphrase_prompts": [f"Where {subject} is from, people speak the language of", f"{subject} speaks"],
        "neighborhood_prompts": ["The mother tongue of Michel Rocard is", "Michel Rocard is a native speaker of"],
        "attribute_prompts": ["The mother tongue of Toko Yasuda is"],
        "generation_prompts": [f"{subject}'s mother tongue is"],
    }


def easyedit_record(case_id: int = 7) -> dict[str, Any]:
    return {
        "case_id": case_id,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }


def mend_record() -> dict[str, Any]:
    return {
        "subject": "IAAF Combined Events Challenge",
        "src": "When was the inception of IAAF Combined Events Challenge?",
        "pred": "2011",
        "rephrase": "When was the IAAF Combined Events Challenge launched?",
        "alt": "2006",
        "answers": ["1998"],
        "loc": "nq question: what is the name of the last episode of spongebob",
        "loc_ans": "The String",
        "cond": "2011 >> 2006 || When was the inception of IAAF Combined Events Challenge?",
    }


def knowedit_record() -> dict[str, Any]:
    return {
        "subject": "Epaspidoceras",
        "target_new": "Noctuidae",
        "prompt": "Which family does Epaspidoceras belong to?",
        "ground_truth": ["Aspidoceratidae"],
        "rephrase_prompt": "What family are Epaspidoceras?",
        "locality": {
            "Relation_Specificity": [
                {"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": [["genus", "genera"], []]},
                {"prompt": "Epaspidoceras parent taxon", "ground_truth": [[]]},  # no answer: probe dropped
            ]
        },
        "portability": {
            "Reasoning": [{"prompt": "What is the common name for the family Epaspidoceras belongs to?", "ground_truth": "Owlet moths"}],
            "Logical_Generalization": [],
        },
    }


def write_json(path: Path, records: list[Any]) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------------------------
# Each format
# --------------------------------------------------------------------------------------------


def test_rome_counterfact(tmp_path):
    (request,) = load_requests(write_json(tmp_path / "cf.json", [rome_record()]))
    assert request == EditRequest(
        case_id="345",
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        rephrase_prompts=("Where Danielle Darrieux is from, people speak the language of", "Danielle Darrieux speaks"),
        locality=(
            QA("The mother tongue of Michel Rocard is", "French", kind="neighborhood"),
            QA("Michel Rocard is a native speaker of", "French", kind="neighborhood"),
        ),
        neighborhood_prompts=("The mother tongue of Michel Rocard is", "Michel Rocard is a native speaker of"),
        attribute_prompts=("The mother tongue of Toko Yasuda is",),
        generation_prompts=("Danielle Darrieux's mother tongue is",),
    )


def test_rome_counterfact_with_portability(tmp_path):
    record = rome_record()
    record["portability"] = {
        "Recalled Relation": "(English, spoken in, England)",
        "New Question": "In which country is Danielle Darrieux's mother tongue mostly spoken?",
        "New Answer": "England",
    }
    (request,) = load_requests(write_json(tmp_path / "cf.json", [record]))
    assert request.portability == (QA("In which country is Danielle Darrieux's mother tongue mostly spoken?", "England", kind="portability"),)


def test_easyedit_counterfact(tmp_path):
    (request,) = load_requests(write_json(tmp_path / "cf.json", [easyedit_record()]))
    assert request == EditRequest(
        case_id="7",
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        rephrase_prompts=("Where Danielle Darrieux is from, people speak the language of",),
        locality=(QA("Michel Rocard is a native speaker of", "French", kind="neighborhood"),),
        neighborhood_prompts=("Michel Rocard is a native speaker of",),
    )


def test_easyedit_neighbourhood_only_when_it_shares_the_true_answer(tmp_path):
    record = easyedit_record()
    record["locality_prompt"], record["locality_ground_truth"] = "The capital of Italy is", "Rome"
    (request,) = load_requests(write_json(tmp_path / "cf.json", [record]))
    assert request.locality == (QA("The capital of Italy is", "Rome", kind="neighborhood"),)
    assert request.neighborhood_prompts == ()


def test_mend_zsre(tmp_path):
    record = mend_record()
    record["portability"] = {"Recalled Relation": "(x, y, z)", "New Question": "What sport is it?", "New Answer": "Athletics"}
    second = mend_record() | {"answers": [], "case_id": "zs-1"}
    first, other = load_requests(write_json(tmp_path / "zsre.json", [record, second]))
    assert first == EditRequest(
        case_id="0",
        prompt="When was the inception of IAAF Combined Events Challenge?",
        subject="IAAF Combined Events Challenge",
        target_new="2006",
        target_true="1998",
        rephrase_prompts=("When was the IAAF Combined Events Challenge launched?",),
        locality=(QA("nq question: what is the name of the last episode of spongebob", "The String", kind="nq"),),
        portability=(QA("What sport is it?", "Athletics", kind="portability"),),
    )
    assert other.case_id == "zs-1" and other.target_true is None


def test_knowedit(tmp_path):
    recent = {
        "subject": "Ingrīda Amantova",
        "prompt": "The gender of Ingrīda Amantova is",
        "target_new": "female",
        "portability": {},
        "locality": {"Forgetfulness": [{"prompt": "The place of birth of Ingrīda Amantova is", "ground_truth": [["Cēsis"]]}]},
    }
    first, second = load_requests(write_json(tmp_path / "knowedit.json", [knowedit_record(), recent]))
    assert first == EditRequest(
        case_id="0",
        prompt="Which family does Epaspidoceras belong to?",
        subject="Epaspidoceras",
        target_new="Noctuidae",
        target_true="Aspidoceratidae",
        rephrase_prompts=("What family are Epaspidoceras?",),
        locality=(QA("The taxon rank of Epaspidoceras is", "genus", aliases=("genus", "genera"), kind="Relation_Specificity"),),
        portability=(
            QA(
                "What is the common name for the family Epaspidoceras belongs to?",
                "Owlet moths",
                aliases=("Owlet moths",),
                kind="Reasoning",
            ),
        ),
    )
    assert second.case_id == "1" and second.target_true is None and second.rephrase_prompts == ()
    assert second.locality == (QA("The place of birth of Ingrīda Amantova is", "Cēsis", aliases=("Cēsis",), kind="Forgetfulness"),)


def test_jsonl_is_read_line_by_line(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps(easyedit_record(1)) + "\n\n" + json.dumps(easyedit_record(2)) + "\n")
    assert [r.case_id for r in load_requests(path)] == ["1", "2"]


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, expected",
    [
        (rome_record(), "counterfact"),
        (easyedit_record(), "counterfact_easyedit"),
        (mend_record(), "zsre"),
        (knowedit_record(), "knowedit"),
        ({"prompt": "p s", "subject": "s", "target_new": "t", "ground_truth": "g", "locality": {}}, "knowedit"),
        ({"prompt": "p s", "subject": "s", "target_new": "t", "ground_truth": [["g"]]}, "knowedit"),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_explicit_format_overrides_detection(tmp_path):
    record = {"prompt": "Which family does Epaspidoceras belong to?", "subject": "Epaspidoceras", "target_new": "Noctuidae"}
    path = write_json(tmp_path / "bare.json", [record])
    with pytest.raises(RecordError, match="cannot tell the format"):
        load_requests(path)
    assert load_requests(path, format="knowedit")[0].target_new == "Noctuidae"


def test_unrecognised_records_name_the_file_keys_and_formats(tmp_path):
    path = write_json(tmp_path / "mystery.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(RecordError) as info:
        load_requests(path)
    message = str(info.value)
    assert "mystery.json" in message and "'answer'" in message and "'question'" in message
    assert all(name in message for name in FORMATS)


def test_wikibio_is_refused_clearly(tmp_path):
    path = write_json(tmp_path / "wikibio.json", [{"text": "A passage.", "labels": "More.", "concept": "x", "locality": {}}])
    with pytest.raises(RecordError, match="WikiBio.*not supported"):
        load_requests(path)


def test_unknown_format_name(tmp_path):
    with pytest.raises(ValueError, match="unknown record format 'rome'.*counterfact"):
        load_requests(write_json(tmp_path / "cf.json", [rome_record()]), format="rome")


def test_unknown_source_lists_the_names(tmp_path):
    with pytest.raises(SourceError, match="neither an existing file nor a known data set.*counterfact-demo"):
        load_requests(str(tmp_path / "missing.json"))


# --------------------------------------------------------------------------------------------
# Bad records
# --------------------------------------------------------------------------------------------


def _set(record: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    record = copy.deepcopy(record)
    *parents, last = dotted.split(".")
    node = record
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return record


_DELETE = object()

BAD_RECORDS = [
    # (id, good record factory, dotted key to change, new value, field named in the error, words in the reason)
    ("missing-subject", rome_record, "requested_rewrite.subject", _DELETE, "requested_rewrite.subject", "missing"),
    ("missing-rewrite", rome_record, "requested_rewrite", _DELETE, "requested_rewrite", "missing"),
    ("no-placeholder", rome_record, "requested_rewrite.prompt", "The mother tongue is", "requested_rewrite.prompt", "'{}'"),
    ("empty-target", rome_record, "requested_rewrite.target_new.str", " ", "requested_rewrite.target_new.str", "empty"),
    ("empty-true", rome_record, "requested_rewrite.target_true.str", "", "requested_rewrite.target_true.str", "empty"),
    ("number-target", rome_record, "requested_rewrite.target_new.str", 42, "requested_rewrite.target_new.str", "expected a string, got number"),
    ("list-item", rome_record, "paraphrase_prompts", ["ok", 3], "paraphrase_prompts[1]", "expected a string"),
    ("bool-case-id", rome_record, "case_id", True, "case_id", "string or an integer"),
    ("easyedit-type", easyedit_record, "target_new", 42, "target_new", "expected a string, got number"),
    ("easyedit-subject", easyedit_record, "subject", "Michel Rocard", "subject", "does not occur in prompt"),
    ("easyedit-half-locality", easyedit_record, "locality_ground_truth", _DELETE, "locality_ground_truth", "missing"),
    ("zsre-subject", mend_record, "subject", "IAAF World Cup", "subject", "'IAAF World Cup' does not occur in prompt"),
    ("zsre-empty-alt", mend_record, "alt", "", "alt", "empty"),
    ("zsre-missing-src", mend_record, "src", _DELETE, "src", "missing"),
    ("zsre-answers-type", mend_record, "answers", "1998", "answers", "expected a list of strings"),
    ("zsre-portability", mend_record, "portability", {"New Question": "q"}, "portability.New Answer", "missing"),
    ("zsre-empty-loc-answer", mend_record, "loc_ans", "", "loc_ans", "empty answer"),
    ("knowedit-target", knowedit_record, "target_new", None, "target_new", "expected a string, got null"),
    ("knowedit-alias-type", knowedit_record, "ground_truth", [["a", 1]], "ground_truth[0][1]", "expected a string"),
    ("knowedit-groups", knowedit_record, "locality", [], "locality", "expected an object, got list"),
    ("knowedit-probe-list", knowedit_record, "portability.Reasoning", {"prompt": "p"}, "portability.Reasoning", "expected a list"),
]


@pytest.mark.parametrize("factory, key, value, field, reason", [b[1:] for b in BAD_RECORDS], ids=[b[0] for b in BAD_RECORDS])
def test_bad_record_names_file_record_and_field(tmp_path, factory, key, value, field, reason):
    good, bad = factory(), _set(factory(), key, value)
    if "case_id" in good and key != "case_id":
        bad["case_id"] = good["case_id"] + 1
    path = write_json(tmp_path / "records.json", [good, bad])
    with pytest.raises(RecordError) as info:
        load_requests(path, format=detect_format(good))
    err = info.value
    message = str(err)
    assert err.path == path and err.index == 1 and err.field == field
    assert "records.json" in message and "record 1" in message and f"field {field!r}" in message and reason in message
    if "case_id" in good and key != "case_id":
        assert f"(case_id {good['case_id'] + 1})" in message


def test_message_shape(tmp_path):
    records = [easyedit_record(i) for i in range(13)]
    records[12] = easyedit_record(345) | {"subject": "X"}
    path = write_json(tmp_path / "file.json", records)
    with pytest.raises(RecordError) as info:
        load_requests(path)
    assert str(info.value).startswith(
        f"{path}: record 12 (case_id 345): field 'subject': 'X' does not occur in prompt 'The mother tongue of Danielle Darrieux is'"
    )


def test_record_that_is_not_an_object(tmp_path):
    path = write_json(tmp_path / "records.json", [easyedit_record(), "oops"])
    with pytest.raises(RecordError, match=r"records.json: record 1: expected a JSON object, got string"):
        load_requests(path)


def test_duplicate_case_ids(tmp_path):
    path = write_json(tmp_path / "records.json", [easyedit_record(3), easyedit_record(3)])
    with pytest.raises(RecordError, match=r"record 1 \(case_id 3\): field 'case_id': duplicate case_id \(first used by record 0\)"):
        load_requests(path)


def test_broken_json_array_gives_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    text = json.dumps([easyedit_record(1), easyedit_record(2)], indent=1)
    lines = text.splitlines()
    lines[5] = lines[5].rstrip(",")  # drop a comma between two fields of the first record
    path.write_text("\n".join(lines))
    with pytest.raises(RecordError) as info:
        load_requests(path)
    assert info.value.line == 7 and info.value.column is not None
    assert str(info.value).startswith(f"{path}: line 7 column ") and "invalid JSON" in str(info.value)


def test_broken_jsonl_line_gives_line_and_record(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(easyedit_record(1)) + "\n\n" + json.dumps(easyedit_record(2))[:-1] + "\n")
    with pytest.raises(RecordError) as info:
        load_requests(path)
    err = info.value
    assert err.line == 3 and err.index == 1
    assert "broken.jsonl" in str(err) and "record 1 (line 3)" in str(err) and "invalid JSON" in str(err)


def test_jsonl_record_errors_name_the_line(tmp_path):
    bad = _set(easyedit_record(2), "target_new", "")
    path = write_jsonl(tmp_path / "records.jsonl", [easyedit_record(1), bad])
    with pytest.raises(RecordError, match=r"records.jsonl: record 1 \(line 2\) \(case_id 2\): field 'target_new': is empty"):
        load_requests(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    assert load_requests(path) == []
    (tmp_path / "blank.jsonl").write_text("\n")
    assert read_raw_records(tmp_path / "blank.jsonl") == []


# --------------------------------------------------------------------------------------------
# skip_invalid and limit
# --------------------------------------------------------------------------------------------


def _mixed_file(tmp_path: Path) -> Path:
    records = [easyedit_record(i) for i in range(6)]
    records[1]["target_new"] = ""
    records[4]["subject"] = "Nobody"
    return write_json(tmp_path / "mixed.json", records)


def test_default_raises_on_the_first_bad_record_and_counts_the_others(tmp_path):
    with pytest.raises(RecordError) as info:
        load_requests(_mixed_file(tmp_path))
    assert info.value.index == 1 and "2 invalid records in all" in str(info.value) and "skip_invalid=True" in str(info.value)


def test_skip_invalid_keeps_the_good_ones_and_warns(tmp_path, caplog):
    path = _mixed_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="factedit.datamodules.records"):
        requests = load_requests(path, skip_invalid=True)
    assert [r.case_id for r in requests] == ["0", "2", "3", "5"]
    skipped = [r for r in caplog.records if "skipping invalid record" in r.getMessage()]
    assert len(skipped) == 2 and "record 4" in skipped[1].getMessage()


def test_validate_records_returns_the_errors(tmp_path):
    requests, errors = validate_records(_mixed_file(tmp_path))
    assert len(requests) == 4
    assert [(e.index, e.field) for e in errors] == [(1, "target_new"), (4, "subject")]


def test_limit_takes_the_first_valid_records(tmp_path):
    path = _mixed_file(tmp_path)
    assert [r.case_id for r in load_requests(path, limit=3, skip_invalid=True)] == ["0", "2", "3"]
    assert [r.case_id for r in load_requests(path, limit=1)] == ["0"]  # stops before the bad record
    assert load_requests(path, limit=0) == []


# --------------------------------------------------------------------------------------------
# datasets round trip
# --------------------------------------------------------------------------------------------


def test_dataset_round_trip(tmp_path, request_factory):
    requests = [
        request_factory("a"),
        request_factory("b", target_true=None, rephrase_prompts=(), portability=(), neighborhood_prompts=()),
        *load_requests(write_json(tmp_path / "k.json", [knowedit_record()])),
        *load_requests(write_json(tmp_path / "cf.json", [rome_record()])),
    ]
    dataset = requests_to_dataset(requests)
    assert len(dataset) == 4 and dataset[1]["target_true"] is None
    assert dataset_to_requests(dataset) == requests
    assert dataset_to_requests(requests_to_dataset([])) == []


# --------------------------------------------------------------------------------------------
# Real files (../shared/data)
# --------------------------------------------------------------------------------------------

REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"the real data folder {REAL_DATA} is absent")


@pytest.mark.slow
@needs_real_data
@pytest.mark.parametrize(
    "relative, fmt, count",
    [
        ("counterfact/counterfact_test.json", "counterfact", 1891),
        ("counterfact/counterfact_portability_gpt4.json", "counterfact", 1031),
        ("counterfact/easyedit/counterfact-edit.json", "counterfact_easyedit", 9864),
        ("zsre/zsre_mend_eval_portability_gpt4.json", "zsre", 837),
        ("knowedit/wiki_counterfact_train_cf.json", "knowedit", 1428),
        ("knowedit/wiki_recent_recent_train.json", "knowedit", 570),
    ],
)
def test_real_files_parse_completely(relative, fmt, count):
    path = REAL_DATA / relative
    assert detect_format(json.loads(path.read_text())[0]) == fmt
    requests = load_requests(path)
    assert len(requests) == count
    assert all(r.subject in r.prompt and r.target_new.strip() for r in requests)


@pytest.mark.slow
@needs_real_data
def test_real_counterfact_is_fast_and_complete():
    start = time.perf_counter()
    requests = load_requests(REAL_DATA / "counterfact/counterfact_test.json")
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"loading 1,891 CounterFact records took {elapsed:.1f} s"
    first = requests[0]
    assert (first.case_id, first.prompt, first.target_new, first.target_true) == ("20952", "Angola is located in", "Antarctica", "Africa")
    assert len(first.neighborhood_prompts) == 10 and all(qa.answer == "Africa" for qa in first.locality)
    portable = load_requests(REAL_DATA / "counterfact/counterfact_portability_gpt4.json")
    assert all(len(r.portability) == 1 for r in portable)


@pytest.mark.slow
@needs_real_data
def test_real_easyedit_neighbours_share_the_true_answer():
    requests = load_requests(REAL_DATA / "counterfact/easyedit/counterfact-edit.json")
    assert all(r.neighborhood_prompts == (r.locality[0].prompt,) for r in requests)


@pytest.mark.slow
@needs_real_data
def test_real_knowedit_zsre_has_three_subjects_missing_from_the_prompt():
    path = REAL_DATA / "knowedit/ZsRE-test-all.json"
    with pytest.raises(RecordError) as info:
        load_requests(path)
    assert info.value.index == 343 and info.value.field == "subject" and "Rio Grande 463" in str(info.value)
    requests, errors = validate_records(path)
    assert [e.index for e in errors] == [343, 524, 586]
    assert len(load_requests(path, skip_invalid=True)) == 1140 == len(requests)


@pytest.mark.slow
@needs_real_data
def test_real_mend_train_has_two_empty_new_targets():
    path = REAL_DATA / "zsre/zsre_mend_train-1k.json"
    requests, errors = validate_records(path)
    assert [(e.index, e.field) for e in errors] == [(534, "alt"), (723, "alt")]
    assert len(requests) == 998
    assert requests[0].locality[0].prompt.startswith("nq question: ")


@pytest.mark.slow
@needs_real_data
def test_real_wikibio_is_refused():
    with pytest.raises(RecordError, match="WikiBio"):
        load_requests(REAL_DATA / "knowedit/wikibio-test-all.json")


def test_a_format_registered_in_one_module_is_read_and_detected(tmp_path, monkeypatch):
    """A new format is one ``register_format`` call: loading, detection and the error messages
    (under the file's own field names) then know it; a taken name is refused."""
    from factedit.datamodules.formats import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    def parse(row):
        return dict(case_id=str(row.raw.index), prompt=row.string("question"), subject=row.string("about"), target_new=row.string("new"))

    spec = base.Format("toy_qa", parse, {"prompt": "question", "target_new": "new"}, lambda record: "question" in record, 60, "toy_qa (question, about, new)")
    base.register_format(spec)
    with pytest.raises(ValueError, match="already registered"):
        base.register_format(spec)
    path = write_json(tmp_path / "toy.json", [{"question": "Paris is in", "about": "Paris", "new": "Italy"}, {"question": "Rome is in", "about": "Rome", "new": ""}])
    assert detect_format({"question": "q"}) == "toy_qa"
    requests, errors = validate_records(path)
    assert [(r.prompt, r.subject, r.target_new) for r in requests] == [("Paris is in", "Paris", "Italy")]
    assert len(errors) == 1 and errors[0].index == 1 and errors[0].field == "new"


def test_every_module_of_the_formats_package_is_a_registered_format():
    """Adding a format is adding a file: the package imports each of its modules."""
    import pkgutil

    from factedit.datamodules import formats

    modules = {info.name for info in pkgutil.iter_modules(formats.__path__)} - {"base"}
    assert modules == set(FORMATS) == set(formats.registered_formats())
