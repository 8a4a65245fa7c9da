"""Human-readable results: the summary table printed by ``edit.py``."""

from __future__ import annotations

from typing import Any

from factedit.metrics import PORTABILITY_KIND_PREFIX, protocol_of

ROWS = (
    ("reliability", "edit prompt, new target: token accuracy"),
    ("generalization", "rephrased prompts: token accuracy"),
    ("locality", "unrelated prompts: agreement with unedited model"),
    ("portability", "questions that follow from the edit: token accuracy"),
    # per-kind portability rows (portability_<kind>) are inserted here
    ("es", "efficacy: P(new) > P(true) on edit prompt"),
    ("ps", "paraphrase: P(new) > P(true)"),
    ("ns", "neighborhood: P(true) > P(new)"),
    ("score", "S = harmonic mean of ES, PS, NS"),
    ("em", "efficacy magnitude P(new) - P(true)"),
    ("pm", "paraphrase magnitude"),
    ("nm", "neighborhood magnitude P(true) - P(new)"),
    ("fluency", "n-gram entropy of generations"),
    ("gen_reliability_em", "edit prompt: greedy answer starts with new target"),
    ("gen_reliability_contains", "edit prompt: greedy answer contains new target"),
    ("gen_generalization_em", "rephrased prompts: greedy answer starts with new target"),
    ("gen_generalization_contains", "rephrased prompts: greedy answer contains new target"),
    ("gen_portability_em", "portability: greedy answer starts with an accepted answer"),
    ("gen_portability_contains", "portability: greedy answer contains an accepted answer"),
)

LABELS = {
    "reliability": "Reliability",
    "generalization": "Generalization",
    "locality": "Locality",
    "portability": "Portability",
    "es": "Efficacy (ES)",
    "ps": "Paraphrase (PS)",
    "ns": "Neighborhood (NS)",
    "score": "Score (S)",
    "em": "Efficacy magn. (EM)",
    "pm": "Paraphrase magn. (PM)",
    "nm": "Neighborhood magn. (NM)",
    "fluency": "Fluency",
    "gen_reliability_em": "Gen. reliability (exact)",
    "gen_reliability_contains": "Gen. reliability (contains)",
    "gen_generalization_em": "Gen. generalization (exact)",
    "gen_generalization_contains": "Gen. generalization (contains)",
    "gen_portability_em": "Gen. portability (exact)",
    "gen_portability_contains": "Gen. portability (contains)",
    "seconds_per_edit": "Seconds / edit",
    "peak_memory_mb": "Peak memory (MB)",
}
"""A name for each key of :data:`ROWS` (and of the costs) fit for a table or a figure in a paper."""


def label_of(key: str) -> str:
    """The readable name of a score key (:data:`LABELS`); per-kind portability keys read
    ``Portability (multi hop)``, other keys their words capitalised."""
    if key in LABELS:
        return LABELS[key]
    if key.startswith(PORTABILITY_KIND_PREFIX):
        return f"Portability ({key.removeprefix(PORTABILITY_KIND_PREFIX).replace('_', ' ')})"
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
            rows += [(kind, f"portability, {kind.removeprefix(PORTABILITY_KIND_PREFIX).replace('_', ' ')} probes: token accuracy") for kind in kinds]
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
