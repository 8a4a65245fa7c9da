"""Human-readable results: the summary table printed by ``edit.py``."""

from __future__ import annotations

from typing import Any

from factedit.metrics import COSTS, PORTABILITY_KIND_PREFIX, SCORES, protocol_of, score_of

ROWS = tuple((score.key, score.meaning) for score in SCORES)
"""The report's rows in order: each score's key and meaning, from :data:`factedit.metrics.SCORES`."""

LABELS = {**{score.key: score.label for score in SCORES}, **COSTS}
"""A name for each key of :data:`ROWS` (and of the costs) fit for a table or a figure in a paper."""


def label_of(key: str) -> str:
    """The readable name of a score key (:data:`LABELS`); per-kind portability keys read
    ``Portability (multi hop)``, other keys their words capitalised."""
    if key in LABELS:
        return LABELS[key]
    if key.startswith(PORTABILITY_KIND_PREFIX):
        return score_of(key).label
    return key.replace("_", " ").capitalize()


FAILED_IDS_SHOWN = 10
"""Failed case ids listed under the table; the rest are in summary.json."""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """:data:`ROWS` with a row for each portability kind in the summary, after ``portability``."""
    kinds = sorted({key.removeprefix("pre_") for key in metrics if key.removeprefix("pre_").startswith(PORTABILITY_KIND_PREFIX)})
    rows: list[tuple[str, str]] = []
    for key, meaning in ROWS:
        rows.append((key, meaning))
        if key == "portability":
            rows += [(kind, score_of(kind).meaning) for kind in kinds]
    return rows


def summary_table(summary: dict[str, Any], title: str = "") -> str:
    metrics = summary["metrics"]
    rows = [(key, meaning) for key, meaning in _rows(metrics) if f"pre_{key}" in metrics or key in metrics]
    width = max([16] + [len(key) + 2 for key, _ in rows])
    lines = []
    if title:
        lines.append(title)
    header = f"{'metric':<{width}}{'protocol':<13}{'pre':>8}{'post':>8}   meaning"
    lines += [header, "-" * len(header)]
    for key, meaning in rows:
        pre, post = metrics.get(f"pre_{key}"), metrics.get(key)
        lines.append(f"{key:<{width}}{protocol_of(key):<13}{_fmt(pre):>8}{_fmt(post):>8}   {meaning}")
    lines.append("-" * len(header))
    if "seconds_per_edit" in metrics:
        lines.append(
            f"{'seconds/edit':<{width}}{'efficiency':<13}{'':>8}{metrics['seconds_per_edit']:>8.2f}   mean (median {metrics['median_seconds_per_edit']:.2f})"
            + (f"; up to {together} edits computed together, their time shared out" if (together := summary.get("edits_computed_together", 1)) > 1 else "")
        )
    if "peak_memory_mb" in metrics:
        lines.append(f"{'peak memory MB':<{width}}{'efficiency':<13}{'':>8}{metrics['peak_memory_mb']:>8.0f}   process peak while editing")
    lines.append(f"{summary['cases']} cases, mode {summary['mode']}, editor {summary['editor']}")
    failed = summary.get("failed_cases", 0)
    if failed:
        ids = summary.get("failed_case_ids", [])
        shown = ", ".join(str(i) for i in ids[:FAILED_IDS_SHOWN]) + (", ..." if len(ids) > FAILED_IDS_SHOWN else "")
        lines.append(f"{failed} of them FAILED and are left out of the scores above (case ids: {shown}); the errors are in cases.jsonl")
    return "\n".join(lines)
