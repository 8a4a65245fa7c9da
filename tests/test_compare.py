"""Comparing sequential runs: the edit budget, loading, tables, the plot and TensorBoard scalars."""

from __future__ import annotations

import json
import math

import pytest

from evaluation.compare import compare, edit_budget, headline, load_run, load_runs, main, markdown_table, plot_runs, write_tensorboard

RETENTION = {"reliability": 0.9, "generalization": 0.6, "locality": 0.95, "es": 1.0, "ps": 0.9, "ns": 0.7, "score": 0.85}


def _checkpoint(edits, hellaswag=None, arc=None, ppl=None, retention=None):
    general = {}
    if hellaswag is not None:
        general["hellaswag"] = {"acc": hellaswag - 0.05, "acc_norm": hellaswag}
    if arc is not None:
        general["arc_easy"] = {"acc": arc + 0.05, "acc_norm": arc}
    if ppl is not None:
        general["wikitext"] = {"word_perplexity": ppl, "bits_per_byte": math.log2(ppl) / 6}
    return {
        "edits": edits,
        "wall_seconds": 10.0 + edits,
        "edit_seconds": 0.5 * edits,
        "retention": {} if edits == 0 else dict(retention or RETENTION),
        "general": general,
    }


# hellaswag acc_norm: base 0.36, bound 0.324, first below it at 50 edits.
# wikitext word_perplexity: base 35.2, bound 38.72, first above it at 100 edits.
# arc_easy acc_norm: base 0.45, bound 0.405, never below it.
CROSSING = [
    _checkpoint(0, 0.36, 0.45, 35.2),
    _checkpoint(1, 0.36, 0.45, 35.3),
    _checkpoint(10, 0.35, 0.44, 36.0),
    _checkpoint(50, 0.30, 0.43, 38.0),
    _checkpoint(100, 0.28, 0.42, 40.0),
    _checkpoint(200, 0.25, 0.41, 45.0),
]
STEADY = [_checkpoint(edits, 0.36 - 0.0001 * edits, 0.45, 35.2 + 0.01 * edits) for edits in (0, 1, 10, 100, 200)]


def _write_run(folder, checkpoints, editor="ft_m", summary=True):
    folder.mkdir(parents=True)
    if summary:
        (folder / "summary.json").write_text(json.dumps({"editor": editor, "mode": "sequential", "metrics": {}}))
    (folder / "checkpoints.jsonl").write_text("".join(json.dumps(c) + "\n" for c in checkpoints))
    return folder


# -- headline ------------------------------------------------------------------------------------------
def test_headline_default_rule_and_direction():
    assert headline("hellaswag", {"acc": 0.3, "acc_norm": 0.4}) == ("acc_norm", "higher")
    assert headline("arc", {"acc_stderr": 0.01, "acc": 0.5}) == ("acc", "higher")
    assert headline("truthfulqa", {"mc1": 0.2, "mc2": 0.3}) == ("mc2", "higher")
    assert headline("wikitext", {"bits_per_byte": 0.9, "word_perplexity": 35.0}) == ("word_perplexity", "lower")
    assert headline("lambada", {"perplexity": 20.0, "bits_per_byte": 0.9}) == ("perplexity", "lower")
    assert headline("c4", {"bits_per_byte": 0.9}) == ("bits_per_byte", "lower")
    assert headline("custom", {"f1": 0.7, "recall": 0.6}) == ("f1", "higher")
    assert headline("custom", {"token_perplexity": 9.0}) == ("token_perplexity", "lower")


def test_headline_overrides():
    assert headline("hellaswag", {"acc": 0.3, "acc_norm": 0.4}, {"hellaswag": "acc"}) == ("acc", "higher")
    assert headline("x", {"loss": 2.0}, {"x": ("loss", "lower")}) == ("loss", "lower")
    with pytest.raises(ValueError, match="does not report"):
        headline("hellaswag", {"acc": 0.3}, {"hellaswag": "f1"})
    with pytest.raises(ValueError, match="direction"):
        headline("x", {"loss": 2.0}, {"x": ("loss", "down")})


