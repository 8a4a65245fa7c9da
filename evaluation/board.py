"""The TensorBoard view of an ``edit.py`` run, written while the run goes.

Every finished case adds its scores before and after editing (``case_pre/<score>``,
``case_post/<score>``, ``case/seconds_per_edit``, at step = its position among the scored cases)
and the run's means so far (``summary/<key>`` at step = the number of scored cases), and the
file is flushed, so that ``tensorboard --logdir <out>/tensorboard`` shows the running means of a
run in progress. The means are the torchmetrics of ``summary.json`` (:class:`RunMetrics`): the
last point of each curve is the run's summary. At the end the run's settings and its final
metrics go to TensorBoard's HParams view, where runs with other settings line up beside it.

A resumed run starts from the cases already in ``cases.jsonl`` and goes on from their step.
Failed cases have no scores and add nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from .scoring import RunMetrics

logger = logging.getLogger(__name__)


def _hparam(value: Any) -> bool | int | float | str:
    """A setting as the HParams view takes it: a number, a string or a bool (lists as JSON)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


class RunBoard:
    """The TensorBoard scalars of one run (see the module docstring).

    ``finished`` are the lines of ``cases.jsonl`` an earlier invocation wrote. With ``running``
    false no means are computed per case (a sharded run: its means need every process, so only
    the final summary is written, by :meth:`finish`). Without the ``tensorboard`` package every
    method does nothing.
    """

    def __init__(self, log_dir: str | Path, finished: Sequence[dict[str, Any]] = (), running: bool = True) -> None:
        self.metrics = RunMetrics() if running else None
        self.step = 0  # scored cases so far
        self.means_at: int | None = None  # the step of the last means written
        for record in finished:
            if "failed" not in record:
                if self.metrics is not None:
                    self.metrics.update(record)
                self.step += 1
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; tolerate its absence in minimal installs
            logger.warning("tensorboard is not installed; skipping TensorBoard scalars")
            self.writer = None
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def add(self, record: dict[str, Any]) -> None:
        """A case's line of ``cases.jsonl``, just written."""
        if "failed" in record:
            return
        if self.writer is not None:
            for stage in ("pre", "post"):
                for key, value in record[stage]["scores"].items():
                    if value is not None:
                        self.writer.add_scalar(f"case_{stage}/{key}", value, self.step)
            if record.get("seconds") is not None:
                self.writer.add_scalar("case/seconds_per_edit", record["seconds"], self.step)
        self.step += 1
        if self.metrics is not None:
            self.metrics.update(record)
            self._means(self.metrics.summary())
        if self.writer is not None:
            self.writer.flush()

    def _means(self, flat: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in flat.items():
                self.writer.add_scalar(f"summary/{key}", value, self.step)
        self.means_at = self.step

    def finish(self, settings: dict[str, Any], final: dict[str, float]) -> None:
        """The run's final metrics (unless the last case already wrote them) and, for the HParams
        view, its ``settings`` (name -> value) with those metrics."""
        if self.writer is None:
            return
        if self.means_at != self.step:
            self._means(final)
        from torch.utils.tensorboard.summary import hparams

        values = {name: _hparam(value) for name, value in settings.items() if value is not None}
        for summary in hparams(values, {f"summary/{key}": value for key, value in final.items()}):
            self.writer.file_writer.add_summary(summary, self.step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
