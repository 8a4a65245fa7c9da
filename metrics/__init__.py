"""Scores of an edit, each a torchmetrics ``Metric`` with a pure per-case function beside it.

Every metric class names the protocol that produced its number in ``protocol``:

* ``"token"``: teacher-forced token accuracy (EasyEdit; Zhang et al., 2024):
  :class:`TokenAccuracy`, :class:`LocalityAgreement`;
* ``"probability"``: new-vs-true target likelihood comparison (ROME/MEMIT's CounterFact
  protocol; Meng et al., 2022, 2023): :class:`ProbabilityComparison`, :func:`harmonic_mean`;
* ``"generation"``: scores of generated text: ROME's n-gram entropy (:class:`NGramEntropy`) and
  greedily generated answers matched against the accepted ones (Yang et al., 2025):
  :class:`GenerationExactMatch`, :class:`GenerationContains`.

Scores from different protocols measure different things and are never averaged together;
:data:`SCORES` is the one table of the scores (key, metric class, meaning, name); :data:`PROTOCOLS`
says which protocol each summary key belongs to (``"efficiency"`` for the
cost of editing, which is not a quality score).

Each ``update`` takes one edit case; a case's score is the mean over its prompts and ``compute()``
is the mean over cases (a macro average, as EasyEdit and ROME report). Cases with nothing to score
are skipped, and ``compute()`` with no counted case returns ``nan``.
"""

from factedit import require_namespace

require_namespace(__name__)

from factedit.metrics.fluency import NGramEntropy, mean_ngram_entropy, ngram_entropy, word_tokenize
from factedit.metrics.generation import (
    GenerationContains,
    GenerationExactMatch,
    generation_contains,
    generation_exact_match,
    normalize_answer,
)
from factedit.metrics.probability import ProbabilityComparison, harmonic_mean, probability_comparison
from factedit.metrics.scores import COSTS, GENERATION_GROUPS, PORTABILITY_KIND_PREFIX, SCORES, Score, score_of
from factedit.metrics.token import LocalityAgreement, TokenAccuracy, locality_agreement, token_accuracy

PROTOCOLS: dict[str, str] = {**{score.key: score.protocol for score in SCORES}, **{key: "efficiency" for key in COSTS}}
"""Summary key -> the protocol that produced it (``token``, ``probability``, ``generation`` or
``efficiency``), read from :data:`SCORES`: each row's metric class names its protocol."""


def protocol_of(key: str) -> str:
    """The protocol of a summary key (``pre_``/``median_`` prefixes ignored): :data:`PROTOCOLS`,
    ``token`` for any per-kind portability key, ``efficiency`` for costs, else ``unknown``."""
    base = key.removeprefix("pre_").removeprefix("median_")
    if base in PROTOCOLS:
        return PROTOCOLS[base]
    if base.startswith(PORTABILITY_KIND_PREFIX):
        return "token"
    return "efficiency" if "seconds" in base or "memory" in base else "unknown"


__all__ = [
    "COSTS",
    "GENERATION_GROUPS",
    "SCORES",
    "Score",
    "score_of",
    "PROTOCOLS",
    "PORTABILITY_KIND_PREFIX",
    "protocol_of",
    "GenerationExactMatch",
    "GenerationContains",
    "generation_exact_match",
    "generation_contains",
    "normalize_answer",
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