# -- edit budget ---------------------------------------------------------------------------------------
def test_budget_hand_computed():
    budget = edit_budget(CROSSING, threshold=0.1)
    assert budget["budget"] == 50
    assert budget["last_safe"] == 10
    assert budget["limiting"] == ["hellaswag"]
    assert budget["per_task"] == {"hellaswag": 50, "arc_easy": None, "wikitext": 100}
    assert budget["max_edits"] == 200
    assert budget["threshold"] == 0.1
    assert budget["base"] == {"hellaswag": 0.36, "arc_easy": 0.45, "wikitext": 35.2}
    assert budget["at_budget"] == {"hellaswag": 0.30, "arc_easy": 0.43, "wikitext": 38.0}
    assert budget["headline"]["wikitext"] == ["word_perplexity", "lower"]


def test_budget_order_of_lines_does_not_matter():
    assert edit_budget(list(reversed(CROSSING)))["budget"] == 50


def test_budget_never_reached():
    budget = edit_budget(STEADY)
    assert budget["budget"] is None
    assert budget["last_safe"] == 200
    assert budget["limiting"] == []
    assert budget["at_budget"] == {}
    assert set(budget["per_task"].values()) == {None}


def test_budget_first_checkpoint_already_crossing():
    checkpoints = [_checkpoint(0, 0.36), _checkpoint(5, 0.10), _checkpoint(10, 0.05)]
    budget = edit_budget(checkpoints)
    assert (budget["budget"], budget["last_safe"], budget["limiting"]) == (5, 0, ["hellaswag"])


def test_threshold_boundary_is_safe():
    # exactly 10% worse is within tolerance; 0.9 * 0.3 and 1.1 * 32.41 are not exact in binary,
    # 32.41 * 1.1 even rounds below 35.651, so this also checks the comparison's slack
    at_bound = [_checkpoint(0, 0.3, ppl=32.41), _checkpoint(10, 0.27, ppl=35.651)]
    assert edit_budget(at_bound, threshold=0.1)["budget"] is None
    past_higher = [_checkpoint(0, 0.3, ppl=32.41), _checkpoint(10, 0.2699, ppl=35.651)]
    assert edit_budget(past_higher, threshold=0.1)["limiting"] == ["hellaswag"]
    past_lower = [_checkpoint(0, 0.3, ppl=32.41), _checkpoint(10, 0.27, ppl=35.66)]
    assert edit_budget(past_lower, threshold=0.1)["limiting"] == ["wikitext"]


def test_lower_is_better_direction():
    falling = [_checkpoint(0, ppl=20.0), _checkpoint(10, ppl=15.0), _checkpoint(20, ppl=10.0)]
    assert edit_budget(falling)["budget"] is None  # a lower perplexity is an improvement
    rising = [_checkpoint(0, ppl=20.0), _checkpoint(10, ppl=21.0), _checkpoint(20, ppl=23.0)]
    budget = edit_budget(rising)
    assert (budget["budget"], budget["last_safe"], budget["limiting"]) == (20, 10, ["wikitext"])
    # higher-is-better scores rising is no degradation either
    assert edit_budget([_checkpoint(0, 0.3), _checkpoint(10, 0.9)])["budget"] is None


def test_non_finite_score_counts_as_crossed():
    budget = edit_budget([_checkpoint(0, ppl=20.0), _checkpoint(10, ppl=float("inf"))])
    assert budget["budget"] == 10


def test_budget_headline_override():
    # arc_easy acc_norm 0.45 -> 0.40 is past its bound 0.405; arc_easy acc 0.50 -> 0.45 is exactly at it
    checkpoints = [_checkpoint(0, 0.36, 0.45), _checkpoint(50, 0.34, 0.40)]
    assert edit_budget(checkpoints)["limiting"] == ["arc_easy"]
    assert edit_budget(checkpoints, headline_map={"arc_easy": "acc"})["budget"] is None


def test_missing_unedited_checkpoint_is_an_error():
    with pytest.raises(ValueError, match="edits == 0"):
        edit_budget(CROSSING[1:])
    with pytest.raises(ValueError, match="no general scores"):
        edit_budget([_checkpoint(0), _checkpoint(10, 0.3)])
    with pytest.raises(ValueError, match="threshold"):
        edit_budget(CROSSING, threshold=-0.1)


def test_missing_checkpoint_zero_in_compare_names_the_file(tmp_path):
    run = _write_run(tmp_path / "run", CROSSING[1:])
    with pytest.raises(ValueError, match="checkpoints.jsonl.*edits == 0"):
        compare([run], tmp_path / "out")


# -- loading -------------------------------------------------------------------------------------------
def test_load_run(tmp_path):
    run = load_run(_write_run(tmp_path / "a", CROSSING, editor="memit"))
    assert run.label == "memit"
    assert run.summary["mode"] == "sequential"
    assert [c["edits"] for c in run.checkpoints] == [0, 1, 10, 50, 100, 200]


