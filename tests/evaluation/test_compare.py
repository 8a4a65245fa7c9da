"""Comparing runs: the scores table with its intervals (Markdown, CSV, LaTeX), the figures, and for
sequential runs the edit budget, loading, checkpoint tables and TensorBoard scalars."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
import struct

import pytest
import yaml

from factedit.evaluation.compare import (
    checkpoint_intervals,
    compare,
    edit_budget,
    estimate,
    headline,
    load_run,
    load_runs,
    main,
    markdown_table,
    plot_runs,
    run_scores,
    standard_error,
    write_tensorboard,
)
from factedit.evaluation.compare.scores import latex_escape

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
    assert "| ft_m | 50 | 10 | hellaswag acc_norm (0.360 → 0.300) | - | 10% | 200 |" in text
    assert "| memit | > 200 | 200 | - | - | 10% | 200 |" in text
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


# -- runs of any mode: the scores table, its intervals and the figures --------------------------------
def _case(case_id, post, pre=None, seconds=0.5, memory=1000.0, **extra):
    """A line of cases.jsonl as the runner writes it (raw measurements left empty)."""
    return {
        "case_id": str(case_id),
        "prompt": f"prompt {case_id}",
        "target_new": "new",
        "target_true": "true",
        "seconds": seconds,
        "peak_memory_mb": memory,
        **extra,
        "pre": {"scores": dict(pre or {key: 0.0 for key in post}), "raw": {}},
        "post": {"scores": dict(post), "raw": {}},
    }


def _write_cases_run(folder, cases, editor="ft_m", mode="single", edits_per_call=1, checkpoints=None):
    """A run folder as edit.py leaves it: config.yaml, cases.jsonl, summary.json (means over the
    scored cases) and, when given, checkpoints.jsonl."""
    folder.mkdir(parents=True)
    scored = [case for case in cases if "failed" not in case]
    keys = dict.fromkeys(key for case in scored for key in case["post"]["scores"])
    metrics = {}
    for key in keys:
        values = [case["post"]["scores"][key] for case in scored if case["post"]["scores"].get(key) is not None]
        if values:
            metrics[key] = sum(values) / len(values)
    summary = {
        "editor": editor,
        "mode": mode,
        "edits_per_call": edits_per_call,
        "cases": len(cases),
        "failed_cases": len(cases) - len(scored),
        "failed_case_ids": [case["case_id"] for case in cases if "failed" in case],
        "metrics": metrics,
    }
    config = {"editor": {"name": editor}, "model": "tiny", "data": "facts.json", "limit": None, "mode": mode, "edits_per_call": edits_per_call}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "cases.jsonl").write_text("".join(json.dumps(case) + "\n" for case in cases))
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    if checkpoints is not None:
        (folder / "checkpoints.jsonl").write_text("".join(json.dumps(c) + "\n" for c in checkpoints))
    return folder


FAILED = {"case_id": "9", "prompt": "p", "target_new": "n", "target_true": "t", "failed": {"stage": "edit", "error": "RuntimeError", "message": "boom"}}
# run A: four scored cases and one failed; portability only on two cases; NS missing (zsRE-like)
RUN_A = [
    _case(0, {"reliability": 1.0, "generalization": 1.0, "locality": 1.0, "portability": 0.5, "es": 1.0, "ns": None}, seconds=0.4),
    _case(1, {"reliability": 0.5, "generalization": 0.0, "locality": 1.0, "es": 1.0, "ns": None}, seconds=0.6),
    _case(2, {"reliability": 0.0, "generalization": 0.5, "locality": 0.5, "portability": 0.0, "es": 0.0, "ns": None}, seconds=0.5),
    _case(3, {"reliability": 1.0, "generalization": 1.0, "locality": 1.0, "es": 1.0, "ns": None}, seconds=0.5, memory=1200.0),
    FAILED,
]
# run B: probability scores complete, so S is reported too
RUN_B = [
    _case(0, {"reliability": 1.0, "generalization": 0.0, "locality": 0.0, "es": 1.0, "ps": 1.0, "ns": 1.0}),
    _case(1, {"reliability": 0.0, "generalization": 1.0, "locality": 1.0, "es": 1.0, "ps": 0.0, "ns": 1.0}),
    _case(2, {"reliability": 1.0, "generalization": 0.0, "locality": 1.0, "es": 0.0, "ps": 1.0, "ns": 1.0}),
]
# run C: every case the same, so a zero-width interval
RUN_C = [_case(i, {"reliability": 1.0, "generalization": 0.75, "locality": 0.25}) for i in range(5)]


def _half_width(values):
    return 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def _three_single_runs(tmp_path):
    return [
        _write_cases_run(tmp_path / "ft_m_run_a", RUN_A, editor="ft_m"),
        _write_cases_run(tmp_path / "rome_run_b", RUN_B, editor="rome"),
        _write_cases_run(tmp_path / "memit_run_c", RUN_C, editor="memit"),
    ]


def test_standard_error_and_estimate():
    assert standard_error([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert standard_error([0.7]) is None
    got = estimate([1.0, 0.0, 1.0, 0.0])
    assert (got.value, got.n) == (0.5, 4)
    assert got.ci95 == pytest.approx(0.565803, abs=1e-6)  # 1.96 * 0.57735 / 2
    assert estimate([0.3]).ci95 is None
    assert estimate([0.25] * 5).ci95 == 0.0


def test_scores_table_of_three_single_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(path) for path in _three_single_runs(tmp_path)] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out

    rows = {row["run"]: row for row in csv.DictReader(io.StringIO((out / "compare.csv").read_text()))}
    assert list(rows) == ["ft_m", "rome", "memit"]
    expected = {
        "ft_m": {
            "reliability": [1.0, 0.5, 0.0, 1.0],
            "generalization": [1.0, 0.0, 0.5, 1.0],
            "locality": [1.0, 1.0, 0.5, 1.0],
            "portability": [0.5, 0.0],
            "es": [1.0, 1.0, 0.0, 1.0],
            "seconds_per_edit": [0.4, 0.6, 0.5, 0.5],
        },
        "rome": {
            "reliability": [1.0, 0.0, 1.0],
            "generalization": [0.0, 1.0, 0.0],
            "locality": [0.0, 1.0, 1.0],
            "es": [1.0, 1.0, 0.0],
            "ps": [1.0, 0.0, 1.0],
            "ns": [1.0, 1.0, 1.0],
        },
        "memit": {"reliability": [1.0] * 5, "generalization": [0.75] * 5, "locality": [0.25] * 5},
    }
    for run, scores in expected.items():
        for key, values in scores.items():
            assert float(rows[run][key]) == pytest.approx(sum(values) / len(values)), (run, key)
            assert float(rows[run][f"{key}_ci95"]) == pytest.approx(_half_width(values)), (run, key)
            assert int(rows[run][f"{key}_n"]) == len(values)
    # hand-written: ft_m reliability 0.625 ± 1.96 * 0.478714 / 2
    assert float(rows["ft_m"]["reliability_ci95"]) == pytest.approx(0.469140, abs=1e-6)
    assert rows["ft_m"]["cases"] == "4" and rows["ft_m"]["mode"] == "single"  # the failed case is left out
    assert rows["ft_m"]["ps"] == rows["ft_m"]["ns"] == rows["memit"]["es"] == ""  # not measured
    assert float(rows["rome"]["score"]) == pytest.approx(3 / (1 / (2 / 3) + 1 / (2 / 3) + 1.0))  # S of ES, PS, NS
    assert rows["rome"]["score_ci95"] == ""
    assert float(rows["ft_m"]["peak_memory_mb"]) == 1200.0 and rows["ft_m"]["peak_memory_mb_ci95"] == ""

    markdown = (out / "compare.md").read_text()
    assert markdown in printed
    assert "| run | mode | n | Reliability | Generalization | Locality | Portability | Efficacy (ES) | Paraphrase (PS) | Neighborhood (NS) | Score (S) |" in markdown
    assert f"| ft_m | single | 4 | 0.625 ± {_half_width([1.0, 0.5, 0.0, 1.0]):.3f} |" in markdown
    assert f"0.250 ± {_half_width([0.5, 0.0]):.3f} (n=2)" in markdown  # portability on fewer cases
    assert "| memit | single | 5 | 1.000 ± 0.000 | 0.750 ± 0.000 | 0.250 ± 0.000 | - |" in markdown
    assert "1.96 × s / √n" in markdown
    assert "Edit budget" not in markdown  # no run has checkpoints

    assert (out / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bars.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (out / "compare.png").exists() and not (out / "budget.json").exists()


def test_latex_table_is_well_formed(tmp_path):
    out = tmp_path / "out"
    runs = _three_single_runs(tmp_path)
    runs.append(_write_cases_run(tmp_path / "ft_m_100%_b", RUN_C, editor="ft_m"))  # ft_m twice: labels carry the folder names
    compare(runs, out)
    latex = (out / "compare.tex").read_text()
    lines = [line for line in latex.splitlines() if not line.startswith("%")]
    assert lines[0].startswith("\\begin{tabular}{") and lines[-1] == "\\end{tabular}"
    spec = re.fullmatch(r"\\begin\{tabular\}\{([lrc]+)\}", lines[0]).group(1)
    assert spec.startswith("llr")
    assert lines[1] == "\\toprule" and lines[3] == "\\midrule" and lines[-2] == "\\bottomrule"
    rows = [lines[2]] + lines[4:-2]
    assert len(rows) == 5
    for row in rows:
        assert row.endswith(" \\\\")
        assert len(re.findall(r"(?<!\\)&", row)) == len(spec) - 1
        assert not re.search(r"(?<!\\)[_%#]", row), row  # escaped outside math
        assert row.count("$") % 2 == 0
        assert row.count("{") == row.count("}")
    assert lines[4].startswith("ft\\_m (ft\\_m\\_run\\_a) & single & 4 & $0.625 \\pm 0.469$ & ")
    assert any(row.startswith("ft\\_m (ft\\_m\\_100\\%\\_b) & ") for row in rows)
    assert "$n{=}2$" in latex and "Neighborhood (NS)" in lines[2]
    assert latex_escape("a_b & c%{x}~^\\") == "a\\_b \\& c\\%\\{x\\}\\textasciitilde{}\\textasciicircum{}\\textbackslash{}"


def _sequential_cases(n):
    return [_case(i, {"reliability": 1.0 if i % 4 else 0.0, "locality": 1.0}, edits_applied=n, edit_index=i) for i in range(n)]


def test_mixed_runs_use_the_last_checkpoint_of_sequential_ones(tmp_path, capsys):
    cases = _sequential_cases(8)  # reliability 6 of 8
    checkpoints = [
        {"edits": 0, "retention": {}, "general": {"hellaswag": {"acc_norm": 0.36}}},
        {"edits": 4, "retention": {"reliability": 0.75, "locality": 1.0}, "retention_stderr": {"reliability": 0.25, "locality": 0.0}, "retention_n": {"reliability": 4, "locality": 4}, "general": {"hellaswag": {"acc_norm": 0.30}}},
        {"edits": 8, "retention": {"reliability": 0.75, "locality": 1.0}, "general": {"hellaswag": {"acc_norm": 0.35}}},
    ]
    sequential = _write_cases_run(tmp_path / "seq", cases, editor="memit", mode="sequential", checkpoints=checkpoints)
    batch = _write_cases_run(tmp_path / "batch", RUN_B, editor="memit", mode="batch", edits_per_call=2)
    single = _write_cases_run(tmp_path / "single", RUN_C, editor="rome")
    no_general = _write_run(tmp_path / "seq_old", [{"edits": 1, "retention": {"reliability": 1.0}, "general": {}}, {"edits": 10, "retention": {"reliability": 0.6}, "general": {}}])
    out = tmp_path / "out"
    assert main([str(single), str(batch), str(sequential), str(no_general), "--out", str(out), "--width", "6.8"]) == 0
    printed = capsys.readouterr().out
    rows = {row["run"]: row for row in csv.DictReader(io.StringIO((out / "compare.csv").read_text()))}
    seq = rows["memit (seq)"]
    assert (seq["mode"], seq["edits"], seq["cases"]) == ("sequential", "8", "8")
    assert float(seq["reliability"]) == 0.75 == checkpoints[-1]["retention"]["reliability"]
    assert float(seq["reliability_ci95"]) == pytest.approx(_half_width([0.0, 1.0, 1.0, 1.0] * 2))
    old = rows["ft_m"]  # no cases.jsonl: the last checkpoint, without an interval
    assert (old["reliability"], old["reliability_ci95"], old["cases"]) == ("0.6", "", "10")
    assert "| memit (batch) | batch of 2 | 3 |" in printed
    assert "| memit (seq) | sequential, 8 edits | 8 |" in printed
    assert "| ft_m | sequential, 10 edits | 10 | 0.600 | " in printed
    assert "## Edit budget" in printed and "| memit (seq) | 4 |" in printed
    for name in ("compare.md", "compare.csv", "compare.tex", "bars.png", "bars.pdf", "compare.png", "compare.pdf", "budget.json"):
        assert (out / name).is_file(), name
    assert list(json.loads((out / "budget.json").read_text())) == ["memit (seq)"]  # the only run with general scores
    assert sorted(path.name for path in (out / "tensorboard").iterdir()) == ["ft_m", "memit_seq"]
    png = (out / "compare.png").read_bytes()
    assert struct.unpack(">I", png[16:20])[0] == round(6.8 * 300)  # --width in inches at 300 dpi


def test_checkpoint_intervals(tmp_path):
    checkpoints = [
        {"edits": 4, "retention": {"reliability": 0.75, "em": 0.5}, "retention_stderr": {"reliability": 0.25}, "general": {}},
        {"edits": 10, "retention": {"reliability": 0.6, "em": 0.5}, "general": {}},
        {"edits": 8, "retention": {"reliability": 0.75, "em": 0.5}, "general": {}},
        {"edits": 1, "retention": {"reliability": 0.0}, "general": {}},
    ]
    run = load_run(_write_cases_run(tmp_path / "seq", _sequential_cases(10), mode="sequential", checkpoints=checkpoints))
    intervals = checkpoint_intervals(run, run_scores(run))
    assert intervals[4] == {"reliability": pytest.approx(1.96 * 0.25)}  # recorded standard error
    assert intervals[8] == {"reliability": pytest.approx(1.96 * math.sqrt(0.75 * 0.25 / 8))}  # bound for a rate; none for EM
    assert intervals[10]["reliability"] == pytest.approx(_half_width([0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]))  # per case
    assert intervals[1] == {}  # one case: no interval


def test_metrics_and_width_options(tmp_path, capsys):
    runs = [str(path) for path in _three_single_runs(tmp_path)]
    out = tmp_path / "out"
    assert main(runs + ["--out", str(out), "--metrics", "locality,reliability", "--width", "3.3"]) == 0
    assert (out / "compare.csv").read_text().splitlines()[0].endswith("cases,locality,locality_ci95,locality_n,reliability,reliability_ci95,reliability_n")
    assert "| run | mode | n | Locality | Reliability |" in capsys.readouterr().out
    assert struct.unpack(">I", (out / "bars.png").read_bytes()[16:20])[0] == 990
    with pytest.raises(SystemExit) as exit_info:
        main(runs + ["--out", str(out), "--metrics", "reliability,relyability"])
    assert exit_info.value.code == 2
    assert "relyability" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(runs + ["--out", str(out), "--width", "0"])


def test_cases_file_is_read_without_changes(tmp_path):
    folder = _write_cases_run(tmp_path / "run", RUN_C)
    torn = (folder / "cases.jsonl").read_text() + '{"case_id": "5", "po'
    (folder / "cases.jsonl").write_text(torn)
    run = load_run(folder)
    assert len(run.records) == 5
    assert (folder / "cases.jsonl").read_text() == torn
    with pytest.raises(FileNotFoundError, match="cases.jsonl nor checkpoints.jsonl"):
        load_run(tmp_path)


def test_every_score_has_a_readable_name():
    from factedit.evaluation.report import LABELS, ROWS, label_of

    assert all(key in LABELS for key, _ in ROWS)
    assert label_of("portability_multi_hop") == "Portability (multi hop)"


def test_help_describes_the_comparison(capsys):
    from factedit.evaluation.cli import main as edit_main

    with pytest.raises(SystemExit) as exit_info:
        edit_main(["compare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: edit.py compare")
    for phrase in ("single, batch, sequential", "95% confidence", "1.96 × s / √n", "compare.tex", "compare.csv", "bars.png", "--width", "--metrics", "3.3", "6.8", "edit budget"):
        assert phrase in text, phrase
