"""Portability per probe kind: key names, hand-computed per-case and run scores on KnowEdit-style
probes, the raw measurements on a tiny model, the report, and sharded runs that see other kinds."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import make_request
from factedit.datamodules.records import load_requests
from factedit.editors.base import QA
from factedit.evaluation.report import summary_table
from factedit.evaluation.scoring import EvalConfig, RunMetrics, case_scores, measure_case, portability_key, protocols_of, score_pairs
from factedit.metrics import protocol_of, token_accuracy


@pytest.mark.parametrize(
    "kind, key",
    [
        ("Reasoning", "portability_reasoning"),
        ("Subject_Aliasing", "portability_subject_aliasing"),
        ("Logical_Generalization", "portability_logical_generalization"),
        ("multi_hop", "portability_multi_hop"),
        ("MultiHop", "portability_multi_hop"),
        ("one-to-many  hop", "portability_one_to_many_hop"),
        ("portability", "portability_portability"),
        ("", "portability_portability"),
    ],
)
def test_kind_keys_are_lower_snake_case(kind, key):
    assert portability_key(kind) == key
    assert protocol_of(key) == protocol_of("pre_" + key) == "token"


def test_known_kinds_are_token_protocol():
    for key in ("portability_reasoning", "portability_subject_aliasing", "portability_logical_generalization", "portability_multi_hop"):
        assert protocol_of(key) == "token" and protocol_of("pre_" + key) == "token"


# --------------------------------------------------------------------------------------------
# Per-case scores by hand
# --------------------------------------------------------------------------------------------


def _item(pred, target, kind):
    return {"target": target, "pred": pred, "kind": kind}


def _raw(portability) -> dict:
    return {"reliability": [{"target": [1], "pred": [1]}], "generalization": [], "portability": portability, "locality": []}


def test_knowedit_case_scores_by_hand():
    raw = _raw(
        [
            _item([1, 2], [1, 3], "Reasoning"),  # 1/2
            _item([4], [4], "Reasoning"),  # 1
            _item([5, 6, 7], [5, 6, 7], "Subject_Aliasing"),  # 1
            _item([8, 9], [0, 0], "Logical_Generalization"),  # 0
        ]
    )
    scores = case_scores(raw)
    assert scores["portability"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)  # all probes, as before
    assert scores["portability_reasoning"] == pytest.approx((0.5 + 1) / 2)
    assert scores["portability_subject_aliasing"] == 1.0
    assert scores["portability_logical_generalization"] == 0.0


def test_unnamed_kinds_add_no_keys_but_mixed_ones_do():
    easyedit = case_scores(_raw([_item([1], [1], "portability")]))
    legacy = case_scores(_raw([{"target": [1], "pred": [2]}]))  # records written before kinds were kept
    assert easyedit["portability"] == 1.0 and legacy["portability"] == 0.0
    assert not any(key.startswith("portability_") for key in [*easyedit, *legacy])
    mixed = case_scores(_raw([_item([1], [1], "portability"), _item([1], [2], "Reasoning")]))
    assert (mixed["portability"], mixed["portability_portability"], mixed["portability_reasoning"]) == (0.5, 1.0, 0.0)


# --------------------------------------------------------------------------------------------
# Raw measurements on a tiny model
# --------------------------------------------------------------------------------------------

KNOWEDIT = {
    "subject": "Danielle Darrieux",
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "ground_truth": [["French", "French language"]],
    "rephrase_prompt": "Danielle Darrieux speaks the language",
    "locality": {"Relation_Specificity": [{"prompt": "The capital of Italy is", "ground_truth": [["Rome"]]}]},
    "portability": {
        "Reasoning": [
            {"prompt": "The language of the films of Danielle Darrieux is", "ground_truth": [["English", "English language"]]},
            {"prompt": "Danielle Darrieux writes her letters in", "ground_truth": "English"},
        ],
        "Subject_Aliasing": [{"prompt": "The mother tongue of Darrieux is", "ground_truth": [["English"]]}],
        "Logical_Generalization": [{"prompt": "Michel Rocard is a native speaker of", "ground_truth": [["French"]]}],
    },
}


def test_measure_case_keeps_kinds_and_scores_each(tiny_model, tokenizer, tmp_path):
    path = tmp_path / "knowedit.json"
    path.write_text(json.dumps([KNOWEDIT]))
    (request,) = load_requests(path)
    raw = measure_case(tiny_model, tokenizer, request, EvalConfig(fluency=False, generation_scoring=False))
    assert [item["kind"] for item in raw["portability"]] == ["Reasoning", "Reasoning", "Subject_Aliasing", "Logical_Generalization"]
    # teacher forcing scores the first alias, as the all-probe portability score does
    scored = score_pairs(tiny_model, tokenizer, [(q.prompt, q.answer) for q in request.portability])
    expected = lambda idx: token_accuracy([torch.tensor(scored[i]["pred"]) for i in idx], [torch.tensor(scored[i]["target"]) for i in idx])
    scores = case_scores(raw)
    assert scores["portability"] == pytest.approx(expected([0, 1, 2, 3]))
    assert scores["portability_reasoning"] == pytest.approx(expected([0, 1]))
    assert scores["portability_subject_aliasing"] == pytest.approx(expected([2]))
    assert scores["portability_logical_generalization"] == pytest.approx(expected([3]))


# --------------------------------------------------------------------------------------------
# Run summary and report
# --------------------------------------------------------------------------------------------


def _records():
    one_pre = _raw([_item([1, 0], [1, 2], "Reasoning"), _item([3], [3], "Subject_Aliasing")])
    one_post = _raw([_item([1, 2], [1, 2], "Reasoning"), _item([0], [3], "Subject_Aliasing")])
    two_pre = _raw([_item([0], [5], "Reasoning")])
    two_post = _raw([_item([5], [5], "Reasoning")])
    three = _raw([_item([7], [7], "multi_hop"), _item([1, 1], [1, 2], "single_hop")])
    return [
        {"case_id": "1", "pre": {"raw": one_pre}, "post": {"raw": one_post}},
        {"case_id": "2", "pre": {"raw": two_pre}, "post": {"raw": two_post}},
        {"case_id": "3", "pre": {"raw": three}, "post": {"raw": three}},
    ]


EXPECTED = {
    "portability_reasoning": (1 + 1) / 2,  # macro average over the two cases that have the kind
    "pre_portability_reasoning": (0.5 + 0) / 2,
    "portability_subject_aliasing": 0.0,
    "pre_portability_subject_aliasing": 1.0,
    "portability_multi_hop": 1.0,
    "portability_single_hop": 0.5,
    "portability": ((1 + 0) / 2 + 1 + (1 + 0.5) / 2) / 3,
}


def test_run_summary_by_hand():
    metrics = RunMetrics()
    for record in _records():
        metrics.update(record)
    out = metrics.summary()
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value), key
    assert all(protocol == "token" for key, protocol in protocols_of(out).items() if "portability" in key)

    table = summary_table({"metrics": out, "cases": 3, "mode": "single", "editor": "ft_m"}, "title")
    names = [line.split()[0] for line in table.splitlines()[3:]]
    start = names.index("portability")
    assert names[start : start + 5] == [
        "portability",
        "portability_multi_hop",
        "portability_reasoning",
        "portability_single_hop",
        "portability_subject_aliasing",
    ]
    row = next(line for line in table.splitlines() if line.startswith("portability_reasoning "))
    assert row.split()[1:4] == ["token", "0.250", "1.000"] and "reasoning probes: token accuracy" in row
    data = table.splitlines()[3:8]
    assert len({line.index(line.split()[1]) for line in data}) == 1  # the protocol column lines up


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = RunMetrics()
        # rank 0 sees four kinds, rank 1 only Reasoning: the processes must still synchronise
        # the same metrics in the same order
        for record in _records()[rank::world]:
            metrics.update(record)
        with open(os.path.join(out, f"summary-{rank}.json"), "w") as handle:
            json.dump(metrics.summary(), handle)
    finally:
        dist.destroy_process_group()


def test_sharded_summary_agrees_on_kinds(tmp_path):
    mp.spawn(_sharded_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = RunMetrics()
    for record in _records():
        single.update(record)
    expected = single.summary()
    for rank in range(2):
        got = json.loads((tmp_path / f"summary-{rank}.json").read_text())
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value), (rank, key)


def test_request_without_kinds_reports_only_portability(tiny_model, tokenizer):
    request = make_request(portability=(QA("The language Danielle Darrieux writes in is", "English"),))
    scores = case_scores(measure_case(tiny_model, tokenizer, request, EvalConfig(fluency=False, generation_scoring=False)))
    assert scores["portability"] is not None
    assert not any(key.startswith("portability_") for key in scores)
