"""Scores of runs side by side, with confidence intervals from the per-case values.

Every score of a run is a mean over cases (each case's own score being the mean over its
prompts, :mod:`metrics`). Its uncertainty is given as the half-width of a 95% confidence
interval by the normal approximation to the sampling distribution of a mean:

    half-width = 1.96 × s / √n

where ``n`` is the number of cases that have the score and ``s`` their sample standard deviation
(divisor ``n - 1``). No bootstrap, so the numbers are exact and reproducible. With fewer than two
cases there is no interval. The approximation is poor for a rate near 0 or 1 with few cases (the
interval can reach past [0, 1], and is 0 when every case scored the same).

Where the values come from:

* single and batch runs: the post-edit scores in ``cases.jsonl``;
* sequential runs: the same file, whose post-edit scores were measured on the model carrying all
  the edits, so that the means are the scores of the last checkpoint (checked, with a warning if
  they differ); a run without ``cases.jsonl`` falls back to the last checkpoint's ``retention``
  (with ``retention_stderr`` where the run recorded it);
* ``score`` (S, CounterFact's harmonic mean of ES, PS and NS) is computed from the three means,
  as ``summary.json`` does, and has no interval; ``seconds_per_edit`` is the mean of the cases'
  editing seconds; ``peak_memory_mb`` is the largest process peak of any case (no interval).

Points on a sequential curve (:func:`checkpoint_intervals`) use the standard error a checkpoint
recorded (``retention_stderr``); for checkpoints written before it was recorded, the last one uses
the per-case values and the others, for scores in [0, 1], the bound ``√(p (1 - p) / n)`` with ``n``
the number of edits, which is the largest standard error any scores in [0, 1] with mean ``p`` can
have (so those error bars are at most too wide).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from factedit.metrics import harmonic_mean, protocol_of

from ..report import label_of
from ..scoring import PROBABILITY_GROUPS
from .budget import number
from .runs import Run, ordered_keys

logger = logging.getLogger(__name__)

Z95 = 1.96
"""Two-sided 95% quantile of the standard normal distribution, as the intervals use it."""

NOT_RATES = ("em", "pm", "nm", "fluency")
"""Scores of the quality protocols that are not rates in [0, 1]: probability magnitudes (in
[-1, 1]) and the n-gram entropy."""

COSTS = ("seconds_per_edit", "peak_memory_mb")
"""Costs of editing, shown after the scores."""

AGREEMENT_SLACK = 1e-9
"""How far a sequential run's mean over cases may be from its last checkpoint's score."""


@dataclass(frozen=True)
class Estimate:
    """A run's score: ``value`` (a mean over ``n`` cases; for peak memory the largest) and the
    half-width of its 95% confidence interval, ``None`` where there is none."""

    value: float
    ci95: float | None
    n: int


def standard_error(values: Sequence[float]) -> float | None:
    """``s / √n``: the sample standard deviation (divisor ``n - 1``) over the square root of ``n``;
    ``None`` for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    variance = math.fsum((value - mean) ** 2 for value in values) / (n - 1)
    return math.sqrt(variance / n)


def estimate(values: Sequence[float]) -> Estimate:
    """The mean of ``values`` and the half-width ``1.96 × s / √n`` of its 95% interval."""
    if not values:
        raise ValueError("no values to estimate from")
    error = standard_error(values)
    return Estimate(math.fsum(values) / len(values), None if error is None else Z95 * error, len(values))


def is_rate(key: str) -> bool:
    """Whether a score key is a rate in [0, 1] (accuracies, agreement, ES/PS/NS, S, generation
    matches), as opposed to a magnitude, the fluency entropy or a cost."""
    return key not in NOT_RATES and protocol_of(key) in ("token", "probability", "generation")


