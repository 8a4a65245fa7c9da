"""Compare sequential-editing runs: curves, tables, TensorBoard scalars and the edit budget.

A sequential run folder holds ``summary.json`` (at least ``editor`` and ``mode``) and
``checkpoints.jsonl``, one JSON object per line in increasing ``edits``::

    {"edits": 0, "wall_seconds": 12.3, "edit_seconds": 0.0, "retention": {},
     "general": {"hellaswag": {"acc": 0.31, "acc_norm": 0.36}, "wikitext": {"word_perplexity": 35.2}}}
    {"edits": 10, ..., "retention": {"reliability": 0.9, "es": 1.0, ...}, "general": {...}}

``retention`` holds the scores of all edits made so far, measured on the model carrying them;
``general`` holds general-ability task scores (``{task: {metric: value}}``); checkpoint 0 is the
unedited model.

The *edit budget* of a run is the number of edits after which some general-ability task has
degraded by more than a relative ``threshold`` from its unedited score (:func:`edit_budget`).

``python -m evaluation.compare RUN_DIR... --out DIR --threshold 0.1`` writes ``compare.png``,
``compare.md``, ``budget.json`` and ``tensorboard/<run>/`` into ``DIR`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from .report import ROWS
from .run_dir import RunDir

logger = logging.getLogger(__name__)

HEADLINE_PREFERENCE = (
    "acc_norm",
    "acc",
    "exact_match",
    "mc2",
    "mc1",
    "word_perplexity",
    "perplexity",
    "bits_per_byte",
)
"""Metrics that represent a task, best first (:func:`headline`)."""

LOWER_IS_BETTER = ("perplexity", "bits_per_byte")
"""A metric whose name contains one of these is better when lower."""

RETENTION_ORDER = tuple(key for key, _ in ROWS)
"""Display order of retention keys, that of ``edit.py``'s printed table; keys not listed follow in
the order they first appear."""

BOUND_SLACK = 1e-9
"""Relative slack when comparing a score with its tolerance bound, so that a score written exactly
at the bound (0.324 against 0.9 × 0.36) counts as within tolerance despite binary rounding."""

Checkpoint = Mapping[str, Any]
HeadlineMap = Mapping[str, Union[str, Sequence[str]]]


# -- headline metric and edit budget ---------------------------------------------------------------
def direction_of(metric: str) -> str:
    """``"lower"`` for perplexities and bits per byte, ``"higher"`` for everything else."""
    return "lower" if any(part in metric for part in LOWER_IS_BETTER) else "higher"


def _number(value: Any) -> float | None:
    """A score as a float; ``None`` for a missing or non-numeric value (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def headline(task: str, metrics: Mapping[str, Any], overrides: HeadlineMap | None = None) -> tuple[str, str]:
    """The metric that represents ``task`` and whether ``"higher"`` or ``"lower"`` is better.

    ``overrides`` maps a task to a metric name, or to ``(metric, direction)``; a task not in it
    follows the default rule: the first of :data:`HEADLINE_PREFERENCE` present in ``metrics``, else
    the first key with a numeric value (else the first key). Names containing ``perplexity`` or
    ``bits_per_byte`` are ``"lower"``, all others ``"higher"``.
    """
    if overrides and task in overrides:
        choice = overrides[task]
        if isinstance(choice, str):
            metric, direction = choice, direction_of(choice)
        else:
            metric, direction = tuple(choice)
        if direction not in ("higher", "lower"):
            raise ValueError(f"headline override for {task!r}: direction must be 'higher' or 'lower', got {direction!r}")
        if metrics and metric not in metrics:
            raise ValueError(f"headline override for {task!r} names {metric!r}, which the task does not report (it has {sorted(metrics)})")
        return metric, direction
    if not metrics:
        raise ValueError(f"task {task!r} reports no metrics")
    for metric in HEADLINE_PREFERENCE:
        if metric in metrics:
            return metric, direction_of(metric)
    numeric = [key for key, value in metrics.items() if _number(value) is not None]
    metric = numeric[0] if numeric else next(iter(metrics))
    return metric, direction_of(metric)


def tolerance_bound(base: float, direction: str, threshold: float) -> float:
    """The worst score still within ``threshold`` (relative) of ``base``.

    ``(1 - threshold) * base`` for a higher-is-better metric, ``(1 + threshold) * base`` for a
    lower-is-better one (with ``|base|``, so a negative base also moves in the worse direction).
    """
    step = threshold * abs(base)
    return base - step if direction == "higher" else base + step


def crossed(value: float, bound: float, direction: str) -> bool:
    """Whether ``value`` is worse than ``bound``; exactly at the bound is within tolerance.

    A non-finite score (a NaN accuracy, an infinite perplexity) means the model broke: crossed.
    """
    if not math.isfinite(value):
        return True
    if math.isclose(value, bound, rel_tol=BOUND_SLACK, abs_tol=BOUND_SLACK):
        return False
    return value < bound if direction == "higher" else value > bound


def _sorted_checkpoints(checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
    ordered = list(checkpoints)
    for index, checkpoint in enumerate(ordered):
        if not isinstance(checkpoint, Mapping) or isinstance(checkpoint.get("edits"), bool) or not isinstance(checkpoint.get("edits"), int):
            raise ValueError(f"checkpoint {index} has no integer 'edits': {checkpoint!r}")
    return sorted(ordered, key=lambda checkpoint: checkpoint["edits"])


def edit_budget(checkpoints: Sequence[Checkpoint], threshold: float = 0.1, headline_map: HeadlineMap | None = None) -> dict[str, Any]:
    """The number of edits a run takes before its general abilities degrade beyond ``threshold``.

    Each general-ability task is represented by its :func:`headline` metric. A task *crosses* at a
    checkpoint when its score is worse than the unedited (``edits == 0``) score by more than
    ``threshold`` relative to it: below ``(1 - threshold) * base`` for higher-is-better metrics,
    above ``(1 + threshold) * base`` for lower-is-better ones. Exactly at the bound is within
    tolerance; a non-finite score counts as crossed. Tasks missing at a checkpoint are not judged
    there, and a checkpoint without any general score is skipped.

    Returns a dict:

    * ``budget``: the edits of the first checkpoint where *any* task has crossed, or ``None`` if
      none does within the run;
    * ``last_safe``: the edits of the last judged checkpoint before it (0 if the first one after
      the unedited model already crosses; ``max_edits`` when the budget is never reached);
    * ``limiting``: the tasks that crossed at the budget checkpoint;
    * ``threshold``, ``max_edits`` (the last checkpoint's edits);
    * ``per_task``: task -> the edits where it first crossed, or ``None``;
    * ``base``: task -> unedited headline score; ``at_budget``: task -> score at the budget
      checkpoint (empty when the budget is not reached); ``headline``: task -> ``[metric,
      direction]``.

    How much to trust it: with about 100 items per task an accuracy has a standard error near
    0.05 (``sqrt(p (1 - p) / n)``, 0.05 at p = 0.5), the same size as a 10% threshold on an accuracy
    of 0.5. One checkpoint that dips just past the bound may therefore be noise, and a small budget
    from a small evaluation set should be reported as such, with ``per_task`` and the values, not
    smoothed away. More items per task, or a larger threshold, make the budget steadier.

    Raises ``ValueError`` when there is no checkpoint at ``edits == 0`` or it has no general scores.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    ordered = _sorted_checkpoints(checkpoints)
    if not ordered:
        raise ValueError("no checkpoints: the edit budget needs at least the unedited model (edits == 0)")
    unedited = [checkpoint for checkpoint in ordered if checkpoint["edits"] == 0]
    if not unedited:
        raise ValueError(
            f"no checkpoint with edits == 0 (the unedited model); the edit budget is measured against it "
            f"(checkpoints start at {ordered[0]['edits']} edits)"
        )
    base_general = unedited[-1].get("general") or {}
    if not base_general:
        raise ValueError("the unedited checkpoint (edits == 0) has no general scores; the edit budget is measured against them")

    heads: dict[str, tuple[str, str]] = {}
    base: dict[str, float] = {}
    bounds: dict[str, float] = {}
    for task, metrics in base_general.items():
        metric, direction = headline(task, metrics, headline_map)
        value = _number(metrics.get(metric))
        if value is None or not math.isfinite(value):
            raise ValueError(f"the unedited checkpoint's {task} {metric} is {metrics.get(metric)!r}; a finite base score is needed")
        heads[task], base[task] = (metric, direction), value
        bounds[task] = tolerance_bound(value, direction, threshold)

    per_task: dict[str, int | None] = {task: None for task in heads}
    budget: int | None = None
    last_safe = 0
    limiting: list[str] = []
    at_budget: dict[str, float] = {}
    for checkpoint in ordered:
        edits = checkpoint["edits"]
        if edits == 0:
            continue
        general = checkpoint.get("general") or {}
        values = {}
        for task, (metric, _) in heads.items():
            value = _number((general.get(task) or {}).get(metric))
            if value is not None:
                values[task] = value
        if not values:
            continue
        failing = [task for task, value in values.items() if crossed(value, bounds[task], heads[task][1])]
        for task in failing:
            if per_task[task] is None:
                per_task[task] = edits
        if budget is None:
            if failing:
                budget, limiting, at_budget = edits, failing, values
            else:
                last_safe = edits
    max_edits = ordered[-1]["edits"]
    if budget is None:
        last_safe = max_edits
    return {
        "budget": budget,
        "last_safe": last_safe,
        "limiting": limiting,
        "threshold": threshold,
        "max_edits": max_edits,
        "per_task": per_task,
        "base": base,
        "at_budget": at_budget,
        "headline": {task: list(head) for task, head in heads.items()},
    }


# -- loading runs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One sequential run: its display label, folder, ``summary.json`` and checkpoints (by edits)."""

    label: str
    path: Path
    summary: dict[str, Any] = field(repr=False)
    checkpoints: list[dict[str, Any]] = field(repr=False)


def read_checkpoints(path: Path) -> list[dict[str, Any]]:
    """The checkpoints of ``checkpoints.jsonl``, sorted by edits; errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; a sequential run writes its checkpoints there")
    checkpoints: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        edits = record.get("edits")
        if isinstance(edits, bool) or not isinstance(edits, int) or edits < 0:
            raise ValueError(f"{path}: line {number} has no non-negative integer 'edits' (got {edits!r})")
        for key in ("retention", "general"):
            if not isinstance(record.get(key, {}), dict):
                raise ValueError(f"{path}: line {number}: {key!r} must be an object")
        for task, metrics in record.get("general", {}).items():
            if not isinstance(metrics, dict):
                raise ValueError(f"{path}: line {number}: general[{task!r}] must be an object of metric -> value")
        if edits in checkpoints:
            logger.warning("%s: line %d repeats the checkpoint at %d edits; keeping the later one", path, number, edits)
        checkpoints[edits] = record
    if not checkpoints:
        raise ValueError(f"{path}: no checkpoints in the file")
    return [checkpoints[edits] for edits in sorted(checkpoints)]


def load_run(run_dir: str | Path) -> Run:
    """A run folder's ``summary.json`` and ``checkpoints.jsonl``, labelled by its editor.

    Without ``summary.json`` (a run still going) the label is the folder name.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a run folder")
    folder = RunDir(path)
    summary_path = folder.summary
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{summary_path}: not valid JSON (line {error.lineno}: {error.msg})") from None
        if not isinstance(summary, dict):
            raise ValueError(f"{summary_path}: not a JSON object")
        if summary.get("mode") not in (None, "sequential"):
            logger.warning("%s: mode is %r, not 'sequential'", summary_path, summary.get("mode"))
    else:
        logger.warning("%s: missing; labelling the run by its folder name", summary_path)
    checkpoints = read_checkpoints(folder.checkpoints)
    label = str(summary.get("editor") or path.resolve().name)
    return Run(label=label, path=path, summary=summary, checkpoints=checkpoints)


def distinct_labels(runs: Sequence[Run]) -> list[Run]:
    """The runs with unique labels: runs sharing an editor are told apart by their folder names
    (``ft_m (ft_m_cf100)``), and by a counter if those coincide too."""
    counts = Counter(run.label for run in runs)
    labelled = [replace(run, label=f"{run.label} ({run.path.resolve().name})") if counts[run.label] > 1 else run for run in runs]
    seen: Counter[str] = Counter()
    unique = []
    for run in labelled:
        seen[run.label] += 1
        unique.append(run if seen[run.label] == 1 else replace(run, label=f"{run.label} #{seen[run.label]}"))
    return unique


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """:func:`load_run` for each folder, with :func:`distinct_labels`."""
    if not run_dirs:
        raise ValueError("no run folders given")
    return distinct_labels([load_run(run_dir) for run_dir in run_dirs])


# -- what the checkpoints hold ---------------------------------------------------------------------
def retention_keys(runs: Sequence[Run]) -> list[str]:
    """Every retention key present in any run, in :data:`RETENTION_ORDER` then first appearance."""
    found: dict[str, None] = {}
    for run in runs:
        for checkpoint in run.checkpoints:
            for key, value in (checkpoint.get("retention") or {}).items():
                if _number(value) is not None:
                    found.setdefault(key, None)
    known = [key for key in RETENTION_ORDER if key in found]
    return known + [key for key in found if key not in RETENTION_ORDER]


def general_headlines(runs: Sequence[Run], headline_map: HeadlineMap | None = None) -> dict[str, tuple[str, str]]:
    """Every general task in any run -> its headline ``(metric, direction)``, decided by the first
    checkpoint (of the first run) that reports the task."""
    heads: dict[str, tuple[str, str]] = {}
    for run in runs:
        for checkpoint in run.checkpoints:
            for task, metrics in (checkpoint.get("general") or {}).items():
                if task not in heads and metrics:
                    heads[task] = headline(task, metrics, headline_map)
    return heads


def _general_value(checkpoint: Checkpoint, task: str, metric: str) -> float | None:
    return _number(((checkpoint.get("general") or {}).get(task) or {}).get(metric))


def _retention_value(checkpoint: Checkpoint, key: str) -> float | None:
    return _number((checkpoint.get("retention") or {}).get(key))


# -- plot --------------------------------------------------------------------------------------------
def plot_runs(
    runs: Sequence[Run],
    out_png: str | Path,
    threshold: float = 0.1,
    headline_map: HeadlineMap | None = None,
    columns: int = 4,
) -> Path:
    """One PNG with a panel per metric, score against the number of edits, one line per run.

    Panels: every retention metric present in any run, then every general task's headline
    metric. The x axis is symmetric-log, so 0, 1, 10, 100 and 1000 edits spread out. General
    panels carry a dashed line at the tolerance bound of the first run's unedited score (the
    first run that reports the task).
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display needed
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    out_png = Path(out_png)
    retention = retention_keys(runs)
    general = general_headlines(runs, headline_map)
    panels = [("retention", key, None) for key in retention] + [("general", task, head) for task, head in general.items()]
    if not panels:
        raise ValueError("the runs' checkpoints hold no retention or general scores to plot")

    ncols = max(1, min(columns, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = [f"C{index % 10}" for index in range(len(runs))]
    markers = "osD^v<>ph*"
    plain = FuncFormatter(lambda x, _: f"{x:g}")
    most = max((c["edits"] for run in runs for c in run.checkpoints), default=1)

    for ax, (kind, name, head) in zip(axes, panels):
        if kind == "retention":
            ax.set_title(f"retention: {name}")
        else:
            metric, direction = head
            ax.set_title(f"{name} {metric} ({direction} is better)")
        for index, run in enumerate(runs):
            xs, ys = [], []
            for checkpoint in run.checkpoints:
                value = _retention_value(checkpoint, name) if kind == "retention" else _general_value(checkpoint, name, head[0])
                if value is not None:
                    xs.append(checkpoint["edits"])
                    ys.append(value)
            if xs:
                ax.plot(xs, ys, color=colors[index], marker=markers[index % len(markers)], markersize=4, linewidth=1.4)
        if kind == "general":
            base_run = next((run for run in runs if any(c["edits"] == 0 and _general_value(c, name, head[0]) is not None for c in run.checkpoints)), None)
            if base_run is not None:
                base = next(_general_value(c, name, head[0]) for c in base_run.checkpoints if c["edits"] == 0 and _general_value(c, name, head[0]) is not None)
                ax.axhline(tolerance_bound(base, head[1], threshold), color="0.35", linestyle="--", linewidth=1.0)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.3, max(most, 1) * 1.4)  # room for the markers at 0 and at the last checkpoint
        ax.xaxis.set_major_formatter(plain)
        ax.set_xlabel("edits")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)

    handles = [Line2D([], [], color=colors[i], marker=markers[i % len(markers)], label=run.label) for i, run in enumerate(runs)]
    if general:
        handles.append(Line2D([], [], color="0.35", linestyle="--", label=f"{threshold:.0%} tolerance bound ({runs[0].label} unedited)"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 4), frameon=False)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    logger.info("wrote %s", out_png)
    return out_png


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
    tasks = [task for task in general if any(_general_value(c, task, general[task][0]) is not None for c in run.checkpoints)]
    keys = [key for key in retention if any(_retention_value(c, key) is not None for c in run.checkpoints)]
    timed = any(_number(c.get("edit_seconds")) is not None for c in run.checkpoints)
    header = ["edits"] + keys + [f"{task} {general[task][0]} ({general[task][1]})" for task in tasks] + (["edit s"] if timed else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for checkpoint in run.checkpoints:
        row = [str(checkpoint["edits"])]
        row += [_fmt(_retention_value(checkpoint, key)) for key in keys]
        row += [_fmt(_general_value(checkpoint, task, general[task][0]), general[task][0]) for task in tasks]
        if timed:
            seconds = _number(checkpoint.get("edit_seconds"))
            row.append("-" if seconds is None else f"{seconds:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def budget_table(runs: Sequence[Run], budgets: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]]) -> str:
    """The "Edit budget" markdown table: one row per run."""
    lines = [
        "| run | budget | last safe | limiting (base → at budget) | threshold | max edits |",
        "|---|---|---|---|---|---|",
    ]
    for index, run in enumerate(runs):
        budget = _budget_of(budgets, runs, index)
        if budget is None:
            lines.append(f"| {run.label} | - | - | - | - | - |")
            continue
        reached = budget["budget"] is not None
        shown = str(budget["budget"]) if reached else f"> {budget['max_edits']}"
        limiting = []
        for task in budget.get("limiting") or []:
            metric = (budget.get("headline") or {}).get(task, [""])[0]
            base, now = (budget.get("base") or {}).get(task), (budget.get("at_budget") or {}).get(task)
            limiting.append(f"{task} {metric} ({_fmt(base, metric)} → {_fmt(now, metric)})".replace("  ", " "))
        lines.append(
            f"| {run.label} | {shown} | {budget['last_safe']} | {', '.join(limiting) or '-'} | {budget['threshold']:.0%} | {budget['max_edits']} |"
        )
    return "\n".join(lines)


NOISE_NOTE = (
    "Budget: the first checkpoint where a general task's headline score is worse than the unedited "
    "score by more than the threshold (relative); \"> N\" means not reached within the run's N edits. "
    "With about 100 items per task an accuracy has a standard error near 0.05, so a crossing close "
    "to the bound, and a small budget, may be noise."
)


def markdown_table(
    runs: Sequence[Run],
    budgets: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    headline_map: HeadlineMap | None = None,
) -> str:
    """Markdown: a table per run (checkpoints × metrics; 3 decimals, perplexities 2), then the
    "Edit budget" table. ``budgets`` maps run labels to :func:`edit_budget` results, or is a
    list in the order of ``runs``."""
    retention = retention_keys(runs)
    general = general_headlines(runs, headline_map)
    parts = []
    for run in runs:
        mode = run.summary.get("mode")
        parts.append(f"## {run.label}\n\n`{run.path}`" + (f", mode {mode}" if mode else "") + "\n")
        parts.append(checkpoint_table(run, retention, general) + "\n")
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
        checkpoints = _sorted_checkpoints(source)
    log_dir = Path(log_dir)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for checkpoint in checkpoints:
            step = checkpoint["edits"]
            for key, value in (checkpoint.get("retention") or {}).items():
                if _number(value) is not None:
                    writer.add_scalar(f"retention/{key}", value, step)
            for task, metrics in (checkpoint.get("general") or {}).items():
                for metric, value in (metrics or {}).items():
                    if _number(value) is not None:
                        writer.add_scalar(f"general/{task}/{metric}", value, step)
            for key in ("edit_seconds", "wall_seconds"):
                if _number(checkpoint.get(key)) is not None:
                    writer.add_scalar(f"time/{key}", checkpoint[key], step)
    finally:
        writer.close()
    return log_dir


# -- everything at once ------------------------------------------------------------------------------
def _folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("inf", "nan"), which strict JSON cannot hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def compare(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    threshold: float = 0.1,
    headline_map: HeadlineMap | None = None,
) -> dict[str, dict[str, Any]]:
    """Load the runs, compute their edit budgets, and write into ``out_dir``: ``compare.png``,
    ``compare.md``, ``budget.json`` and ``tensorboard/<run>/``. Returns run label -> budget."""
    runs = load_runs(run_dirs)
    budgets: dict[str, dict[str, Any]] = {}
    for run in runs:
        try:
            budgets[run.label] = edit_budget(run.checkpoints, threshold, headline_map)
        except ValueError as error:
            raise ValueError(f"{RunDir(run.path).checkpoints}: {error}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, out / "compare.png", threshold, headline_map)
    (out / "compare.md").write_text(markdown_table(runs, budgets, headline_map))
    record = {run.label: {"path": str(run.path), **budgets[run.label]} for run in runs}
    (out / "budget.json").write_text(json.dumps(_json_safe(record), indent=2) + "\n")
    used: set[str] = set()
    for run in runs:
        name = _folder_name(run.label)
        while name in used:
            name += "_"
        used.add(name)
        write_tensorboard(run, out / "tensorboard" / name)
    logger.info("wrote %s, %s, %s and %s", out / "compare.png", out / "compare.md", out / "budget.json", out / "tensorboard")
    return budgets


def build_parser(prog: str = "python -m evaluation.compare") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare sequential-editing runs: curves, tables, TensorBoard scalars and the edit budget.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding checkpoints.jsonl (and summary.json)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default: runs/compare)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.1,
        help="relative degradation of a general task's headline score that ends the edit budget (default: 0.1)",
    )
    parser.add_argument(
        "--headline",
        action="append",
        default=[],
        metavar="TASK=METRIC[:higher|lower]",
        help="the metric that represents a task, overriding the default choice (repeatable)",
    )
    return parser


def _parse_headlines(items: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, str | tuple[str, str]]:
    overrides: dict[str, str | tuple[str, str]] = {}
    for item in items:
        task, sep, metric = item.partition("=")
        if not sep or not task or not metric:
            parser.error(f"--headline {item!r}: expected TASK=METRIC or TASK=METRIC:higher|lower")
        name, colon, direction = metric.rpartition(":")
        overrides[task] = (name, direction) if colon and direction in ("higher", "lower") else metric
    return overrides


def main(argv: Sequence[str] | None = None, prog: str = "python -m evaluation.compare") -> int:
    """``python -m evaluation.compare RUN_DIR... --out DIR --threshold 0.1`` (also ``edit.py
    compare ...``); prints the tables."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    headline_map = _parse_headlines(args.headline, parser)
    try:
        compare(args.runs, args.out, args.threshold, headline_map or None)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print((args.out / "compare.md").read_text())
    print(f"written to {args.out}: compare.png, compare.md, budget.json, tensorboard/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
