"""Run folders as the comparison reads them: summary, settings, cases and checkpoints.

Any run folder ``edit.py`` wrote can be read (single, batch or sequential mode): it needs
``cases.jsonl`` (one line per case, pre- and post-edit scores) or ``checkpoints.jsonl`` (scores by
number of edits, sequential runs and batch runs with the general suite). Nothing in the folder is
changed, not even a torn last line of a run that is still writing.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from factedit.jsonl import read_numbered

from ..report import ROWS
from ..run_dir import RunDir, RunDirError
from .budget import Checkpoint, HeadlineMap, headline, number

logger = logging.getLogger(__name__)

RETENTION_ORDER = tuple(row[0] for row in ROWS)
"""Display order of score keys, that of ``edit.py``'s printed table; keys not listed follow in
the order they first appear."""


@dataclass(frozen=True)
class Run:
    """One run: its display label, folder, ``summary.json``, checkpoints (by edits), the lines of
    ``cases.jsonl`` and the saved settings (``config.yaml``); the files a run lacks are empty."""

    label: str
    path: Path
    summary: dict[str, Any] = field(repr=False)
    checkpoints: list[dict[str, Any]] = field(repr=False)
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def mode(self) -> str | None:
        """``single``, ``batch`` or ``sequential`` as the run recorded it; a run that recorded
        none but has checkpoints and no cases is taken as sequential."""
        mode = self.summary.get("mode") or self.config.get("mode")
        if mode is None and self.checkpoints and not self.records:
            return "sequential"
        return mode

    @property
    def edits_per_call(self) -> int | None:
        value = self.summary.get("edits_per_call", self.config.get("edits_per_call"))
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def scored(self) -> list[dict[str, Any]]:
        """The lines of ``cases.jsonl`` that hold measurements (failed cases left out)."""
        return [record for record in self.records if "failed" not in record and "post" in record]


def read_checkpoints(path: Path) -> list[dict[str, Any]]:
    """The checkpoints of ``checkpoints.jsonl``, sorted by edits; errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; a sequential run writes its checkpoints there")
    checkpoints: dict[int, dict[str, Any]] = {}
    for line_number, record in read_numbered(path):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {line_number} is not a JSON object")
        edits = record.get("edits")
        if isinstance(edits, bool) or not isinstance(edits, int) or edits < 0:
            raise ValueError(f"{path}: line {line_number} has no non-negative integer 'edits' (got {edits!r})")
        for key in ("retention", "general", "retention_stderr", "retention_n"):
            if not isinstance(record.get(key, {}), dict):
                raise ValueError(f"{path}: line {line_number}: {key!r} must be an object")
        for task, metrics in record.get("general", {}).items():
            if not isinstance(metrics, dict):
                raise ValueError(f"{path}: line {line_number}: general[{task!r}] must be an object of metric -> value")
        if edits in checkpoints:
            logger.warning("%s: line %d repeats the checkpoint at %d edits; keeping the later one", path, line_number, edits)
        checkpoints[edits] = record
    if not checkpoints:
        raise ValueError(f"{path}: no checkpoints in the file")
    return [checkpoints[edits] for edits in sorted(checkpoints)]


def read_cases(path: Path) -> list[dict[str, Any]]:
    """The lines of ``cases.jsonl`` (empty when the file is missing). A torn last line (a run
    writing, or killed while writing) is left out with a warning, and the file left as it is;
    any other damaged line is an error naming the file and line."""
    records = []
    for line_number, record in read_numbered(path, torn_tail="skip"):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {line_number} is not a JSON object")
        records.append(record)
    return records


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        logger.warning("%s: missing (a run still going?); the run is labelled by its settings or folder name", path)
        return {}
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: not a JSON object")
    return summary


def load_run(run_dir: str | Path) -> Run:
    """A run folder of any mode, labelled by its editor (else by the folder's name).

    Reads ``summary.json``, ``config.yaml``, ``cases.jsonl`` and ``checkpoints.jsonl`` where they
    exist; a folder with neither cases nor checkpoints is refused.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a run folder")
    folder = RunDir(path)
    summary = _read_summary(folder.summary)
    try:
        config = folder.read_config() or {}
    except RunDirError as error:
        logger.warning("%s", error)
        config = {}
    records = read_cases(folder.cases)
    checkpoints = read_checkpoints(folder.checkpoints) if folder.checkpoints.is_file() else []
    if not records and not checkpoints:
        raise FileNotFoundError(
            f"{path}: holds neither {folder.cases.name} nor {folder.checkpoints.name} with results; "
            f"give folders that edit.py wrote (--out of a run)"
        )
    settings = config.get("editor")
    editor = summary.get("editor") or (settings.get("name") if isinstance(settings, dict) else None)
    label = str(editor or path.resolve().name)
    return Run(label=label, path=path, summary=summary, checkpoints=checkpoints, records=records, config=config)


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
def ordered_keys(found: Sequence[str]) -> list[str]:
    """Score keys in :data:`RETENTION_ORDER` (per-kind portability keys, sorted, right after
    ``portability``), then the others in the order given."""
    kinds = sorted(key for key in found if key.startswith("portability_") and key not in RETENTION_ORDER)
    order: list[str] = []
    for key in RETENTION_ORDER:
        order.append(key)
        if key == "portability":
            order += kinds
    known = [key for key in order if key in found]
    return known + [key for key in found if key not in order]


def retention_keys(runs: Sequence[Run]) -> list[str]:
    """Every retention key present in any run's checkpoints, in :func:`ordered_keys` order."""
    found: dict[str, None] = {}
    for run in runs:
        for checkpoint in run.checkpoints:
            for key, value in (checkpoint.get("retention") or {}).items():
                if number(value) is not None:
                    found.setdefault(key, None)
    return ordered_keys(list(found))


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


def general_value(checkpoint: Checkpoint, task: str, metric: str) -> float | None:
    return number(((checkpoint.get("general") or {}).get(task) or {}).get(metric))


def retention_value(checkpoint: Checkpoint, key: str) -> float | None:
    return number((checkpoint.get("retention") or {}).get(key))


def has_general(run: Run) -> bool:
    """Whether any checkpoint of the run holds general-ability scores (the edit budget needs them)."""
    return any(checkpoint.get("general") for checkpoint in run.checkpoints)
