"""The one table of scores: every summary key a run reports, the torchmetrics class that
accumulates it (whose ``protocol`` says which protocol produced it, and whose ``case_score`` is
the per-case function), what it means, and its name in tables and figures.

Per-case scores (``evaluation.scoring.case_scores``), the run's accumulators
(``evaluation.scoring.RunMetrics``), the protocol of each key (:data:`PROTOCOLS`) and the printed
report (``evaluation.report``) all iterate :data:`SCORES`. To add a score: a row here, a metric
class with ``protocol`` and ``case_score`` when no existing one computes it; the row's ``reads``
names the raw measurement it is computed from (a new kind of measurement is taken in
``evaluation.scoring``, and read by a function listed in ``evaluation.measurements.MEASUREMENTS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from torchmetrics import Metric

from .fluency import NGramEntropy
from .generation import GenerationContains, GenerationExactMatch
from .probability import ProbabilityComparison
from .token import LocalityAgreement, TokenAccuracy

PORTABILITY_KIND_PREFIX = "portability_"
"""Per-kind portability keys are ``portability_<kind in lower snake case>`` (token protocol)."""

GENERATION_GROUPS = ("reliability", "generalization", "portability")
"""The prompt groups whose greedy answers are scored (``gen_<group>_<em|contains>``)."""


@dataclass(frozen=True)
class Score:
    """One summary key.

    key: the key in ``summary.json`` and ``cases.jsonl``.
    metric: the torchmetrics class that accumulates it over cases; for a key derived from other
        scores, the class of those scores (it gives the protocol).
    meaning: what the number measures, as the report prints it.
    label: its name in a table or figure of a paper.
    options: constructor arguments of ``metric`` (and of its ``case_score``).
    magnitude: the key of the magnitude a probability comparison reports beside its success rate.
    derived: computed from other scores (magnitudes, S), no accumulator of its own.
    post_only: measured after editing only (locality: agreement with the unedited model).
    reads: ``(kind, group)``: the raw measurement of a case that ``case_score`` receives, by its
        kind (``evaluation.measurements.MEASUREMENTS``: ``tokens``, ``agreement``, ``probabilities``,
        ``texts``, ``generation``) and the prompt group it was taken on; None for a derived key.
    """

    key: str
    metric: type[Metric]
    meaning: str
    label: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    magnitude: str | None = None
    derived: bool = False
    post_only: bool = False
    reads: tuple[str, str] | None = None

    @property
    def protocol(self) -> str:
        return self.metric.protocol

    def accumulator(self) -> Metric:
        return self.metric(**self.options)

    def case_score(self, *args: Any) -> Any:
        return self.metric.case_score(*args, **self.options)


def _generation(group: str, score: str, metric: type[Metric], meaning: str, label: str) -> Score:
    return Score(f"gen_{group}_{score}", metric, meaning, label, reads=("generation", group))


SCORES: tuple[Score, ...] = (
    Score("reliability", TokenAccuracy, "edit prompt, new target: token accuracy", "Reliability", reads=("tokens", "reliability")),
    Score("generalization", TokenAccuracy, "rephrased prompts: token accuracy", "Generalization", reads=("tokens", "generalization")),
    Score("locality", LocalityAgreement, "unrelated prompts: agreement with unedited model", "Locality", post_only=True, reads=("agreement", "locality")),
    Score("portability", TokenAccuracy, "questions that follow from the edit: token accuracy", "Portability", reads=("tokens", "portability")),
    Score("es", ProbabilityComparison, "efficacy: P(new) > P(true) on edit prompt", "Efficacy (ES)", MappingProxyType({"expect": "new"}), magnitude="em", reads=("probabilities", "es")),
    Score("ps", ProbabilityComparison, "paraphrase: P(new) > P(true)", "Paraphrase (PS)", MappingProxyType({"expect": "new"}), magnitude="pm", reads=("probabilities", "ps")),
    Score("ns", ProbabilityComparison, "neighborhood: P(true) > P(new)", "Neighborhood (NS)", MappingProxyType({"expect": "true"}), magnitude="nm", reads=("probabilities", "ns")),
    Score("score", ProbabilityComparison, "S = harmonic mean of ES, PS, NS", "Score (S)", derived=True),
    Score("em", ProbabilityComparison, "efficacy magnitude P(new) - P(true)", "Efficacy magn. (EM)", derived=True),
    Score("pm", ProbabilityComparison, "paraphrase magnitude", "Paraphrase magn. (PM)", derived=True),
    Score("nm", ProbabilityComparison, "neighborhood magnitude P(true) - P(new)", "Neighborhood magn. (NM)", derived=True),
    Score("fluency", NGramEntropy, "n-gram entropy of generations", "Fluency", reads=("texts", "fluency")),
    _generation("reliability", "em", GenerationExactMatch, "edit prompt: greedy answer starts with new target", "Gen. reliability (exact)"),
    _generation("reliability", "contains", GenerationContains, "edit prompt: greedy answer contains new target", "Gen. reliability (contains)"),
    _generation("generalization", "em", GenerationExactMatch, "rephrased prompts: greedy answer starts with new target", "Gen. generalization (exact)"),
    _generation("generalization", "contains", GenerationContains, "rephrased prompts: greedy answer contains new target", "Gen. generalization (contains)"),
    _generation("portability", "em", GenerationExactMatch, "portability: greedy answer starts with an accepted answer", "Gen. portability (exact)"),
    _generation("portability", "contains", GenerationContains, "portability: greedy answer contains an accepted answer", "Gen. portability (contains)"),
)

BY_KEY: Mapping[str, Score] = MappingProxyType({score.key: score for score in SCORES})

COSTS: Mapping[str, str] = MappingProxyType({"seconds_per_edit": "Seconds / edit", "peak_memory_mb": "Peak memory (MB)"})
"""The cost keys (protocol ``efficiency``, not quality scores) and their names."""


def score_of(key: str) -> Score:
    """The row of ``key``; a per-kind portability key (``portability_multi_hop``) gets a
    token-accuracy row of its own."""
    if key in BY_KEY:
        return BY_KEY[key]
    if key.startswith(PORTABILITY_KIND_PREFIX):
        kind = key.removeprefix(PORTABILITY_KIND_PREFIX).replace("_", " ")
        return Score(key, TokenAccuracy, f"portability, {kind} probes: token accuracy", f"Portability ({kind})", reads=("tokens", "portability"))
    raise KeyError(f"no score {key!r}; known: {', '.join(BY_KEY)}")
