"""The kinds of raw measurement a case holds, and how each becomes the arguments of a score's
per-case function: a row of the score table (:data:`factedit.metrics.SCORES`) names the kind and
the prompt group it ``reads``."""

from __future__ import annotations

from typing import Any, Callable

import torch


def _ids(items: list[dict[str, Any]], key: str) -> list[torch.Tensor]:
    return [torch.tensor(item[key], dtype=torch.long) for item in items]


def token_pairs(items: list[dict[str, Any]]) -> tuple:
    """Predicted and target token ids of each of the probes ``items`` (token protocol)."""
    return _ids(items, "pred"), _ids(items, "target")


def _token_pairs(raw: dict[str, Any], reference: dict[str, Any] | None, group: str) -> tuple | None:
    return token_pairs(raw[group]) if group in raw else None


def _agreement(raw: dict[str, Any], reference: dict[str, Any] | None, group: str) -> tuple | None:
    """Predicted token ids of each probe now and on the unedited model (exists only with it)."""
    if reference is None or group not in raw:
        return None
    return _ids(raw[group], "pred"), _ids(reference[group], "pred")


def _nll_pairs(raw: dict[str, Any], reference: dict[str, Any] | None, group: str) -> tuple | None:
    """The new and the true target's negative log-likelihoods (probability protocol)."""
    if group not in raw:
        return None
    return torch.tensor(raw[group]["nll_new"]), torch.tensor(raw[group]["nll_true"])


def _texts(raw: dict[str, Any], reference: dict[str, Any] | None, group: str) -> tuple | None:
    """Generated texts."""
    return (raw[group]["texts"],) if group in raw else None


def _answers(raw: dict[str, Any], reference: dict[str, Any] | None, group: str) -> tuple | None:
    """Greedy answers and the answers each accepts (generation scoring)."""
    if "generation" not in raw:
        return None
    items = raw["generation"].get(group, [])
    return [item["text"] for item in items], [item["answers"] for item in items]


MEASUREMENTS: dict[str, Callable[[dict[str, Any], dict[str, Any] | None, str], tuple | None]] = {
    "tokens": _token_pairs,
    "agreement": _agreement,
    "probabilities": _nll_pairs,
    "texts": _texts,
    "generation": _answers,
}
"""The kinds of raw measurement a score's row ``reads``: each maps a case's raw measurements (and
the unedited model's) to the arguments of the row's ``case_score``, or None when the case was not
measured that way."""
