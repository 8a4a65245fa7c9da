"""The edit budget's statistics (evaluation/compare/budget.py): paired tests against the unedited
model's items and tasks at chance left out, checked on hand-computed cases."""

from __future__ import annotations

import json

import pytest

from factedit.evaluation.compare import edit_budget
from factedit.evaluation.compare.budget import at_chance, mcnemar_worse, paired_p_value, sign_flip_worse
from factedit.evaluation.compare.sequential import budget_table
from factedit.evaluation.compare.runs import Run


def test_mcnemar_by_hand():
    before = [1.0] * 6 + [0.0] * 4
    assert mcnemar_worse(before, [0.0] * 5 + [1.0] + [0.0] * 4) == 1 / 32  # 5 lost, none gained
    assert mcnemar_worse(before, [0.0] * 5 + [1.0] + [1.0] + [0.0] * 3) == 7 / 64  # 5 lost, 1 gained: (C(6,5) + C(6,6)) / 2^6
    assert mcnemar_worse(before, before) == 1.0
    assert mcnemar_worse([0.0] * 3, [1.0] * 3) == 1.0  # only gains: P(X >= 0)
    # over-refusal (lower is better): three safe prompts newly refused is the same test turned round
    assert paired_p_value([0.0] * 5, [1.0] * 3 + [0.0] * 2, "lower") == 1 / 8
    with pytest.raises(ValueError, match="length"):
        paired_p_value([1.0], [1.0, 0.0], "higher")


def test_sign_flip_on_continuous_scores():
    before = [0.5] * 10
    assert sign_flip_worse(before, [0.4] * 10) < 0.01  # every item worse: only 1 flip pattern in 1024 is as bad
    assert sign_flip_worse(before, before) == 1.0
    mixed = [0.4, 0.6] * 5
    assert sign_flip_worse(before, mixed) > 0.3
    assert paired_p_value(before, [0.4] * 10, "higher") == sign_flip_worse(before, [0.4] * 10)


def test_at_chance_by_hand():
    assert at_chance([1.0, 0.0, 0.0, 0.0] * 10, 0.25)  # mean 0.25: at chance
    assert not at_chance([1.0] * 30 + [0.0] * 10, 0.25)  # 0.75 - 1.96 * 0.069 > 0.25
    assert at_chance([1.0], 0.25)  # one item tells nothing


def _checkpoint(edits, acc, items=None, chance=None, mmlu=None, mmlu_items=None):
    line = {"edits": edits, "general": {"arc": {"acc": acc}}}
    if mmlu is not None:
        line["general"]["mmlu"] = {"acc": mmlu}
    if items is not None:
        line["general_item_scores"] = {"arc": items, **({"mmlu": mmlu_items} if mmlu_items is not None else {})}
    if chance is not None:
        line["general_chance"] = chance
    return line


def test_a_drop_must_be_significant_where_items_are_kept():
    base = [1.0] * 6 + [0.0] * 4  # 0.6
    one_lost = [0.0] + [1.0] * 5 + [0.0] * 4  # 0.5: past the 10% bound (0.54), but p = 0.5
    six_lost = [0.0] * 10  # 0.0: p = 1/64
    checkpoints = [_checkpoint(0, 0.6, base), _checkpoint(10, 0.5, one_lost), _checkpoint(20, 0.0, six_lost)]
    budget = edit_budget(checkpoints, threshold=0.1)
    assert budget["budget"] == 20 and budget["last_safe"] == 10 and budget["limiting"] == ["arc"]
    assert budget["p_values"]["arc"] == {10: 0.5, 20: 1 / 64} and budget["tested"] == ["arc"]
    # the same run judged by the threshold alone (no items, or alpha=None) stops at 10
    assert edit_budget(checkpoints, threshold=0.1, alpha=None)["budget"] == 10
    plain = [{k: v for k, v in c.items() if k != "general_item_scores"} for c in checkpoints]
    assert edit_budget(plain, threshold=0.1)["budget"] == 10 and "p_values" not in edit_budget(plain, threshold=0.1)
    # the table shows the test, also once the budget went through JSON (string keys)
    table = budget_table([Run(label="ft", path=None, summary={}, checkpoints=checkpoints)], [json.loads(json.dumps(budget))])
    assert "p = 0.0156" in table


def test_a_task_at_chance_is_left_out():
    chance = {"arc": 0.25, "mmlu": 0.25}
    arc = [1.0] * 30 + [0.0] * 10
    mmlu = [1.0, 0.0, 0.0, 0.0] * 10  # 0.25 before, at chance
    checkpoints = [
        _checkpoint(0, 0.75, arc, chance, mmlu=0.25, mmlu_items=mmlu),
        _checkpoint(10, 0.75, arc, chance, mmlu=0.0, mmlu_items=[0.0] * 40),  # all ten right answers lost
    ]
    budget = edit_budget(checkpoints, threshold=0.1)
    assert budget["budget"] is None and budget["at_chance"] == ["mmlu"] and "mmlu" not in budget["headline"]
    assert edit_budget(checkpoints, threshold=0.1, alpha=None)["budget"] == 10  # without statistics it would set the budget
    with pytest.raises(ValueError, match="alpha"):
        edit_budget(checkpoints, alpha=1.5)


def test_a_task_s_headline_comes_from_its_row_in_the_task_table(monkeypatch):
    """The budget reads a known task's headline from the task table; other tasks follow the
    preference rule."""
    from factedit.evaluation.compare import budget

    metrics = {"acc": 0.5, "acc_norm": 0.6}
    assert budget.headline("mmlu", metrics) == ("acc", "higher")  # the table's row, although acc_norm is preferred
    assert budget.headline("some_hub_task", metrics) == ("acc_norm", "higher")
    monkeypatch.setitem(budget.TASK_HEADLINES, "mmlu", ("acc_norm", "higher"))
    assert budget.headline("mmlu", metrics) == ("acc_norm", "higher")
