"""The summary of a run: ``summary.json`` recomputed from ``cases.jsonl`` (so a resumed run ends
with the same numbers), the outputs drawn from the checkpoints of a sequential run, and the
settings and final scores shown in TensorBoard."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .board import RunBoard
from .cases import is_failed
from .checkpoints import checkpoint_outputs
from .provenance import run_provenance
from .run_dir import read_jsonl
from .scoring import RunMetrics, protocols_of

if TYPE_CHECKING:
    from .runner import EditRun


def write_summary(run: EditRun, wall_seconds: float) -> dict[str, Any]:
    """Recompute ``summary.json`` from ``cases.jsonl`` (and the checkpoints' curves, table and
    budget when there are checkpoints), and end the TensorBoard view."""
    records = read_jsonl(run.cases_path)
    wanted = {r.case_id for r in run.requests}
    records = [r for r in records if r["case_id"] in wanted]
    failed = [r for r in records if is_failed(r)]
    scored = [r for r in records if not is_failed(r)]
    metrics = RunMetrics()
    for record in scored[run.shard.rank :: run.shard.world]:
        metrics.update(record)
    flat = metrics.summary()  # reduced over all processes of a sharded run
    summary = {
        "editor": run.editor.name,
        "mode": run.mode,
        "edits_per_call": run.edits_per_call,
        "cases": len(records),
        "failed_cases": len(failed),  # the metrics are over the other cases
        "failed_case_ids": [r["case_id"] for r in failed],
        "wall_seconds_this_invocation": wall_seconds,
        "metrics": flat,
        "protocols": protocols_of(flat),
        # seconds_per_edit of edits computed together is their call's time shared out (eval.edit_together)
        "edits_computed_together": max((int(r.get("edits_computed_together", 1)) for r in scored), default=1),
        **run.info,
        "provenance": run.provenance if run.provenance is not None else run_provenance(run.model, run.model_id, run.data),
    }
    if run.shard.active:
        summary["processes"] = run.shard.world
        if not run.shard.is_main:
            return summary
    if read_jsonl(run.checkpoints_path):
        summary.update(checkpoint_outputs(run.dir, run.editor.name, summary, run.budget_threshold))
    run.dir.write_summary(summary)
    _finish_board(run, scored, flat)
    return summary

def run_settings(run: EditRun) -> dict[str, Any]:
    """The run's settings by dotted name, as TensorBoard's HParams view lists them."""
    found: dict[str, Any] = {
        "editor": run.editor.name,
        "mode": run.mode,
        "edits_per_call": run.edits_per_call,
        "model": run.model_id,
        "data": run.data,
        "cases": len(run.requests),
    }
    found.update({f"editor.{k}": v for k, v in run.editor_config.to_dict().items()})
    found.update({f"eval.{k}": v for k, v in dataclasses.asdict(run.eval).items()})
    return found

def _finish_board(run: EditRun, records: list[dict[str, Any]], flat: dict[str, float]) -> None:
    """End the TensorBoard view: the final metrics and the settings. Per-case scalars were
    written as the cases finished, except in a sharded run, whose cases are written now."""
    board, own = run._board, run._board is None
    if own:
        board = RunBoard(run.dir.tensorboard, running=False)
        for record in records:
            board.add(record)
    try:
        board.finish(run_settings(run), flat)
    finally:
        if own:
            board.close()
