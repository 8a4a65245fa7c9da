"""Compare runs of ``edit.py``: one table of scores with confidence intervals, figures for a paper,
and for sequential runs the curves against the number of edits and the edit budget.

``python edit.py compare RUN_DIR... --out DIR`` (or ``python -m factedit.evaluation.compare``) takes run
folders of any mode, single, batch and sequential, mixed, and writes into ``DIR``:

=====================  =================================================================
``compare.md``         the scores table (printed), and for runs with checkpoints a table of
                       checkpoints per run and the edit budgets
``compare.csv``        the scores table at full precision
``compare.tex``        the scores table as a LaTeX ``tabular``
``bars.png``, ``.pdf`` grouped bars: runs × a few scores, 95% error bars
``compare.png``, ``.pdf``  runs with checkpoints: scores against the number of edits
``budget.json``        runs with general-ability scores: the edit budget of each
``tensorboard/<run>/`` runs with checkpoints: scalars by number of edits
=====================  =================================================================

The pieces: :mod:`.runs` reads run folders, :mod:`.scores` computes each run's scores with their
intervals and renders the table, :mod:`.figures` draws, :mod:`.budget` computes the edit budget,
:mod:`.sequential` writes the checkpoint tables and TensorBoard scalars.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..run_dir import RunDir
from .budget import (
    BOUND_SLACK,
    HEADLINE_PREFERENCE,
    LOWER_IS_BETTER,
    HeadlineMap,
    crossed,
    direction_of,
    edit_budget,
    headline,
    tolerance_bound,
)
from .figures import DEFAULT_FIGURE_METRICS, DOUBLE_COLUMN, SINGLE_COLUMN, plot_bars, plot_runs
from .runs import (
    RETENTION_ORDER,
    Run,
    distinct_labels,
    general_headlines,
    has_general,
    load_run,
    load_runs,
    read_cases,
    read_checkpoints,
    retention_keys,
)
from .scores import (
    Estimate,
    ScoreTable,
    available_keys,
    checkpoint_intervals,
    estimate,
    run_scores,
    score_table,
    standard_error,
    to_csv,
    to_latex,
    to_markdown,
)
from .sequential import NOISE_NOTE, budget_table, checkpoint_table, markdown_table, write_tensorboard

logger = logging.getLogger(__name__)

__all__ = [
    "BOUND_SLACK",
    "DEFAULT_FIGURE_METRICS",
    "DOUBLE_COLUMN",
    "HEADLINE_PREFERENCE",
    "LOWER_IS_BETTER",
    "NOISE_NOTE",
    "RETENTION_ORDER",
    "SINGLE_COLUMN",
    "Comparison",
    "Estimate",
    "Run",
    "ScoreTable",
    "budget_table",
    "build_parser",
    "checkpoint_intervals",
    "checkpoint_table",
    "compare",
    "crossed",
    "direction_of",
    "distinct_labels",
    "edit_budget",
    "estimate",
    "general_headlines",
    "headline",
    "load_run",
    "load_runs",
    "main",
    "markdown_table",
    "plot_bars",
    "plot_runs",
    "read_cases",
    "read_checkpoints",
    "retention_keys",
    "run_scores",
    "score_table",
    "standard_error",
    "to_csv",
    "to_latex",
    "to_markdown",
    "tolerance_bound",
    "write_comparison",
    "write_tensorboard",
]


@dataclass(frozen=True)
class Comparison:
    """What :func:`write_comparison` computed and wrote."""

    table: ScoreTable
    budgets: dict[str, dict[str, Any]]
    files: list[Path] = field(default_factory=list)


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


def _check_metrics(metrics: Sequence[str], table: ScoreTable, runs: Sequence[Run]) -> None:
    known = list(dict.fromkeys(available_keys(table) + retention_keys(runs)))
    unknown = [key for key in metrics if key not in known]
    if unknown:
        raise ValueError(f"no run has the score(s) {', '.join(unknown)}; the runs have: {', '.join(known)}")


def write_comparison(
    runs: Sequence[Run],
    out_dir: str | Path,
    threshold: float = 0.1,
    headline_map: HeadlineMap | None = None,
    metrics: Sequence[str] | None = None,
    width: float = SINGLE_COLUMN,
) -> Comparison:
    """Write every output of the module docstring for ``runs`` into ``out_dir``.

    ``metrics`` (score keys) chooses the table's columns and the figures' scores, in that order;
    by default the table has every score and the figures :data:`DEFAULT_FIGURE_METRICS`.
    ``width`` is the figures' width in inches. The edit budget (``threshold``, ``headline_map``:
    :func:`edit_budget`) is computed for each run whose checkpoints hold general-ability scores;
    such a run without checkpoint 0 (the unedited model) is an error naming its file.
    """
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive number of inches, got {width!r}")
    table = score_table(runs, metrics)
    if metrics is not None:
        _check_metrics(metrics, table, runs)
    curve_runs = [run for run in runs if run.checkpoints]
    budgets: dict[str, dict[str, Any]] = {}
    for run in curve_runs:
        if has_general(run):
            try:
                budgets[run.label] = edit_budget(run.checkpoints, threshold, headline_map)
            except ValueError as error:
                raise ValueError(f"{RunDir(run.path).checkpoints}: {error}") from None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    text = "## Scores\n\n" + to_markdown(table)
    if curve_runs:
        text += "\n" + markdown_table(curve_runs, budgets, headline_map)
    for name, content in (("compare.md", text), ("compare.csv", to_csv(table)), ("compare.tex", to_latex(table))):
        (out / name).write_text(content)
        files.append(out / name)
    formats = ("png", "pdf")
    chosen = [key for key in metrics if key in table.keys] if metrics is not None else None
    try:
        plot_bars(table.runs, table.scores, out / "bars.png", chosen, width, formats)
        files += [out / f"bars.{fmt}" for fmt in formats]
    except ValueError as error:
        logger.warning("no bar chart: %s", error)
    if curve_runs:
        plot_runs(curve_runs, out / "compare.png", threshold, headline_map, metrics, width, formats)
        files += [out / f"compare.{fmt}" for fmt in formats]
        used: set[str] = set()
        for run in curve_runs:
            name = _folder_name(run.label)
            while name in used:
                name += "_"
            used.add(name)
            write_tensorboard(run, out / "tensorboard" / name)
        files.append(out / "tensorboard")
    if budgets:
        record = {run.label: {"path": str(run.path), **budgets[run.label]} for run in curve_runs if run.label in budgets}
        (out / "budget.json").write_text(json.dumps(_json_safe(record), indent=2) + "\n")
        files.append(out / "budget.json")
    logger.info("wrote %s", ", ".join(str(path) for path in files))
    return Comparison(table, budgets, files)


def compare(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    threshold: float = 0.1,
    headline_map: HeadlineMap | None = None,
    metrics: Sequence[str] | None = None,
    width: float = SINGLE_COLUMN,
) -> dict[str, dict[str, Any]]:
    """Load the run folders and :func:`write_comparison` into ``out_dir``. Returns run label ->
    edit budget, for the runs whose checkpoints hold general-ability scores."""
    return write_comparison(load_runs(run_dirs), out_dir, threshold, headline_map, metrics, width).budgets


EPILOG = f"""\
written into --out:
  compare.md        the scores table (printed): a row per run, a column per score, each the mean
                    over cases ± the half-width of its 95% confidence interval; for runs with
                    checkpoints, a table of checkpoints per run and the edit budgets
  compare.csv       the scores table at full precision: <score>, <score>_ci95, <score>_n per run
  compare.tex       the scores table as a LaTeX tabular (needs \\usepackage{{booktabs}})
  bars.png, .pdf    grouped bars, runs × scores, with 95% error bars
  compare.png, .pdf runs with checkpoints: scores against the number of edits (x ticks at the
                    checkpoints, rates on [0, 1], 95% error bars) and general-ability tasks
                    with the tolerance bound of the edit budget
  budget.json       runs with general-ability scores: the edit budget of each
  tensorboard/      runs with checkpoints: scalars by number of edits