def case_values(records: Iterable[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Score key -> the post-edit values of the cases that have it (failed cases and missing
    scores left out), and ``seconds_per_edit`` -> the cases' editing seconds."""
    values: dict[str, list[float]] = {}
    for record in records:
        if "failed" in record or "post" not in record:
            continue
        for key, value in (record["post"].get("scores") or {}).items():
            if number(value) is not None:
                values.setdefault(key, []).append(float(value))
        if number(record.get("seconds")) is not None:
            values.setdefault("seconds_per_edit", []).append(float(record["seconds"]))
    return values


def _with_score(scores: dict[str, Estimate]) -> dict[str, Estimate]:
    """``score`` (S) from the ES, PS and NS means, when all three are there."""
    if "score" not in scores and all(key in scores for key in PROBABILITY_GROUPS):
        parts = [scores[key] for key in PROBABILITY_GROUPS]
        scores["score"] = Estimate(harmonic_mean([part.value for part in parts]), None, min(part.n for part in parts))
    return scores


def _from_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Estimate]:
    stderr = checkpoint.get("retention_stderr") or {}
    counts = checkpoint.get("retention_n") or {}
    scores = {}
    for key, value in (checkpoint.get("retention") or {}).items():
        if number(value) is None:
            continue
        error = number(stderr.get(key))
        count = counts.get(key, checkpoint["edits"])
        scores[key] = Estimate(float(value), None if error is None else Z95 * error, int(count))
    return scores


def run_scores(run: Run) -> dict[str, Estimate]:
    """Score key -> :class:`Estimate` for one run (see the module docstring for the sources)."""
    if run.scored:
        scores = {key: estimate(values) for key, values in case_values(run.scored).items() if values}
        memory = [float(r["peak_memory_mb"]) for r in run.scored if number(r.get("peak_memory_mb")) is not None]
        if memory:
            scores["peak_memory_mb"] = Estimate(max(memory), None, len(memory))
        if run.mode == "sequential" and run.checkpoints:
            _check_agreement(run, scores)
    elif run.checkpoints:
        scores = _from_checkpoint(run.checkpoints[-1])
    else:
        scores = {}
    return _with_score(scores)


def _check_agreement(run: Run, scores: Mapping[str, Estimate]) -> None:
    last = run.checkpoints[-1]
    for key, value in (last.get("retention") or {}).items():
        if key in scores and number(value) is not None and not math.isclose(scores[key].value, value, rel_tol=AGREEMENT_SLACK, abs_tol=AGREEMENT_SLACK):
            logger.warning(
                "%s: %s is %.6g over cases.jsonl but %.6g at the last checkpoint (%d edits); the table shows the mean over cases",
                run.path,
                key,
                scores[key].value,
                value,
                last["edits"],
            )


def checkpoint_intervals(run: Run, final: Mapping[str, Estimate] | None = None) -> dict[int, dict[str, float]]:
    """Edits -> retention key -> 95% half-width at each checkpoint of ``run`` (where one can be
    given): the checkpoint's recorded ``retention_stderr``; else, at the last checkpoint of a
    sequential run, the per-case half-width in ``final`` (:func:`run_scores`); else, for a rate,
    ``1.96 × √(p (1 - p) / n)`` with ``n >= 2`` the cases scored there (the edits)."""
    intervals: dict[int, dict[str, float]] = {}
    for index, checkpoint in enumerate(run.checkpoints):
        last = index == len(run.checkpoints) - 1 and run.mode == "sequential"
        stderr = checkpoint.get("retention_stderr") or {}
        counts = checkpoint.get("retention_n") or {}
        found: dict[str, float] = {}
        for key, value in (checkpoint.get("retention") or {}).items():
            value = number(value)
            if value is None:
                continue
            error = number(stderr.get(key))
            if error is not None:
                found[key] = Z95 * error
            elif last and final and key in final and final[key].ci95 is not None:
                found[key] = final[key].ci95
            elif is_rate(key):
                count = number(counts.get(key, checkpoint["edits"])) or 0
                if count >= 2 and 0.0 <= value <= 1.0:
                    found[key] = Z95 * math.sqrt(value * (1.0 - value) / count)
        intervals[checkpoint["edits"]] = found
    return intervals


# -- the table ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreTable:
    """Runs × score keys: ``scores[i]`` holds the estimates of ``runs[i]``; ``cases[i]`` its
    number of scored cases."""

    runs: list[Run]
    keys: list[str]
    scores: list[dict[str, Estimate]]
    cases: list[int]


def score_table(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> ScoreTable:
    """The runs' scores; columns ``metrics`` (default: every score any run has, in the order of
    ``edit.py``'s table, then the costs)."""
    scores = [run_scores(run) for run in runs]
    found: dict[str, None] = {}
    for estimates in scores:
        found.update(dict.fromkeys(key for key in estimates if key not in COSTS))
    if metrics is None:
        keys = ordered_keys(list(found)) + [key for key in COSTS if any(key in estimates for estimates in scores)]
    else:
        keys = list(metrics)
    cases = []
    for run, estimates in zip(runs, scores):
        cases.append(len(run.scored) if run.scored else max((estimate.n for estimate in estimates.values()), default=0))
    return ScoreTable(list(runs), keys, scores, cases)


def available_keys(table: ScoreTable) -> list[str]:
    """Every key any run of the table has a score for."""
    found: dict[str, None] = {}
    for estimates in table.scores:
        found.update(dict.fromkeys(estimates))
    return list(found)


def mode_text(run: Run) -> str:
    """``single``, ``batch of 20``, ``sequential, 100 edits``, or ``-`` when unknown."""
    mode = run.mode
    if mode == "batch" and run.edits_per_call:
        return f"batch of {run.edits_per_call}"
    if mode == "sequential":
        edits = run.checkpoints[-1]["edits"] if run.checkpoints else len(run.scored)
        return f"sequential, {edits} edits"
    return mode or "-"


def _digits(key: str) -> int:
    return 0 if key == "peak_memory_mb" else 2 if key == "seconds_per_edit" else 3


def _number_text(value: float, key: str) -> str:
    return f"{value:.{_digits(key)}f}" if math.isfinite(value) else str(value)


def _cell(estimate: Estimate | None, key: str, cases: int, count: str) -> tuple[str, str, str] | None:
    """(value, half-width or "", note on a smaller n or "") of one cell, ``None`` when empty."""
    if estimate is None:
        return None
    ci = "" if estimate.ci95 is None else _number_text(estimate.ci95, key)
    note = count.format(n=estimate.n) if key not in COSTS and estimate.n != cases else ""
    return _number_text(estimate.value, key), ci, note


TABLE_NOTE = (
    "Mean over cases ± half-width of its 95% confidence interval, 1.96 × s / √n (s: standard deviation "
    "over the n cases; normal approximation); (n=…) marks a score that fewer cases have. Sequential runs: "
    "scores on the model carrying all the edits (the last checkpoint). S (harmonic mean of ES, PS, NS) "
    "and peak memory have no interval."
)


def to_markdown(table: ScoreTable) -> str:
    """The table in Markdown (three decimals; seconds two), with :data:`TABLE_NOTE` under it."""
    header = ["run", "mode", "n"] + [label_of(key) for key in table.keys]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|" + "---:|" * len(table.keys)]
    for run, estimates, cases in zip(table.runs, table.scores, table.cases):
        row = [run.label.replace("|", "\\|"), mode_text(run), str(cases)]
        for key in table.keys:
            cell = _cell(estimates.get(key), key, cases, " (n={n})")
            row.append("-" if cell is None else cell[0] + (f" ± {cell[1]}" if cell[1] else "") + cell[2])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n" + TABLE_NOTE + "\n"


def to_csv(table: ScoreTable) -> str:
    """The table as CSV, one row per run, full precision: ``run, path, editor, mode,
    edits_per_call, edits, cases``, then for each score ``<key>``, ``<key>_ci95``, ``<key>_n``
    (empty where a run has none)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["run", "path", "editor", "mode", "edits_per_call", "edits", "cases"]
    for key in table.keys:
        header += [key, f"{key}_ci95", f"{key}_n"]
    writer.writerow(header)
    for run, estimates, cases in zip(table.runs, table.scores, table.cases):
        edits = run.checkpoints[-1]["edits"] if run.mode == "sequential" and run.checkpoints else ""
        row: list[Any] = [run.label, str(run.path), run.summary.get("editor", ""), run.mode or "", run.edits_per_call or "", edits, cases]
        for key in table.keys:
            estimate_ = estimates.get(key)
            if estimate_ is None:
                row += ["", "", ""]
            else:
                row += [repr(estimate_.value), "" if estimate_.ci95 is None else repr(estimate_.ci95), estimate_.n]
        writer.writerow(row)
    return buffer.getvalue()


LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (``mend_zsre`` -> ``mend\\_zsre``)."""
    return "".join(LATEX_SPECIALS.get(char, char) for char in text)


def to_latex(table: ScoreTable) -> str:
    """The table as a LaTeX ``tabular`` (booktabs rules), cells ``$0.967 \\pm 0.018$``; paste it
    into a ``table`` environment. Needs ``\\usepackage{booktabs}``."""
    columns = "llr" + "c" * len(table.keys)
    header = ["Run", "Mode", "$n$"] + [latex_escape(label_of(key)) for key in table.keys]
    lines = [
        "% Mean over cases +- half-width of its 95 percent confidence interval: 1.96 s / sqrt(n), normal approximation.",
        "% Needs \\usepackage{booktabs}.",
        f"\\begin{{tabular}}{{{columns}}}",
        "\\toprule",
        " & ".join(header) + " \\\\",
        "\\midrule",
    ]
    for run, estimates, cases in zip(table.runs, table.scores, table.cases):
        row = [latex_escape(run.label), latex_escape(mode_text(run)), str(cases)]
        for key in table.keys:
            cell = _cell(estimates.get(key), key, cases, " ($n{{=}}{n}$)")
            row.append("--" if cell is None else f"${cell[0]}" + (f" \\pm {cell[1]}" if cell[1] else "") + "$" + cell[2])
        lines.append(" & ".join(row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
