"""Sequential runs in Markdown and TensorBoard: a table of checkpoints per run and the edit budgets.

A sequential run folder holds ``checkpoints.jsonl``, one JSON object per line in increasing
``edits``::

    {"edits": 0, "wall_seconds": 12.3, "edit_seconds": 0.0, "retention": {},
     "general": {"hellaswag": {"acc": 0.31, "acc_norm": 0.36}, "wikitext": {"word_perplexity": 35.2}}}
    {"edits": 10, ..., "retention": {"reliability": 0.9, "es": 1.0, ...},
     "retention_stderr": {"reliability": 0.03, ...}, "retention_n": {"reliability": 10, ...}, "general": {...}}

``retention`` holds the scores of all edits made so far, measured on the model carrying them
(``retention_stderr`` and ``retention_n``: their standard errors over cases and numbers of cases,
in runs that recorded them); ``general`` holds general-ability task scores (``{task: {metric:
value}}``); checkpoint 0 is the unedited model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from .budget import Checkpoint, HeadlineMap, number, sorted_checkpoints
from .runs import Run, general_headlines, general_value, load_run, retention_keys, retention_value


# -- tables ------------------------------------------------------------------------------------------
def _fmt(value: float | None, metric: str = "") -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if "perplexity" in metric else f"{value:.3f}"


def _budget_of(budgets: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]], runs: Sequence[Run], index: int) -> Mapping[str, Any] | None:
    if isinstance(budgets, Mapping):
        return budgets.get(runs[index].label)
    return budgets[index] if index < len(budgets) else None


def checkpoint_table(run: Run, retention: Sequence[str], general: Mapping[str, tuple[str, str]]) -> str:
    """A markdown table of one run: a row per checkpoint, a column per metric."""
    tasks = [task for task in general if any(general_value(c, task, general[task][0]) is not None for c in run.checkpoints)]
    keys = [key for key in retention if any(retention_value(c, key) is not None for c in run.checkpoints)]
    timed = any(number(c.get("edit_seconds")) is not None for c in run.checkpoints)
    header = ["edits"] + keys + [f"{task} {general[task][0]} ({general[task][1]})" for task in tasks] + (["edit s"] if timed else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for checkpoint in run.checkpoints:
        row = [str(checkpoint["edits"])]
        row += [_fmt(retention_value(checkpoint, key)) for key in keys]
        row += [_fmt(general_value(checkpoint, task, general[task][0]), general[task][0]) for task in tasks]
        if timed:
            seconds = number(checkpoint.get("edit_seconds"))
            row.append("-" if seconds is None else f"{seconds:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def budget_table(runs: Sequence[Run], budgets: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]]) -> str:
    """The "Edit budget" markdown table: one row per run."""
    lines = [
        "| run | budget | last safe | limiting (base → at budget) | left out (at chance) | threshold | max edits |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, run in enumerate(runs):
        budget = _budget_of(budgets, runs, index)
        if budget is None:
            lines.append(f"| {run.label} | - | - | - | - | - | - |")
            continue
        reached = budget["budget"] is not None
        shown = str(budget["budget"]) if reached else f"> {budget['max_edits']}"
        limiting = []
        for task in budget.get("limiting") or []:
            metric = (budget.get("headline") or {}).get(task, [""])[0]
            base, now = (budget.get("base") or {}).get(task), (budget.get("at_budget") or {}).get(task)
            p_value = ((budget.get("p_values") or {}).get(task) or {}).get(budget["budget"])
            if p_value is None and reached:  # read back from JSON: the checkpoints are string keys
                p_value = ((budget.get("p_values") or {}).get(task) or {}).get(str(budget["budget"]))
            tested = f", p = {p_value:.3g}" if p_value is not None else ""
            limiting.append(f"{task} {metric} ({_fmt(base, metric)} → {_fmt(now, metric)}{tested})".replace("  ", " "))
        left_out = ", ".join(budget.get("at_chance") or []) or "-"
        lines.append(
            f"| {run.label} | {shown} | {budget['last_safe']} | {', '.join(limiting) or '-'} | {left_out} | {budget['threshold']:.0%} | {budget['max_edits']} |"
        )
    return "\n".join(lines)


NOISE_NOTE = (
    "Budget: the first checkpoint where a general task's headline score is worse than the unedited "
    "score by more than the threshold (relative); \"> N\" means not reached within the run's N edits. "
    "With about 100 items per task an accuracy has a standard error near 0.05, so a crossing close "
    "to the bound, and a small budget, may be noise. Where each item's score was kept, a crossing also "
    "needs a one-sided paired test against the unedited model's items (exact McNemar, or sign flips for "
    "scores that are not right/wrong) at p < alpha (0.05), and tasks whose unedited score is not above "
    "chance with 95% confidence are left out."
)


def markdown_table(
    runs: Sequence[Run],
    budgets: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    headline_map: HeadlineMap | None = None,
) -> str:
    """Markdown: a table per run (checkpoints × metrics; 3 decimals, perplexities 2), then the
    "Edit budget" table (left out when ``budgets`` is empty: no run measured general abilities).
    ``budgets`` maps run labels to :func:`edit_budget` results, or is a list in the order of
    ``runs``."""
    retention = retention_keys(runs)
    general = general_headlines(runs, headline_map)
    parts = []
    for run in runs:
        mode = run.summary.get("mode")
        parts.append(f"## {run.label}\n\n`{run.path}`" + (f", mode {mode}" if mode else "") + "\n")
        parts.append(checkpoint_table(run, retention, general) + "\n")
    if budgets:
        parts.append("## Edit budget\n")
        parts.append(budget_table(runs, budgets) + "\n")
        parts.append(NOISE_NOTE + "\n")
    return "\n".join(parts)


# -- TensorBoard ---------------------------------------------------------------------------------------
def write_tensorboard(source: str | Path | Run | Sequence[Checkpoint], log_dir: str | Path) -> Path:
    """Scalars ``retention/<key>``, ``general/<task>/<metric>`` and ``time/<key>`` with
    ``global_step`` = edits, from a run folder, a :class:`Run` or a list of checkpoints."""
    from torch.utils.tensorboard import SummaryWriter

    if isinstance(source, (str, Path)):
        checkpoints = load_run(source).checkpoints
    elif isinstance(source, Run):
        checkpoints = source.checkpoints
    else:
        checkpoints = sorted_checkpoints(source)
    log_dir = Path(log_dir)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for checkpoint in checkpoints:
            step = checkpoint["edits"]
            for key, value in (checkpoint.get("retention") or {}).items():
                if number(value) is not None:
                    writer.add_scalar(f"retention/{key}", value, step)
            for task, metrics in (checkpoint.get("general") or {}).items():
                for metric, value in (metrics or {}).items():
                    if number(value) is not None:
                        writer.add_scalar(f"general/{task}/{metric}", value, step)
            for key in ("edit_seconds", "wall_seconds"):
                if number(checkpoint.get(key)) is not None:
                    writer.add_scalar(f"time/{key}", checkpoint[key], step)
    finally:
        writer.close()
    return log_dir
