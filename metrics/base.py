"""The accumulator every per-case metric shares: a mean over edit cases."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric


class CaseAverage(Metric):
    """Mean over edit cases of a per-case score; cases with nothing to score are not counted.

    The states are a sum and a count, both reduced by summation, so they sync across processes
    and merge with :meth:`~torchmetrics.Metric.merge_state`. ``compute()`` returns ``nan`` when no
    case has been counted.
    """

    protocol: ClassVar[str] = ""
    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool] = True
    full_state_update: ClassVar[bool] = False

    score_sum: Tensor
    cases: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # float64 so that a single case's aggregate equals its per-case value exactly
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cases", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add_case(self, score: float | None) -> None:
        if score is None:
            return
        self.score_sum += score
        self.cases += 1

    def compute(self) -> Tensor:
        if self.cases == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.score_sum.device)
        return self.score_sum / self.cases
