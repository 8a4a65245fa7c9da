"""Scores of an edit, each a torchmetrics ``Metric`` with a pure per-case function beside it.

Every metric class names the protocol that produced its number in ``protocol``:

* ``"token"``: teacher-forced token accuracy (EasyEdit; Zhang et al., 2024):
  :class:`TokenAccuracy`, :class:`LocalityAgreement`;
* ``"probability"``: new-vs-true target likelihood comparison (ROME/MEMIT's CounterFact
  protocol; Meng et al., 2022, 2023): :class:`ProbabilityComparison`, :func:`harmonic_mean`;
* ``"generation"``: scores of generated text (ROME's n-gram entropy): :class:`NGramEntropy`.

Scores from different protocols measure different things and are never averaged together;
:data:`PROTOCOLS` says which protocol each summary key belongs to (``"efficiency"`` for the
cost of editing, which is not a quality score).

Each ``update`` takes one edit case; a case's score is the mean over its prompts and ``compute()``
is the mean over cases (a macro average, as EasyEdit and ROME report). Cases with nothing to score
are skipped, and ``compute()`` with no counted case returns ``nan``.
"""

from metrics.fluency import NGramEntropy, mean_ngram_entropy, ngram_entropy, word_tokenize
from metrics.probability import ProbabilityComparison, harmonic_mean, probability_comparison
from metrics.token import LocalityAgreement, TokenAccuracy, locality_agreement, token_accuracy

PROTOCOLS: dict[str, str] = {
    "reliability": "token",
    "generalization": "token",
    "locality": "token",
    "portability": "token",
    "es": "probability",
    "ps": "probability",
    "ns": "probability",
    "score": "probability",
    "em": "probability",
    "pm": "probability",
    "nm": "probability",
    "fluency": "generation",
    "seconds_per_edit": "efficiency",
    "peak_memory_mb": "efficiency",
}
"""Summary key -> the protocol that produced it (``token``, ``probability``, ``generation`` or
``efficiency``)."""

__all__ = [
    "PROTOCOLS",
    "TokenAccuracy",
    "LocalityAgreement",
    "ProbabilityComparison",
    "NGramEntropy",
    "token_accuracy",
    "locality_agreement",
    "probability_comparison",
    "harmonic_mean",
    "ngram_entropy",
    "mean_ngram_entropy",
    "word_tokenize",
]
