"""Fluency of generated text as n-gram entropy (the ROME generation protocol).

Meng et al. (2022), "Locating and Editing Factual Associations in GPT" (ROME), measure whether an
edited model still writes varied text, rather than repeating itself, by the entropy of the n-gram
distribution of its generations: for each ``n`` in ``(2, 3)`` the entropy in bits of the
relative n-gram frequencies, ``H_n = -sum_g p(g) log2 p(g)``, weighted by ``(2/3, 4/3)``, and the
arithmetic mean of the weighted entropies. Degenerate, repetitive text has few distinct n-grams
and so a low score.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, ClassVar, Sequence

from factedit.metrics.base import CaseAverage

__all__ = ["word_tokenize", "ngram_entropy", "mean_ngram_entropy", "NGramEntropy"]

_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Split ``text`` into runs of word characters and single punctuation marks, keeping case.

    This approximates the NLTK ``word_tokenize`` that ROME uses (also without lower-casing); it
    differs on contractions (``"don't"`` gives ``don ' t`` here, ``do n't`` in NLTK) and on
    multi-character punctuation such as ``...``, which is split into single marks here.
    """
    return _WORD.findall(text)


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum((c / total) * math.log2(c / total) for c in counts.values())


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Weighted n-gram entropy of one text (ROME's generation entropy; Meng et al., 2022).

    The text is split by :func:`word_tokenize`. For each ``n`` the n-grams' relative frequencies
    ``p`` give the entropy ``H_n = -sum p log2 p`` in bits; the result is the arithmetic mean over
    ``n`` of ``weight_n * H_n``. A text with fewer than ``n`` words has no n-grams and contributes
    ``H_n = 0`` (as in ROME, where the empty frequency table sums to zero).
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError(f"need one weight per n, got ns={tuple(ns)} and weights={tuple(weights)}")
    words = word_tokenize(text)
    weighted = []
    for n, weight in zip(ns, weights):
        if n < 1:
            raise ValueError(f"n-gram order must be positive, got {n}")
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        weighted.append(weight * (_entropy_bits(grams) if grams else 0.0))
    return sum(weighted) / len(weighted)


def mean_ngram_entropy(
    texts: Sequence[str], ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float | None:
    """Fluency of one edit case: the mean of :func:`ngram_entropy` over the case's generated
    texts, or ``None`` when there are none."""
    if isinstance(texts, str):
        raise TypeError("expected a sequence of generated texts, got a single string")
    if len(texts) == 0:
        return None
    return sum(ngram_entropy(text, ns, weights) for text in texts) / len(texts)


class NGramEntropy(CaseAverage):
    """Mean over edit cases of :func:`mean_ngram_entropy` (ROME's fluency; Meng et al., 2022).

    Call ``update(texts)`` once per edit case with that case's generated texts. A case without
    texts is skipped; ``compute()`` returns ``nan`` when no case was counted. The states are a sum
    and a count reduced by summation, so they sync across processes and merge with
    :meth:`~torchmetrics.Metric.merge_state`.
    """

    case_score = staticmethod(mean_ngram_entropy)

    protocol: ClassVar[str] = "generation"

    def __init__(self, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(ns) != len(weights) or not ns:
            raise ValueError(f"need one weight per n, got ns={tuple(ns)} and weights={tuple(weights)}")
        self.ns = tuple(ns)
        self.weights = tuple(weights)

    def update(self, texts: Sequence[str]) -> None:
        self._add_case(mean_ngram_entropy(texts, self.ns, self.weights))