runs: folders written by edit.py (--out of a run) in any mode, mixed: single, batch, sequential.
  Single and batch runs are scored from cases.jsonl; sequential runs on the model carrying all
  their edits (the last checkpoint; the post-edit lines of cases.jsonl were measured on it).

confidence intervals: 1.96 × s / √n, s the sample standard deviation of the n cases' scores in
  cases.jsonl (normal approximation, no bootstrap). S (harmonic mean of ES, PS, NS) and peak
  memory have none.

scores (--metrics): reliability, generalization, locality, portability, portability_<kind>,
  es, ps, ns, score, em, pm, nm, fluency, gen_<reliability|generalization|portability>_<em|contains>,
  seconds_per_edit, peak_memory_mb. The figures draw {', '.join(DEFAULT_FIGURE_METRICS)}
  (those the runs have) by default.

example:
  python edit.py compare runs/mend_zsre runs/ke_zsre runs/serac_zsre --out runs/compare_zsre
  python edit.py compare runs/rome_seq runs/memit_seq --out runs/compare_seq --width {DOUBLE_COLUMN}
"""


def build_parser(prog: str = "python -m factedit.evaluation.compare") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Compare edit.py runs of any mode side by side: a table of scores with 95% confidence\n"
            "intervals (Markdown, CSV, LaTeX), figures for a paper (PNG, PDF), and for sequential\n"
            "runs the curves against the number of edits and the edit budget."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by edit.py (cases.jsonl and/or checkpoints.jsonl, summary.json)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default: runs/compare)")
    parser.add_argument(
        "--metrics",
        type=lambda text: [key.strip() for key in text.split(",") if key.strip()],
        default=None,
        metavar="KEY,KEY,...",
        help="scores for the table's columns and the figures, in this order (default: the table shows every score the runs have, the figures a few)",
    )
    parser.add_argument(
        "--width",
        type=float,
        default=SINGLE_COLUMN,
        help=f"width of the figures in inches: {SINGLE_COLUMN} for one column of a paper (default), {DOUBLE_COLUMN} for both",
    )
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
        help="the metric that represents a general task, overriding the default choice (repeatable)",
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


def main(argv: Sequence[str] | None = None, prog: str = "python -m factedit.evaluation.compare") -> int:
    """``python -m factedit.evaluation.compare RUN_DIR... --out DIR`` (also ``edit.py compare ...``);
    prints ``compare.md``."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # it reports every font subset of a PDF
    if not (math.isfinite(args.width) and args.width > 0):
        parser.error(f"--width {args.width}: give a positive number of inches")
    if args.metrics is not None and not args.metrics:
        parser.error("--metrics: give score keys separated by commas")
    headline_map = _parse_headlines(args.headline, parser)
    try:
        result = write_comparison(load_runs(args.runs), args.out, args.threshold, headline_map or None, args.metrics, args.width)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print((args.out / "compare.md").read_text())
    print(f"written to {args.out}: " + ", ".join(path.name + ("/" if path.is_dir() else "") for path in result.files))
    return 0
