"""The edit budget of a sequential run: how many edits it takes before general abilities degrade.

Each general-ability task is represented by a *headline* metric (:func:`headline`); the budget is
the first checkpoint at which some task's headline score is worse than its unedited score by more
than a relative threshold (:func:`edit_budget`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence, Union

from ..general.tasks import HEADLINE as TASK_HEADLINES

HEADLINE_PREFERENCE = (
    "acc_norm",
    "acc",
    "exact_match",
    "mc2",
    "mc1",
    "word_perplexity",
    "perplexity",
    "bits_per_byte",
    "refusal_rate",
    "over_refusal",
)
"""Metrics that represent a task, best first (:func:`headline`)."""

LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "over_refusal")
"""A metric whose name contains one of these is better when lower."""

BOUND_SLACK = 1e-9
"""Relative slack when comparing a score with its tolerance bound, so that a score written exactly
at the bound (0.324 against 0.9 × 0.36) counts as within tolerance despite binary rounding."""

Checkpoint = Mapping[str, Any]
HeadlineMap = Mapping[str, Union[str, Sequence[str]]]


# -- headline metric and edit budget ---------------------------------------------------------------
def direction_of(metric: str) -> str:
    """``"lower"`` for perplexities, bits per byte and over-refusal, ``"higher"`` for everything else."""
    return "lower" if any(part in metric for part in LOWER_IS_BETTER) else "higher"


def number(value: Any) -> float | None:
    """A score as a float; ``None`` for a missing or non-numeric value (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def headline(task: str, metrics: Mapping[str, Any], overrides: HeadlineMap | None = None) -> tuple[str, str]:
    """The metric that represents ``task`` and whether ``"higher"`` or ``"lower"`` is better.

    ``overrides`` maps a task to a metric name, or to ``(metric, direction)``; a task not in it
    takes the headline of its row in the task table (:data:`~factedit.evaluation.general.HEADLINE`)
    when it reports that metric; any other task (an lm-eval task of another name) follows the
    default rule: the first of :data:`HEADLINE_PREFERENCE` present in ``metrics``, else the first
    key with a numeric value (else the first key). Names containing ``perplexity``,
    ``bits_per_byte`` or ``over_refusal`` are ``"lower"``, all others ``"higher"``.
    """
    if overrides and task in overrides:
        choice = overrides[task]
        if isinstance(choice, str):
            metric, direction = choice, direction_of(choice)
        else:
            metric, direction = tuple(choice)
        if direction not in ("higher", "lower"):
            raise ValueError(f"headline override for {task!r}: direction must be 'higher' or 'lower', got {direction!r}")
        if metrics and metric not in metrics:
            raise ValueError(f"headline override for {task!r} names {metric!r}, which the task does not report (it has {sorted(metrics)})")
        return metric, direction
    if not metrics:
        raise ValueError(f"task {task!r} reports no metrics")
    if task in TASK_HEADLINES and TASK_HEADLINES[task][0] in metrics:
        return TASK_HEADLINES[task]
    for metric in HEADLINE_PREFERENCE:
        if metric in metrics:
            return metric, direction_of(metric)
    numeric = [key for key, value in metrics.items() if number(value) is not None]
    metric = numeric[0] if numeric else next(iter(metrics))
    return metric, direction_of(metric)


def tolerance_bound(base: float, direction: str, threshold: float) -> float:
    """The worst score still within ``threshold`` (relative) of ``base``.

    ``(1 - threshold) * base`` for a higher-is-better metric, ``(1 + threshold) * base`` for a
    lower-is-better one (with ``|base|``, so a negative base also moves in the worse direction).
    """
    step = threshold * abs(base)
    return base - step if direction == "higher" else base + step


def crossed(value: float, bound: float, direction: str) -> bool:
    """Whether ``value`` is worse than ``bound``; exactly at the bound is within tolerance.

    A non-finite score (a NaN accuracy, an infinite perplexity) means the model broke: crossed.
    """
    if not math.isfinite(value):
        return True
    if math.isclose(value, bound, rel_tol=BOUND_SLACK, abs_tol=BOUND_SLACK):
        return False
    return value < bound if direction == "higher" else value > bound


def mcnemar_worse(before: Sequence[float], after: Sequence[float]) -> float:
    """One-sided exact McNemar test on paired 0/1 item scores: the probability, if editing changed
    nothing, that at least as many items went from right to wrong among the items that changed
    (``b`` lost, ``c`` gained: ``P(X >= b)`` for ``X ~ Binomial(b + c, 1/2)``). 1.0 when no item changed."""
    lost = sum(1 for x, y in zip(before, after) if x > y)
    gained = sum(1 for x, y in zip(before, after) if y > x)
    changed = lost + gained
    if changed == 0:
        return 1.0
    return sum(math.comb(changed, k) for k in range(lost, changed + 1)) / 2.0**changed


def sign_flip_worse(before: Sequence[float], after: Sequence[float], direction: str = "higher", draws: int = 10_000, seed: int = 0) -> float:
    """One-sided paired permutation test for item scores that are not 0/1 (TruthfulQA MC2): the
    share of random sign flips of the per-item differences whose mean is at least as bad as the
    observed one (``draws`` flips from a seeded generator, plus the observed one)."""
    import numpy as np

    diffs = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    if direction == "lower":
        diffs = -diffs
    observed = diffs.mean()
    if not np.any(diffs):
        return 1.0
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(draws, diffs.size))
    as_bad = int(((signs * np.abs(diffs)).mean(axis=1) <= observed + 1e-12).sum())
    return (as_bad + 1) / (draws + 1)


