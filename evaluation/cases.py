"""One case's lines in ``cases.jsonl`` and the rules around them: what a scored case and a failed
case record, which failures end a run, how requests are grouped into edit calls, and where the
checkpoints of a sequential run fall."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import torch

from factedit.batches import pack
from factedit.editors.base import EditRequest
from factedit.jsonl import JsonlAppender
from factedit.models import model_fingerprint

from .config import DEFAULT_CHECKPOINTS
from .scoring import case_scores

if TYPE_CHECKING:
    from .board import RunBoard

logger = logging.getLogger(__name__)


class ModelLeftChangedError(RuntimeError):
    """An editor failed and left the model other than it found it (weights or hooks): no later
    case could be trusted, so the run stops (what it recorded is kept)."""


FATAL_ERRORS: tuple[type[BaseException], ...] = (MemoryError, torch.OutOfMemoryError, ModelLeftChangedError)
"""Errors that stop the run rather than fail one case: they say the machine (or a model an editor
left damaged), not the case, is at fault; a rerun with more memory (or a smaller batch) would
succeed."""


def model_state(model: torch.nn.Module) -> tuple[str, int]:
    """What a failed edit must leave as it was: the weights' fingerprint (a strided sample of
    every parameter, about 25 ms for a 135M-parameter model) and the number of forward hooks."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return model_fingerprint(model), hooks


class EditorSetupError(RuntimeError):
    """The editor's settings do not fit the model (an architecture missing from the targets
    table, a layer out of range): found by :meth:`Editor.prepare` before any case is scored."""


def edit_units(requests: Sequence[EditRequest], size: int) -> list[list[EditRequest]]:
    """Requests packed into editor calls of at most ``size``; a group (consecutive requests with
    the same ``group``) is never split, and a group larger than ``size`` is a call of its own."""
    blocks: list[list[EditRequest]] = []
    for request in requests:
        group = getattr(request, "group", None)
        if blocks and group is not None and getattr(blocks[-1][0], "group", None) == group:
            blocks[-1].append(request)
        else:
            blocks.append([request])
    return [[r for block in bin_ for r in block] for bin_ in pack(blocks, size)]


def case_chunks(units: Sequence[Sequence[EditRequest]], size: int) -> list[list[list[EditRequest]]]:
    """Editor calls (``units``) packed into chunks of at most ``size`` requests, whose cases are
    measured together; a unit is never split, and a unit larger than ``size`` is a chunk of its own."""
    return [[list(unit) for unit in chunk] for chunk in pack(units, size)]


def checkpoint_schedule(total: int, requested: Sequence[int] | None = None) -> list[int]:
    """The numbers of edits at which a sequential run is scored: those requested (default
    :data:`DEFAULT_CHECKPOINTS`) up to ``total``, and ``total`` itself."""
    wanted = DEFAULT_CHECKPOINTS if requested is None else requested
    if any(c < 1 for c in wanted):
        raise ValueError(f"checkpoints are numbers of edits >= 1, got {list(wanted)}")
    return sorted({c for c in wanted if c <= total} | ({total} if total else set()))


def case_record(request: EditRequest, pre: dict, post: dict, **extra: Any) -> dict[str, Any]:
    return {
        "case_id": request.case_id,
        "prompt": request.prompt,
        "target_new": request.target_new,
        "target_true": request.target_true,
        **extra,
        "pre": {"scores": case_scores(pre), "raw": pre},
        "post": {"scores": case_scores(post, reference=pre), "raw": post},
    }


def failure_record(request: EditRequest, stage: str, error_type: str, message: str) -> dict[str, Any]:
    """The line of a case that failed at ``stage``: enough to find the case and the cause, and
    no measurements, so that every summary of the run skips it."""
    logger.warning("case %s failed at %s: %s: %s", request.case_id, stage, error_type, message)
    return {
        "case_id": request.case_id,
        "prompt": request.prompt,
        "target_new": request.target_new,
        "target_true": request.target_true,
        "failed": {"stage": stage, "error": error_type, "message": message},
    }


def error_record(request: EditRequest, stage: str, error: Exception) -> dict[str, Any]:
    return failure_record(request, stage, type(error).__name__, str(error))


def is_failed(record: dict[str, Any]) -> bool:
    """Whether a line of ``cases.jsonl`` is a failed case (no measurements)."""
    return "failed" in record


def fail_groups(requests: list[EditRequest], failed: dict[str, dict[str, Any]]) -> list[EditRequest]:
    """The requests still to edit once those in ``failed`` (case id -> line) are left out.

    The rewrites of a group are one multi-hop case, edited whole or not at all: a group with a
    failed rewrite fails as a whole, and its other rewrites get lines in ``failed`` naming it.
    """
    broken = {r.group: r.case_id for r in requests if r.case_id in failed and r.group is not None}
    ready = []
    for request in requests:
        if request.case_id in failed:
            continue
        if request.group in broken:
            cause = failed[broken[request.group]]["failed"]
            failed[request.case_id] = failure_record(
                request, cause["stage"], cause["error"], f"case {broken[request.group]} of its group {request.group!r} failed: {cause['message']}"
            )
        else:
            ready.append(request)
    return ready


class CaseWriter:
    """Where the loop writes finished cases: ``cases.jsonl`` (or a shard's file), and the live
    TensorBoard view when there is one."""

    def __init__(self, writer: JsonlAppender, board: RunBoard | None) -> None:
        self.writer, self.board = writer, board

    def write(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        if self.board is not None:
            self.board.add(record)

    def close(self) -> None:
        self.writer.close()
