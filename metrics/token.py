"""Token-level, teacher-forced scores (the EasyEdit protocol).

Zhang et al. (2024), "A Comprehensive Study of Knowledge Editing for Large Language Models",
score an edit by feeding the prompt followed by the answer to the model (teacher forcing) and
taking the argmax prediction at every answer position:

* **reliability** (the edit prompt), **generalization** (its rephrasings) and **portability**
  (questions whose answer should follow from the edit) are the fraction of answer positions where
  the argmax equals the answer token: :func:`token_accuracy`, :class:`TokenAccuracy`;
* **locality** is the fraction of answer positions where the edited model's argmax equals the
  unedited model's argmax on unrelated prompts: :func:`locality_agreement`,
  :class:`LocalityAgreement`.

A prompt's score is the mean over its answer positions, an edit case's score is the mean over its
prompts, and a metric's ``compute()`` is the mean over edit cases (a macro average: every case
weighs the same however many prompts or tokens it has).

The functions score one case and are what per-case records store; each ``Metric.update`` calls
the function, so the per-case values and the aggregate can never disagree.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import Tensor
from factedit.metrics.base import CaseAverage

__all__ = ["token_accuracy", "locality_agreement", "TokenAccuracy", "LocalityAgreement"]


def _mean_positionwise_agreement(first: Sequence[Tensor], second: Sequence[Tensor], names: tuple[str, str]) -> float | None:
    """Mean over prompts of the fraction of positions where ``first[i]`` equals ``second[i]``."""
    if len(first) != len(second):
        raise ValueError(f"got {len(first)} {names[0]} but {len(second)} {names[1]}; they must pair up prompt by prompt")
    if len(first) == 0:
        return None
    prompt_scores = []
    for index, (a, b) in enumerate(zip(first, second)):
        a = torch.as_tensor(a)
        b = torch.as_tensor(b, device=a.device)
        if a.ndim != 1 or b.ndim != 1:
            raise ValueError(f"prompt {index}: expected 1-D token ids, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
        if a.shape != b.shape:
            raise ValueError(f"prompt {index}: {names[0]} has {a.numel()} positions but {names[1]} has {b.numel()}")
        if a.numel() == 0:
            raise ValueError(f"prompt {index} has no answer positions to score")
        prompt_scores.append(int(torch.eq(a, b).sum().item()) / a.numel())
    return sum(prompt_scores) / len(prompt_scores)


def token_accuracy(predictions: Sequence[Tensor], targets: Sequence[Tensor]) -> float | None:
    """Teacher-forced token accuracy of one edit case (EasyEdit; Zhang et al., 2024).

    ``predictions[i]`` holds the model's argmax token ids at the answer positions of prompt ``i``
    (the answer fed in as context, so position ``t`` is predicted from the true tokens before it)
    and ``targets[i]`` the answer's token ids. A prompt scores the fraction of positions where
    prediction and target are equal; the case scores the mean of its prompts' scores.

    Returns ``None`` when the case has no prompts (nothing to score). Raises ``ValueError`` when
    the two sequences differ in length, when a pair differs in shape or is not 1-D, or when a
    prompt has no answer positions.
    """
    return _mean_positionwise_agreement(predictions, targets, ("predictions", "targets"))


def locality_agreement(post_predictions: Sequence[Tensor], pre_predictions: Sequence[Tensor]) -> float | None:
    """Locality of one edit case as EasyEdit measures it (Zhang et al., 2024).

    ``post_predictions[i]`` and ``pre_predictions[i]`` are the argmax token ids at the answer
    positions of unrelated prompt ``i``, from the edited and from the unedited model, both under
    teacher forcing with the same answer. A prompt scores the fraction of positions where the two
    agree (1.0: the edit left this prompt untouched); the case scores the mean over its prompts.

    Returns ``None`` when the case has no locality prompts; raises ``ValueError`` on mismatched
    inputs as :func:`token_accuracy` does.
    """
    return _mean_positionwise_agreement(post_predictions, pre_predictions, ("post-edit predictions", "pre-edit predictions"))


class _TokenProtocol(CaseAverage):
    protocol: ClassVar[str] = "token"


class TokenAccuracy(_TokenProtocol):
    """Mean over edit cases of :func:`token_accuracy` (EasyEdit's reliability, generalization
    and portability; Zhang et al., 2024).

    Call ``update(predictions, targets)`` once per edit case with that case's prompts. A case
    without prompts is skipped; ``compute()`` is ``nan`` when every case was skipped or none was
    given.
    """

    case_score = staticmethod(token_accuracy)  # the per-case score this metric averages

    def update(self, predictions: Sequence[Tensor], targets: Sequence[Tensor]) -> None:
        self._add_case(self.case_score(predictions, targets))


class LocalityAgreement(_TokenProtocol):
    """Mean over edit cases of :func:`locality_agreement` (EasyEdit's locality; Zhang et al.,
    2024).

    Call ``update(post_predictions, pre_predictions)`` once per edit case. A case without
    locality prompts is skipped; ``compute()`` is ``nan`` when no case was counted.
    """

    case_score = staticmethod(locality_agreement)

    def update(self, post_predictions: Sequence[Tensor], pre_predictions: Sequence[Tensor]) -> None:
        self._add_case(self.case_score(post_predictions, pre_predictions))