def paired_p_value(before: Sequence[float], after: Sequence[float], direction: str) -> float:
    """The p-value that the item scores ``after`` are worse than ``before`` in ``direction``:
    exact McNemar for 0/1 scores, a sign-flip permutation test otherwise."""
    if len(before) != len(after):
        raise ValueError(f"paired item scores differ in length: {len(before)} before, {len(after)} after")
    if all(v in (0.0, 1.0) for v in (*before, *after)):
        if direction == "lower":  # a lower-is-better rate (over-refusal): rising is worse
            before, after = [1.0 - v for v in before], [1.0 - v for v in after]
        return mcnemar_worse(before, after)
    return sign_flip_worse(before, after, direction)


def at_chance(values: Sequence[float], chance: float, z: float = 1.96) -> bool:
    """Whether a task's unedited mean is not above ``chance`` with 95% confidence (mean minus
    ``z`` standard errors at or below it): such a task cannot show damage and is left out."""
    n = len(values)
    if n < 2:
        return True
    mean = sum(values) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean - z * stderr <= chance


def sorted_checkpoints(checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
    ordered = list(checkpoints)
    for index, checkpoint in enumerate(ordered):
        if not isinstance(checkpoint, Mapping) or isinstance(checkpoint.get("edits"), bool) or not isinstance(checkpoint.get("edits"), int):
            raise ValueError(f"checkpoint {index} has no integer 'edits': {checkpoint!r}")
    return sorted(ordered, key=lambda checkpoint: checkpoint["edits"])


def edit_budget(
    checkpoints: Sequence[Checkpoint], threshold: float = 0.1, headline_map: HeadlineMap | None = None, alpha: float | None = 0.05
) -> dict[str, Any]:
    """The number of edits a run takes before its general abilities degrade beyond ``threshold``.

    Each general-ability task is represented by its :func:`headline` metric. A task *crosses* at a
    checkpoint when its score is worse than the unedited (``edits == 0``) score by more than
    ``threshold`` relative to it: below ``(1 - threshold) * base`` for higher-is-better metrics,
    above ``(1 + threshold) * base`` for lower-is-better ones. Exactly at the bound is within
    tolerance; a non-finite score counts as crossed. Tasks missing at a checkpoint are not judged
    there, and a checkpoint without any general score is skipped.

    Returns a dict:

    * ``budget``: the edits of the first checkpoint where *any* task has crossed, or ``None`` if
      none does within the run;
    * ``last_safe``: the edits of the last judged checkpoint before it (0 if the first one after
      the unedited model already crosses; ``max_edits`` when the budget is never reached);
    * ``limiting``: the tasks that crossed at the budget checkpoint;
    * ``threshold``, ``max_edits`` (the last checkpoint's edits);
    * ``per_task``: task -> the edits where it first crossed, or ``None``;
    * ``base``: task -> unedited headline score; ``at_budget``: task -> score at the budget
      checkpoint (empty when the budget is not reached); ``headline``: task -> ``[metric,
      direction]``.

    Statistics, where the checkpoints hold each item's headline value (``general_item_scores``,
    written by ``edit.py`` since item scores are kept) and ``alpha`` is not ``None``:

    * a crossing counts only when the drop is also significant: a one-sided paired test of the
      checkpoint's items against the unedited model's (:func:`paired_p_value`: exact McNemar for
      right/wrong items, a sign-flip permutation test for others) gives ``p < alpha``;
    * a task whose unedited score is not above chance with 95% confidence (``general_chance``, the
      uniform guesser's score of multiple-choice tasks; :func:`at_chance`) is left out: MMLU on a
      135M model sits at chance and cannot show damage, only noise.

    The result then also holds ``alpha``, ``p_values`` (task -> the p-value at each judged
    checkpoint, by edits), ``at_chance`` (the tasks left out) and ``tested`` (the tasks judged with a
    test). Tasks without item scores are judged by the threshold alone, as before.

    How much to trust it: with about 100 items per task an accuracy has a standard error near
    0.05 (``sqrt(p (1 - p) / n)``, 0.05 at p = 0.5), the same size as a 10% threshold on an accuracy
    of 0.5. One checkpoint that dips just past the bound may therefore be noise, and a small budget
    from a small evaluation set should be reported as such, with ``per_task`` and the values, not
    smoothed away. More items per task, or a larger threshold, make the budget steadier.

    Raises ``ValueError`` when there is no checkpoint at ``edits == 0`` or it has no general scores.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    ordered = sorted_checkpoints(checkpoints)
    if not ordered:
        raise ValueError("no checkpoints: the edit budget needs at least the unedited model (edits == 0)")
    unedited = [checkpoint for checkpoint in ordered if checkpoint["edits"] == 0]
    if not unedited:
        raise ValueError(
            f"no checkpoint with edits == 0 (the unedited model); the edit budget is measured against it "
            f"(checkpoints start at {ordered[0]['edits']} edits)"
        )
    base_general = unedited[-1].get("general") or {}
    if not base_general:
        raise ValueError("the unedited checkpoint (edits == 0) has no general scores; the edit budget is measured against them")

    if alpha is not None and not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1) or None, got {alpha!r}")
    base_items = (unedited[-1].get("general_item_scores") or {}) if alpha is not None else {}
    chance = unedited[-1].get("general_chance") or {}

    # Item scores and chance levels are of each task's default headline metric: a task given another
    # one by ``headline_map`` is judged by the threshold alone.
    overridden = set(headline_map or ())
    heads: dict[str, tuple[str, str]] = {}
    base: dict[str, float] = {}
    bounds: dict[str, float] = {}
    left_out: list[str] = []
    for task, metrics in base_general.items():
        metric, direction = headline(task, metrics, headline_map)
        value = number(metrics.get(metric))
        if value is None or not math.isfinite(value):
            raise ValueError(f"the unedited checkpoint's {task} {metric} is {metrics.get(metric)!r}; a finite base score is needed")
        if task not in overridden and task in base_items and task in chance and direction == "higher" and at_chance(base_items[task], chance[task]):
            left_out.append(task)
            continue
        heads[task], base[task] = (metric, direction), value
        bounds[task] = tolerance_bound(value, direction, threshold)
    tested = sorted(task for task in heads if task in base_items and task not in overridden)
    p_values: dict[str, dict[int, float]] = {task: {} for task in tested}

    per_task: dict[str, int | None] = {task: None for task in heads}
    budget: int | None = None
    last_safe = 0
    limiting: list[str] = []
    at_budget: dict[str, float] = {}
    for checkpoint in ordered:
        edits = checkpoint["edits"]
        if edits == 0:
            continue
        general = checkpoint.get("general") or {}
        values = {}
        for task, (metric, _) in heads.items():
            value = number((general.get(task) or {}).get(metric))
            if value is not None:
                values[task] = value
        if not values:
            continue
        items = checkpoint.get("general_item_scores") or {}
        for task in tested:
            if task in values and len(items.get(task) or ()) == len(base_items[task]):
                p_values[task][edits] = paired_p_value(base_items[task], items[task], heads[task][1])
        failing = [
            task
            for task, value in values.items()
            if crossed(value, bounds[task], heads[task][1]) and (task not in tested or p_values[task].get(edits, 0.0) < alpha)
        ]
        for task in failing:
            if per_task[task] is None:
                per_task[task] = edits
        if budget is None:
            if failing:
                budget, limiting, at_budget = edits, failing, values
            else:
                last_safe = edits
    max_edits = ordered[-1]["edits"]
    if budget is None:
        last_safe = max_edits
    return {
        "budget": budget,
        "last_safe": last_safe,
        "limiting": limiting,
        "threshold": threshold,
        "max_edits": max_edits,
        "per_task": per_task,
        "base": base,
        "at_budget": at_budget,
        "headline": {task: list(head) for task, head in heads.items()},
        **({"alpha": alpha, "p_values": p_values, "at_chance": left_out, "tested": tested} if alpha is not None and (tested or left_out) else {}),
    }
