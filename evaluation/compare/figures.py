"""Figures of runs for a paper: grouped bars of their scores, and sequential curves against edits.

Both are sized for a page: ``width`` in inches (:data:`SINGLE_COLUMN`, 3.3, by default;
:data:`DOUBLE_COLUMN`, 6.8, for the width of the page), 7-point text, and are saved as PNG
(300 dpi) and, when asked, PDF with embedded TrueType fonts. Error bars are 95% confidence
intervals (:mod:`evaluation.compare.scores`). Matplotlib is used without pyplot: no global
figure state and no display.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..report import label_of
from .budget import HeadlineMap, tolerance_bound
from .runs import Run, general_headlines, general_value, retention_keys, retention_value
from .scores import Estimate, checkpoint_intervals, is_rate, run_scores

logger = logging.getLogger(__name__)

SINGLE_COLUMN = 3.3
"""Width in inches of one column of a two-column paper."""

DOUBLE_COLUMN = 6.8
"""Width in inches of both columns."""

DEFAULT_FIGURE_METRICS = ("reliability", "generalization", "locality", "portability")
"""The scores drawn unless others are chosen: EasyEdit's four (those the runs have); runs that
have none of them get their first four scores in [0, 1]."""

PANEL_WIDTH = 1.6
"""Inches per column of curve panels: two on a single column, four across a page."""

DPI = 300

STYLE: dict[str, Any] = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "legend.fontsize": 6,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.0,
    "lines.markersize": 3,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "grid.linewidth": 0.4,
    "pdf.fonttype": 42,  # TrueType fonts in the PDF, as publishers ask
    "ps.fonttype": 42,
}
"""Matplotlib settings of every figure (applied with ``rc_context``, not globally)."""

MARKERS = "osD^v<>ph*"
RATE_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
CHAR_WIDTH = 0.045
"""Rough width in inches of one character of 6-point text, to decide when labels would collide."""
ERROR_STYLE = {"elinewidth": 0.6, "capsize": 1.5, "capthick": 0.6}


def figure_metrics(available: Sequence[str], chosen: Sequence[str] | None = None) -> list[str]:
    """The keys to draw: ``chosen`` (those available, in that order), else those of
    :data:`DEFAULT_FIGURE_METRICS` available, else the first four available rates."""
    if chosen is not None:
        return [key for key in chosen if key in available]
    keys = [key for key in DEFAULT_FIGURE_METRICS if key in available]
    return keys or [key for key in available if is_rate(key)][:4]


def _color(index: int) -> str:
    return f"C{index % 10}"


def _legend_columns(labels: Sequence[str], width: float) -> int:
    entry = CHAR_WIDTH * max((len(label) for label in labels), default=1) + 0.35
    return max(1, min(len(labels), int(width // entry)))


def _yerr(values: Sequence[float], errors: Sequence[float], rate: bool) -> list[list[float]]:
    """Lower and upper error-bar lengths; for a rate, clipped so that the bar stays in [0, 1]
    (a normal-approximation interval near 0 or 1 can reach past it)."""
    lower, upper = [], []
    for value, error in zip(values, errors):
        lower.append(min(error, value) if rate and math.isfinite(value) else error)
        upper.append(min(error, 1.0 - value) if rate and math.isfinite(value) else error)
    return [lower, upper]


def _save(fig: Any, out: Path, formats: Sequence[str]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(f".{fmt.lstrip('.')}") for fmt in formats]
    for path in paths:
        fig.savefig(path, dpi=DPI)
        logger.info("wrote %s", path)
    return paths[0]


# -- grouped bars --------------------------------------------------------------------------------------
def plot_bars(
    runs: Sequence[Run],
    scores: Sequence[Mapping[str, Estimate]],
    out: str | Path,
    metrics: Sequence[str] | None = None,
    width: float = SINGLE_COLUMN,
    formats: Sequence[str] = ("png", "pdf"),
) -> Path:
    """Grouped bars: a group per score (:func:`figure_metrics` of the rates the runs have), a bar
    per run (its mean over cases; a sequential run's on the model carrying all its edits), error
    bars at the 95% confidence interval (clipped to [0, 1]), y on [0, 1]. Writes ``out`` with
    each suffix of ``formats``; returns the first path."""
    import matplotlib
    from matplotlib.figure import Figure

    available = [key for estimates in scores for key in estimates if is_rate(key)]
    keys = figure_metrics(list(dict.fromkeys(available)), metrics)
    if not keys:
        raise ValueError("the runs hold no scores in [0, 1] to draw as bars" + (f" among {', '.join(metrics)}" if metrics else ""))
    labels = [label_of(key) for key in keys]
    columns = _legend_columns([run.label for run in runs], width)
    legend_rows = math.ceil(len(runs) / columns)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, 0.5 * width + 0.16 * legend_rows + 0.3), layout="constrained")
        ax = fig.subplots()
        step = 0.8 / len(runs)
        for index, (run, estimates) in enumerate(zip(runs, scores)):
            offset = (index - (len(runs) - 1) / 2) * step
            values = [estimates[key].value if key in estimates else math.nan for key in keys]
            errors = [estimates[key].ci95 if key in estimates and estimates[key].ci95 is not None else math.nan for key in keys]
            positions = [position + offset for position in range(len(keys))]
            ax.bar(positions, values, step * 0.92, yerr=_yerr(values, errors, True), color=_color(index), label=run.label, error_kw=ERROR_STYLE)
        crowded = CHAR_WIDTH * max(len(label) for label in labels) > 0.85 * width / len(keys)
        ax.set_xticks(range(len(keys)), labels, rotation=25 if crowded else 0, ha="right" if crowded else "center")
        ax.tick_params(axis="x", length=0)
        ax.set_ylim(0, 1.04)
        ax.set_yticks(RATE_TICKS)
        ax.set_ylabel("score (mean, 95% CI)")
        ax.yaxis.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
        fig.legend(loc="outside upper center", ncols=columns, frameon=False)
        return _save(fig, Path(out), formats)


# -- curves against the number of edits ------------------------------------------------------------------
def _unedited(runs: Sequence[Run], task: str, metric: str) -> float | None:
    """The task's score at checkpoint 0 (the unedited model) of the first run that has one."""
    for run in runs:
        for checkpoint in run.checkpoints:
            value = general_value(checkpoint, task, metric) if checkpoint["edits"] == 0 else None
            if value is not None:
                return value
    return None


def _tick_labels(ticks: Sequence[int], panel_width: float) -> tuple[list[str], int]:
    """Labels for the checkpoint ticks of a panel and their rotation: all of them side by side if
    they fit, else all of them upright (rotated 90°), else every ``k``-th upright (the first and
    the last always shown, the others blank)."""
    labels = [str(tick) for tick in ticks]
    longest = max((len(label) for label in labels), default=1)
    if len(ticks) * CHAR_WIDTH * (longest + 1.5) <= panel_width:
        return labels, 0
    room = max(2, int(panel_width / (CHAR_WIDTH * 2.5)))  # a rotated label is about one line high
    step = math.ceil(len(ticks) / room)
    last = len(ticks) - 1
    return [label if index == last or (index % step == 0 and last - index >= step) else "" for index, label in enumerate(labels)], 90


def plot_runs(
    runs: Sequence[Run],
    out_png: str | Path,
    threshold: float = 0.1,
    headline_map: HeadlineMap | None = None,
    metrics: Sequence[str] | None = None,
    width: float = SINGLE_COLUMN,
    formats: Sequence[str] | None = None,
) -> Path:
    """Score against the number of edits, one line per run with checkpoints, a panel per score.

    Panels: the retention scores :func:`figure_metrics` picks (``metrics``, else a small default
    set), titled by their readable names, each with 95% error bars
    (:func:`~evaluation.compare.scores.checkpoint_intervals`; a rate's clipped to [0, 1]); then
    each general-ability task's headline metric (no error bars: checkpoints keep no per-item
    results), with a dashed line at the tolerance bound of the unedited score of the first run
    that has one. The checkpoints are evenly spaced along x (not to scale) and labelled with
    their numbers of edits (0 is the unedited model), the runs slightly apart at each; rates are
    drawn on [0, 1]. ``formats`` (suffixes; default that of ``out_png``) says which files to
    write; returns the first.
    """
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    out_png = Path(out_png)
    runs = [run for run in runs if run.checkpoints]
    keys = figure_metrics(retention_keys(runs), metrics)
    general = general_headlines(runs, headline_map)
    panels: list[tuple[str, str, tuple[str, str] | None]] = [("retention", key, None) for key in keys]
    panels += [("general", task, head) for task, head in general.items()]
    if not panels:
        raise ValueError("the runs' checkpoints hold no retention or general scores to plot")
    ticks = sorted({checkpoint["edits"] for run in runs for checkpoint in run.checkpoints})
    position = {edits: index for index, edits in enumerate(ticks)}
    intervals = [checkpoint_intervals(run, run_scores(run) if run.scored else None) for run in runs]

    ncols = max(1, min(len(panels), int(width // PANEL_WIDTH)))
    nrows = math.ceil(len(panels) / ncols)
    panel_width = width / ncols
    labels = [run.label for run in runs] + ([f"{threshold:.0%} tolerance bound"] if general else [])
    columns = _legend_columns(labels, width)
    tick_labels, rotation = _tick_labels(ticks, 0.85 * panel_width)
    row_height = 0.75 * panel_width + 0.3 + (CHAR_WIDTH * max(len(label) for label in tick_labels) if rotation else 0.0)
    height = nrows * row_height + 0.16 * math.ceil(len(labels) / columns) + 0.35
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        dodge = min(0.08, 0.3 / len(runs))  # runs side by side at a checkpoint, so error bars do not hide each other
        for slot, (ax, (kind, name, head)) in enumerate(zip(axes, panels)):
            rate = kind == "retention" and is_rate(name)
            for index, run in enumerate(runs):
                xs, ys, errors = [], [], []
                for checkpoint in run.checkpoints:
                    value = retention_value(checkpoint, name) if kind == "retention" else general_value(checkpoint, name, head[0])
                    if value is None:
                        continue
                    xs.append(position[checkpoint["edits"]] + (index - (len(runs) - 1) / 2) * dodge)
                    ys.append(value)
                    errors.append(intervals[index].get(checkpoint["edits"], {}).get(name, math.nan) if kind == "retention" else math.nan)
                if xs:
                    ax.errorbar(xs, ys, yerr=_yerr(ys, errors, rate), color=_color(index), marker=MARKERS[index % len(MARKERS)], **ERROR_STYLE)
            if kind == "retention":
                ax.set_title(label_of(name))
                if slot % ncols == 0 or not rate:
                    ax.set_ylabel("rate" if rate else name.replace("_", " "))
            else:
                metric, direction = head
                ax.set_title(name)
                ax.set_ylabel(f"{metric.replace('_', ' ')} ({'↑' if direction == 'higher' else '↓'})")
                base = _unedited(runs, name, metric)
                if base is not None:
                    ax.axhline(tolerance_bound(base, direction, threshold), color="0.35", linestyle="--", linewidth=0.8)
            if rate:
                ax.set_ylim(-0.04, 1.04)
                ax.set_yticks(RATE_TICKS)
            ax.set_xticks(range(len(ticks)), tick_labels, rotation=rotation)
            ax.set_xlim(-0.4, len(ticks) - 0.6)
            ax.grid(True, alpha=0.3)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.supxlabel("number of edits", fontsize=STYLE["axes.labelsize"])
        handles = [Line2D([], [], color=_color(i), marker=MARKERS[i % len(MARKERS)], label=run.label) for i, run in enumerate(runs)]
        if general:
            handles.append(Line2D([], [], color="0.35", linestyle="--", linewidth=0.8, label=labels[-1]))
        fig.legend(handles=handles, loc="outside upper center", ncols=columns, frameon=False)
        return _save(fig, out_png, formats or (out_png.suffix.lstrip(".") or "png",))
