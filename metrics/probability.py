"""Probability comparison of the new against the true target (the ROME/MEMIT CounterFact protocol).

Meng et al. (2022), "Locating and Editing Factual Associations in GPT" (ROME), and Meng et al.
(2023), "Mass-Editing Memory in a Transformer" (MEMIT), score a CounterFact edit by comparing how
likely the model finds the new object ``o*`` and the true object ``o^c`` after a prompt. Each
likelihood is the negative log-likelihood of the target's tokens averaged over those tokens (the
"NLL" below), and ``exp(-NLL)`` is the per-token geometric-mean probability.

* Efficacy **ES** (edit prompt) and paraphrase **PS** (rephrased prompts): the fraction of prompts
  where the new target is more likely, ``NLL(o*) < NLL(o^c)``. Their magnitudes **EM**/**PM** are
  the mean of ``exp(-NLL(o*)) - exp(-NLL(o^c))``.
* Neighborhood **NS** (prompts about other subjects with the same true object): the fraction of
  prompts where the true target stays more likely, ``NLL(o^c) < NLL(o*)``; its magnitude **NM**
  is the mean of ``exp(-NLL(o^c)) - exp(-NLL(o*))``.
* The overall score **S** is the harmonic mean of ES, PS and NS: :func:`harmonic_mean`.

The inequalities are strict, so a tie counts as a failure. Scores are averaged over a case's
prompts and then over cases (each case weighs the same), as ROME's summaries do.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Iterable, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["probability_comparison", "harmonic_mean", "ProbabilityComparison"]

Expect = Literal["new", "true"]


def probability_comparison(nll_new: Tensor, nll_true: Tensor, expect: Expect) -> tuple[float, float] | None:
    """Success rate and magnitude of one edit case under the CounterFact protocol (Meng et al.).

    ``nll_new[i]`` and ``nll_true[i]`` are prompt ``i``'s per-token-averaged negative
    log-likelihoods of the new and of the true target.

    With ``expect="new"`` (ES/EM on the edit prompt, PS/PM on paraphrases) the success is the
    fraction of prompts with ``nll_new < nll_true`` and the magnitude the mean over prompts of
    ``exp(-nll_new) - exp(-nll_true)``. With ``expect="true"`` (NS/NM on neighborhood prompts) the
    success is the fraction with ``nll_true < nll_new`` and the magnitude the mean of
    ``exp(-nll_true) - exp(-nll_new)``. Ties count as failures.

    Returns ``(success, magnitude)``, or ``None`` when the case has no prompts.
    """
    if expect not in ("new", "true"):
        raise ValueError(f"expect must be 'new' or 'true', got {expect!r}")
    # float64 on the CPU: a handful of numbers per case, and the values go into per-case records
    new = torch.as_tensor(nll_new).detach().to("cpu", torch.float64)
    true = torch.as_tensor(nll_true).detach().to("cpu", torch.float64)
    if new.ndim != 1 or new.shape != true.shape:
        raise ValueError(f"expected two 1-D tensors of equal length, got shapes {tuple(new.shape)} and {tuple(true.shape)}")
    if new.numel() == 0:
        return None
    wanted, other = (new, true) if expect == "new" else (true, new)
    success = (wanted < other).double().mean().item()
    magnitude = (torch.exp(-wanted) - torch.exp(-other)).mean().item()
    return success, magnitude


def harmonic_mean(values: Iterable[float | Tensor]) -> float:
    """The harmonic mean ``n / sum(1 / v)``: CounterFact's overall score S of (ES, PS, NS)
    (Meng et al., 2022).

    Returns ``nan`` if any value is ``nan`` (checked first), and ``0.0`` if any value is 0 (the
    limit of the formula). Raises ``ValueError`` for no values or a negative value.
    """
    floats = [float(v) for v in values]
    if not floats:
        raise ValueError("harmonic_mean of no values")
    if any(math.isnan(v) for v in floats):
        return float("nan")
    if any(v < 0 for v in floats):
        raise ValueError(f"harmonic_mean is defined for non-negative values, got {floats}")
    if any(v == 0 for v in floats):
        return 0.0
    return len(floats) / sum(1.0 / v for v in floats)


class ProbabilityComparison(Metric):
    """Mean over edit cases of :func:`probability_comparison` (ROME/MEMIT's ES, PS, NS and their
    magnitudes; Meng et al., 2022, 2023).

    ``expect="new"`` for efficacy and paraphrase prompts, ``expect="true"`` for neighborhood
    prompts. Call ``update(nll_new, nll_true)`` once per edit case; a case without prompts is
    skipped. ``compute()`` returns ``{"success": ..., "magnitude": ...}``, both ``nan`` when no case
    was counted. States are sums reduced by summation, so they sync across processes and merge
    with :meth:`~torchmetrics.Metric.merge_state`.
    """

    case_score = staticmethod(probability_comparison)  # (success, magnitude) of one case

    protocol: ClassVar[str] = "probability"
    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool] = True
    full_state_update: ClassVar[bool] = False

    success_sum: Tensor
    magnitude_sum: Tensor
    cases: Tensor

    def __init__(self, expect: Expect, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if expect not in ("new", "true"):
            raise ValueError(f"expect must be 'new' or 'true', got {expect!r}")
        self.expect = expect
        self.add_state("success_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("magnitude_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cases", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_new: Tensor, nll_true: Tensor) -> None:
        scores = probability_comparison(nll_new, nll_true, self.expect)
        if scores is None:
            return
        success, magnitude = scores
        self.success_sum += success
        self.magnitude_sum += magnitude
        self.cases += 1

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """As :meth:`torchmetrics.Metric.merge_state`, refusing a metric that expects the other
        target (an NS state must not be added to an ES state)."""
        if isinstance(incoming_state, ProbabilityComparison) and incoming_state.expect != self.expect:
            raise ValueError(f"cannot merge a metric with expect={incoming_state.expect!r} into one with expect={self.expect!r}")
        super().merge_state(incoming_state)

    def compute(self) -> dict[str, Tensor]:
        if self.cases == 0:
            nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.success_sum.device)
            return {"success": nan, "magnitude": nan.clone()}
        return {"success": self.success_sum / self.cases, "magnitude": self.magnitude_sum / self.cases}
