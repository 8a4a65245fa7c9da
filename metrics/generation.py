"""Scores of greedily generated answers (the generation protocol).

Teacher-forced token accuracy feeds the model the answer it is scored on: each position is
predicted from the *true* answer tokens before it, so the score leaks the answer's length and its
prefix, and an edited model can score well on it without ever producing the answer. Yang et al.
(2025), "The Mirage of Model Editing: Revisiting Evaluation in the Wild", show that edits judged
by teacher forcing fail far more often when the model has to generate the answer itself. These
scores read what the model *generates* after the prompt (greedy decoding, the prompt not fed the
answer) and compare it with the accepted answers:

* **exact match** (:func:`generation_exact_match`): the normalised continuation starts with a
  normalised accepted answer, as a whole word sequence (``"rome is"`` starts with ``"rome"``;
  ``"romeo"`` does not);
* **containment** (:func:`generation_contains`): a normalised accepted answer occurs, as whole
  words, anywhere in the normalised continuation.

Normalisation (:func:`normalize_answer`) is the one of SQuAD's evaluation script (Rajpurkar et
al., 2016, "SQuAD: 100,000+ Questions for Machine Comprehension of Text"): lower-case, drop
punctuation and the articles *a*, *an*, *the*, and collapse whitespace. A prompt with several
accepted answers (aliases) counts as matched when any of them matches.

A prompt scores 1 or 0, an edit case scores the mean over its prompts, and a metric's
``compute()`` is the mean over edit cases (a macro average, as the token metrics do). The
functions score one case and are what per-case records store; each ``Metric.update`` calls the
function, so the per-case values and the aggregate can never disagree.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Callable, ClassVar, Sequence

from factedit.metrics.base import CaseAverage

__all__ = [
    "normalize_answer",
    "answer_matches",
    "answer_occurs",
    "generation_exact_match",
    "generation_contains",
    "GenerationExactMatch",
    "GenerationContains",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)

Answers = str | Sequence[str]


def _is_punctuation(char: str) -> bool:
    return char in _PUNCTUATION or unicodedata.category(char).startswith("P")


def normalize_answer(text: str, articles: bool = True) -> str:
    """SQuAD-style normalisation: lower-case, no punctuation, no articles, single spaces.

    ``articles=False`` keeps the articles (used for an answer that is nothing but an article,
    such as the letter answer ``"A"``, which would otherwise normalise to nothing).
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    text = "".join(char for char in text.lower() if not _is_punctuation(char))
    if articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _normalised_pair(continuation: str, answer: str) -> tuple[str, str]:
    """Continuation and answer normalised alike; articles are kept when the answer is only articles."""
    target = normalize_answer(answer)
    if target:
        return normalize_answer(continuation), target
    target = normalize_answer(answer, articles=False)
    if not target:
        raise ValueError(f"answer {answer!r} has nothing left to match once punctuation is removed")
    return normalize_answer(continuation, articles=False), target


def answer_matches(continuation: str, answer: str) -> bool:
    """Whether the normalised ``continuation`` starts with the normalised ``answer`` (whole words)."""
    text, target = _normalised_pair(continuation, answer)
    return text == target or text.startswith(target + " ")


def answer_occurs(continuation: str, answer: str) -> bool:
    """Whether the normalised ``answer`` occurs in the normalised ``continuation`` (whole words)."""
    text, target = _normalised_pair(continuation, answer)
    return f" {target} " in f" {text} "


def _mean_over_prompts(continuations: Sequence[str], answers: Sequence[Answers], match: Callable[[str, str], bool]) -> float | None:
    if isinstance(continuations, str):
        raise TypeError("expected a sequence of continuations (one per prompt), got a single string")
    if len(continuations) != len(answers):
        raise ValueError(f"got {len(continuations)} continuations but {len(answers)} answer sets; they must pair up prompt by prompt")
    if len(continuations) == 0:
        return None
    hits = 0
    for index, (text, accepted) in enumerate(zip(continuations, answers)):
        options = (accepted,) if isinstance(accepted, str) else tuple(accepted)
        if not options:
            raise ValueError(f"prompt {index} has no accepted answer to compare with")
        if not isinstance(text, str):
            raise TypeError(f"prompt {index}: expected the continuation as a string, got {type(text).__name__}")
        hits += any(match(text, option) for option in options)
    return hits / len(continuations)


def generation_exact_match(continuations: Sequence[str], answers: Sequence[Answers]) -> float | None:
    """Exact match of one edit case's generated answers (Yang et al., 2025; SQuAD normalisation).

    ``continuations[i]`` is the text the model generated after prompt ``i`` (the prompt itself
    excluded) and ``answers[i]`` the accepted answer, or a sequence of accepted answers (aliases).
    A prompt scores 1 when the normalised continuation starts with any normalised accepted answer
    as whole words; the case scores the mean over its prompts.

    Returns ``None`` when the case has no prompts. Raises ``ValueError`` when the two sequences
    differ in length or a prompt has no accepted answer.
    """
    return _mean_over_prompts(continuations, answers, answer_matches)


def generation_contains(continuations: Sequence[str], answers: Sequence[Answers]) -> float | None:
    """Containment of one edit case's generated answers: a prompt scores 1 when any normalised
    accepted answer occurs, as whole words, anywhere in its normalised continuation; the case
    scores the mean over its prompts. ``None`` and errors as :func:`generation_exact_match`."""
    return _mean_over_prompts(continuations, answers, answer_occurs)


class _GenerationProtocol(CaseAverage):
    protocol: ClassVar[str] = "generation"


class GenerationExactMatch(_GenerationProtocol):
    """Mean over edit cases of :func:`generation_exact_match` (Yang et al., 2025).

    Call ``update(continuations, answers)`` once per edit case. A case without prompts is
    skipped; ``compute()`` is ``nan`` when no case was counted.
    """

    case_score = staticmethod(generation_exact_match)

    def update(self, continuations: Sequence[str], answers: Sequence[Answers]) -> None:
        self._add_case(generation_exact_match(continuations, answers))


class GenerationContains(_GenerationProtocol):
    """Mean over edit cases of :func:`generation_contains` (Yang et al., 2025).

    Call ``update(continuations, answers)`` once per edit case. A case without prompts is
    skipped; ``compute()`` is ``nan`` when no case was counted.
    """

    case_score = staticmethod(generation_contains)

    def update(self, continuations: Sequence[str], answers: Sequence[Answers]) -> None:
        self._add_case(generation_contains(continuations, answers))
