"""Measuring a chunk of cases together, and each case alone when that fails.

The runner measures the cases of a chunk (``EvalConfig.case_batch``) in one :func:`measure_cases`
call: before editing on the unedited model, after editing with each case's own weight change on
its rows (:class:`~factedit.evaluation.row_edits.RowEdits`), and in sequential mode on the model
carrying all edits. A case whose probes break the shared call must not take the chunk with it:
the chunk is then measured case by case, and only the case that raises gets a failed line.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Sequence

from factedit.editors.base import EditRequest

from .cases import FATAL_ERRORS, error_record
from .row_edits import RowEdits
from .scoring import EvalConfig, measure_cases

if TYPE_CHECKING:
    from factedit.editors.ike.editor import RowContexts

logger = logging.getLogger(__name__)


def measure_chunk(
    model,
    tokenizer,
    requests: Sequence[EditRequest],
    config: EvalConfig,
    stage: str,
    lines: dict[str, dict[str, Any]],
    rows: "RowEdits | RowContexts | None" = None,
    show: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measurements of ``requests`` by case id, all in one :func:`measure_cases` call (each row with
    its case's edit when ``rows``, built for ``requests`` in order, is given). When that call raises
    anything but a fatal error, each case is measured alone, and a case that raises gets its failed
    line (``stage``, the error) in ``lines`` instead. ``show`` is told what is being measured."""
    label = f"{stage}-scoring" + (f" {len(requests)} cases" if len(requests) > 1 else "")
    if show is not None:
        show(label)
    steps = {"on_step": lambda step: show(f"{label}: {step}")} if show is not None else {}
    try:
        raws = measure_cases(model, tokenizer, requests, config, select=rows.select if rows is not None else None, **steps)
        return {r.case_id: raw for r, raw in zip(requests, raws)}
    except FATAL_ERRORS:
        raise
    except Exception as error:
        if len(requests) == 1:
            lines[requests[0].case_id] = error_record(requests[0], stage, error)
            return {}
        logger.debug("measuring %d cases together failed (%s: %s); measuring each alone", len(requests), type(error).__name__, error)
    measured: dict[str, Any] = {}
    for index, request in enumerate(requests):
        # alone in its call, every row is this request's: row index ``index`` of ``rows``
        select = (lambda owners, index=index: rows.select([index] * len(owners))) if rows is not None else None
        try:
            measured[request.case_id] = measure_cases(model, tokenizer, [request], config, select=select)[0]
        except FATAL_ERRORS:
            raise
        except Exception as error:
            lines[request.case_id] = error_record(request, stage, error)
    return measured