def test_malformed_line_names_file_and_line(tmp_path):
    folder = _write_run(tmp_path / "run", CROSSING)
    lines = (folder / "checkpoints.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (folder / "checkpoints.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"checkpoints\.jsonl: line 3 is not valid JSON"):
        load_run(folder)
    (folder / "checkpoints.jsonl").write_text(json.dumps(CROSSING[0]) + "\n" + json.dumps({"general": {}}) + "\n")
    with pytest.raises(ValueError, match=r"checkpoints\.jsonl: line 2 has no non-negative integer 'edits'"):
        load_run(folder)


def test_missing_checkpoints_file_is_named(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoints.jsonl"):
        load_run(folder)


def test_same_editor_gets_distinct_labels(tmp_path):
    a = _write_run(tmp_path / "ft_m_lr3", CROSSING)
    b = _write_run(tmp_path / "ft_m_lr4", STEADY)
    c = _write_run(tmp_path / "rome_run", STEADY, editor="rome")
    d = _write_run(tmp_path / "no_summary", STEADY, summary=False)
    labels = [run.label for run in load_runs([a, b, c, d])]
    assert labels == ["ft_m (ft_m_lr3)", "ft_m (ft_m_lr4)", "rome", "no_summary"]
    same = [run.label for run in load_runs([a, a])]
    assert len(set(same)) == 2


# -- outputs -------------------------------------------------------------------------------------------
def test_markdown_tables(tmp_path):
    runs = load_runs([_write_run(tmp_path / "x", CROSSING, editor="ft_m"), _write_run(tmp_path / "y", STEADY, editor="memit")])
    budgets = {run.label: edit_budget(run.checkpoints) for run in runs}
    text = markdown_table(runs, budgets)
    assert "## ft_m" in text and "## memit" in text and "## Edit budget" in text
    assert "| edits | reliability | generalization | locality | es | ps | ns | score |" in text
    assert "wikitext word_perplexity (lower)" in text
    assert "| 50 | 0.900 |" in text  # three decimals
    assert "35.20" in text and "35.200" not in text  # perplexity with two
    assert "| ft_m | 50 | 10 | hellaswag acc_norm (0.360 → 0.300) | 10% | 200 |" in text
    assert "| memit | > 200 | 200 | - | 10% | 200 |" in text
    assert "standard error" in text


def test_plot_is_a_png(tmp_path):
    runs = load_runs([_write_run(tmp_path / "x", CROSSING, editor="ft_m"), _write_run(tmp_path / "y", STEADY, editor="memit")])
    out = plot_runs(runs, tmp_path / "plots" / "compare.png", threshold=0.1)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # 10 panels with lines, not an empty canvas


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = write_tensorboard(_write_run(tmp_path / "run", CROSSING), tmp_path / "tb")
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "retention/reliability" in tags and "general/wikitext/word_perplexity" in tags
    by_step = {s.step: s.value for s in events.Scalars("general/hellaswag/acc_norm")}
    assert sorted(by_step) == [0, 1, 10, 50, 100, 200]
    assert by_step[50] == pytest.approx(0.30)
    assert [s.step for s in events.Scalars("retention/reliability")] == [1, 10, 50, 100, 200]


def test_compare_and_main(tmp_path, capsys):
    a = _write_run(tmp_path / "ft_m_a", CROSSING)
    b = _write_run(tmp_path / "ft_m_b", STEADY)
    out = tmp_path / "out"
    assert main([str(a), str(b), "--out", str(out), "--threshold", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "## Edit budget" in printed and "> 200" in printed
    for name in ("compare.png", "compare.md", "budget.json"):
        assert (out / name).is_file()
    budgets = json.loads((out / "budget.json").read_text())
    assert budgets["ft_m (ft_m_a)"]["budget"] == 50
    assert budgets["ft_m (ft_m_b)"]["budget"] is None
    assert len(list((out / "tensorboard").iterdir())) == 2
    # a stricter threshold ends the steady run's budget too; a looser one ends neither
    assert compare([a, b], tmp_path / "strict", threshold=0.001)["ft_m (ft_m_b)"]["budget"] is not None
    assert compare([a, b], tmp_path / "loose", threshold=0.5)["ft_m (ft_m_a)"]["budget"] is None


def test_main_reports_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "nowhere" in capsys.readouterr().err
