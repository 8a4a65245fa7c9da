"""Human-readable results: the summary table printed by ``edit.py``."""

from __future__ import annotations

from typing import Any

from metrics import PROTOCOLS

ROWS = (
    ("reliability", "edit prompt, new target: token accuracy"),
    ("generalization", "rephrased prompts: token accuracy"),
    ("locality", "unrelated prompts: agreement with unedited model"),
    ("portability", "questions that follow from the edit: token accuracy"),
    ("es", "efficacy: P(new) > P(true) on edit prompt"),
    ("ps", "paraphrase: P(new) > P(true)"),
    ("ns", "neighborhood: P(true) > P(new)"),
    ("score", "S = harmonic mean of ES, PS, NS"),
    ("em", "efficacy magnitude P(new) - P(true)"),
    ("pm", "paraphrase magnitude"),
    ("nm", "neighborhood magnitude P(true) - P(new)"),
    ("fluency", "n-gram entropy of generations"),
)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_table(summary: dict[str, Any], title: str = "") -> str:
    metrics = summary["metrics"]
    lines = []
    if title:
        lines.append(title)
    header = f"{'metric':<16}{'protocol':<13}{'pre':>8}{'post':>8}   meaning"
    lines += [header, "-" * len(header)]
    for key, meaning in ROWS:
        pre, post = metrics.get(f"pre_{key}"), metrics.get(key)
        if pre is None and post is None:
            continue
        lines.append(f"{key:<16}{PROTOCOLS[key]:<13}{_fmt(pre):>8}{_fmt(post):>8}   {meaning}")
    lines.append("-" * len(header))
    if "seconds_per_edit" in metrics:
        lines.append(
            f"{'seconds/edit':<16}{'efficiency':<13}{'':>8}{metrics['seconds_per_edit']:>8.2f}   mean (median {metrics['median_seconds_per_edit']:.2f})"
        )
    if "peak_memory_mb" in metrics:
        lines.append(f"{'peak memory MB':<16}{'efficiency':<13}{'':>8}{metrics['peak_memory_mb']:>8.0f}   process peak while editing")
    lines.append(f"{summary['cases']} cases, mode {summary['mode']}, editor {summary['editor']}")
    return "\n".join(lines)
