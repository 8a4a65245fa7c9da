"""The checkpoints of a sequential run: one line of ``checkpoints.jsonl`` (retention and general
abilities at a number of edits), the shared cache of the unedited model's general scores, and the
curves, table, TensorBoard scalars and edit budget drawn from the finished file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from factedit.files import cache_root, write_text_atomically
from factedit.models import model_fingerprint

from .compare.scores import case_values, standard_error
from .run_dir import RunDir
from .scoring import RunMetrics

if TYPE_CHECKING:
    from .general import GeneralConfig

logger = logging.getLogger(__name__)


def unedited_general_path(model: torch.nn.Module, tokenizer: Any, suite: GeneralConfig) -> Path:
    """Where the unedited model's general-ability scores are kept: every run on the same
    weights, tokenizer and suite settings shares them (they cost minutes on a CPU)."""
    try:
        engine = version("lm_eval")
    except PackageNotFoundError:
        engine = "none"
    key = json.dumps(
        {
            "model": model_fingerprint(model),
            "tokenizer": [getattr(tokenizer, "name_or_path", ""), len(tokenizer)],
            "suite": dataclasses.asdict(suite),
            "lm_eval": engine,
            "stored": 2,  # what the file holds: 2 = scores, item scores and chance levels
        },
        sort_keys=True,
        default=str,
    )
    return cache_root() / "general-unedited" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def checkpoint_line(model: torch.nn.Module, tokenizer: Any, suite: GeneralConfig | None, edits: int, records: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """One line of ``checkpoints.jsonl``: the retention scores of ``records`` (with their standard
    errors) and the general-ability suite, on the model as it is now; the unedited model's suite
    (``edits == 0``) is read from the shared cache when an earlier run stored it."""
    started = time.perf_counter()
    metrics = RunMetrics()
    for record in records:
        metrics.update(record)
    retention = {k: v for k, v in metrics.summary().items() if not k.startswith("pre_") and "seconds" not in k and "memory" not in k}
    values = case_values(records)  # per-case scores, for the standard error of each retention score
    errors = {k: standard_error(values[k]) for k in retention if k in values}
    general: dict[str, Any] = {}
    paired: dict[str, Any] = {}  # item-level scores and chance levels, for the budget's paired tests
    general_seconds = 0.0
    cached = False
    if suite is not None:
        from .general import run_general

        tick = time.perf_counter()
        stored = unedited_general_path(model, tokenizer, suite) if edits == 0 else None
        if stored is not None and stored.is_file():
            saved, cached = json.loads(stored.read_text()), True
        else:
            run = run_general(model, tokenizer, suite)
            saved = {"scores": run.scores, "item_scores": run.item_scores, "chance": run.chance}
            if stored is not None:
                write_text_atomically(stored, json.dumps(saved))
        general = saved["scores"]
        paired = {key: saved[key] for key in ("item_scores", "chance") if saved[key]}
        general_seconds = time.perf_counter() - tick
        logger.info("general abilities at %d edits%s: %s", edits, " (unedited model, cached)" if cached else "", json.dumps(general))
    line = {
        "edits": edits,
        **extra,
        "retention": retention,
        "retention_stderr": {k: v for k, v in errors.items() if v is not None},
        "retention_n": {k: len(values[k]) for k in retention if k in values},
        "general": general,
        **{f"general_{key}": value for key, value in paired.items()},
        "general_seconds": round(general_seconds, 3),
        **({"general_cached": True} if cached else {}),
        "checkpoint_seconds": round(time.perf_counter() - started, 3),
    }
    return line


def checkpoint_outputs(run_dir: RunDir, label: str, summary: dict[str, Any], budget_threshold: float) -> dict[str, Any]:
    """Curves (PNG), a markdown table, TensorBoard scalars by number of edits, and the edit
    budget when the general suite ran; returns what goes into summary.json."""
    from . import compare

    checkpoints = compare.read_checkpoints(run_dir.checkpoints)
    run = compare.Run(label=label, path=run_dir.root, summary=summary, checkpoints=checkpoints)
    out: dict[str, Any] = {"checkpoints": [c["edits"] for c in checkpoints]}
    budgets = {}
    if checkpoints[0]["edits"] == 0 and checkpoints[0].get("general"):
        out["edit_budget"] = budgets[run.label] = compare.edit_budget(checkpoints, threshold=budget_threshold)
    compare.plot_runs([run], run_dir.curves, threshold=budget_threshold, metrics=compare.retention_keys([run]), width=compare.DOUBLE_COLUMN)
    run_dir.checkpoints_md.write_text(compare.markdown_table([run], budgets))
    compare.write_tensorboard(checkpoints, run_dir.tensorboard)
    return out
