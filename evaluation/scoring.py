"""Scoring one edit case: the raw measurements, their per-case scores, and run-level metrics.

``measure_cases`` runs the model on every probe of a request and returns *raw* results (token ids
predicted under teacher forcing with their decoded text, per-token-averaged NLLs, generated
texts) as plain JSON data, one dict per case.
``case_scores`` turns raw results into the per-case numbers, and :class:`RunMetrics` feeds the
same raw results into torchmetrics objects for the summary. Pre- and post-edit numbers come from
this one path. The probes of several cases are measured together (:func:`measure_cases`), and
the runner measures the same cases together before and after editing, so pre and post forward
passes see identical padding and batch shapes.

Portability is scored over all of a case's probes (``portability``) and, when the probes come
in named kinds (KnowEdit's ``Reasoning``, ``Subject_Aliasing``, ``Logical_Generalization``;
MQuAKE's ``multi_hop`` and ``single_hop``), per kind as ``portability_<kind in lower snake
case>``, with the same teacher-forced token protocol.

Beside teacher forcing, the edit prompt, its rephrasings and the portability prompts are answered
by greedy generation and the answers matched against the accepted ones (``gen_<group>_em``,
``gen_<group>_contains``; :mod:`metrics.generation`): Yang et al. (2025), "The Mirage of Model
Editing", show that teacher-forced accuracy leaks the answer's length and prefix and so
overstates what an edited model actually says.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torchmetrics import CatMetric, MaxMetric, MeanMetric

from factedit.batches import pad_id
from factedit.editors.base import EditRequest
from factedit.editors.core.lm import collate_pairs, encode_pair, logits_at, model_device
from factedit.metrics import (
    GENERATION_GROUPS,
    PORTABILITY_KIND_PREFIX,
    SCORES,
    Score,
    ProbabilityComparison,
    harmonic_mean,
    protocol_of,
    score_of,
)

from .config import EvalConfig  # defined with the other run settings, importable without torch
from .generation import Select, generate_texts, measure_generations
from .measurements import MEASUREMENTS, token_pairs

TOKEN_GROUPS = ("reliability", "generalization", "portability", "locality")
PROBABILITY_GROUPS = {score.key: score.options["expect"] for score in SCORES if score.magnitude}
"""The probability comparisons (ES, PS, NS) and the target each expects to win."""
MAGNITUDE_KEYS = {score.key: score.magnitude for score in SCORES if score.magnitude}
GENERATION_SCORES: dict[str, Callable[..., float | None]] = {
    score.key.rpartition("_")[2]: score.metric.case_score for score in SCORES if score.key.startswith(f"gen_{GENERATION_GROUPS[0]}_")
}
"""The two matches of a greedy answer (``gen_<group>_em`` and ``gen_<group>_contains``), read from
the score table's rows."""
UNNAMED_KIND = "portability"
"""The kind of probes that name none (EasyEdit's single portability question)."""


def portability_key(kind: str) -> str:
    """The summary key of a portability probe kind: ``portability_`` and the kind in lower snake
    case (``Subject_Aliasing`` -> ``portability_subject_aliasing``, ``MultiHop`` ->
    ``portability_multi_hop``); a probe without a kind counts as kind ``portability``."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", kind.strip())
    snake = re.sub(r"[^0-9A-Za-z]+", "_", snake).strip("_").lower()
    return PORTABILITY_KIND_PREFIX + (snake or UNNAMED_KIND)


# --------------------------------------------------------------------------------------------
# Raw measurements
# --------------------------------------------------------------------------------------------


def _case_pairs(request: EditRequest) -> dict[str, list[tuple[str, str]]]:
    """Every (prompt, target) the case is scored on, by group."""
    pairs: dict[str, list[tuple[str, str]]] = {
        "reliability": [(request.prompt, request.target_new)],
        "generalization": [(p, request.target_new) for p in request.rephrase_prompts],
        "portability": [(q.prompt, q.answer) for q in request.portability],
        "locality": [(q.prompt, q.answer) for q in request.locality],
    }
    if request.target_true is not None:
        for group, prompts in (("es", [request.prompt]), ("ps", request.rephrase_prompts), ("ns", request.neighborhood_prompts)):
            pairs[f"{group}_new"] = [(p, request.target_new) for p in prompts]
            pairs[f"{group}_true"] = [(p, request.target_true) for p in prompts]
    return pairs


def _shared_rows(encoded: Sequence[tuple[list[int], list[int]]], owners: Sequence[int] | None) -> list[tuple[int, list[int]]]:
    """The rows ``score_pairs`` runs: ``(carrier, riders)``, where the pair ``carrier`` is fed as
    prompt + target and each pair of ``riders`` (the same case and prompt, a one-token target) is
    read off the carrier's last prompt position, which predicts any first target token. A
    CounterFact case asks every prompt for its new and its true target, mostly single tokens: half
    the rows. A pair with a longer target carries its own row (and the riders, if any)."""
    groups: dict[tuple, list[int]] = {}
    for i, (prompt, _) in enumerate(encoded):
        groups.setdefault((owners[i] if owners is not None else None, tuple(prompt)), []).append(i)
    rows = []
    for members in groups.values():
        longer = [i for i in members if len(encoded[i][1]) > 1]
        single = [i for i in members if len(encoded[i][1]) == 1]
        carriers = longer or single[:1]
        riders = [i for i in single if i not in carriers]
        rows += [(carrier, riders if index == 0 else []) for index, carrier in enumerate(carriers)]
    return rows


@torch.no_grad()
def score_pairs(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32, owners: Sequence[int] | None = None, select: Select | None = None
) -> list[dict[str, Any]]:
    """For each (prompt, target): target ids, argmax predictions at those positions, mean NLL.

    ``owners[i]`` is the case pair ``i`` belongs to; ``select`` is told the owner of every row
    before each batch runs (:meth:`~factedit.evaluation.row_edits.RowEdits.select`). Pairs of one
    case with the same prompt and one-token targets share a row (:func:`_shared_rows`); the
    results equal one row per pair up to the float rounding of a differently shaped batch."""
    encoded = [encode_pair(tokenizer, p, t) for p, t in pairs]
    rows = _shared_rows(encoded, owners)
    order = sorted(range(len(rows)), key=lambda r: (len(encoded[rows[r][0]][0]) + len(encoded[rows[r][0]][1]), rows[r][0]))
    results: list[dict[str, Any] | None] = [None] * len(encoded)
    device, pad = model_device(model), pad_id(tokenizer)
    for start in range(0, len(order), batch_size):
        chunk = [rows[r] for r in order[start : start + batch_size]]
        if select is not None:
            select([owners[carrier] for carrier, _ in chunk])  # type: ignore[index]
        batch = collate_pairs([encoded[carrier] for carrier, _ in chunk], pad, device)
        # each rider's one target token, predicted at its carrier's last prompt position
        extra = [(row, i) for row, (_, riders) in enumerate(chunk) for i in riders]
        if extra:
            batch.rows = torch.cat([batch.rows, torch.tensor([row for row, _ in extra], dtype=torch.long, device=device)])
            batch.cols = torch.cat([batch.cols, torch.tensor([batch.prompt_lengths[row] - 1 for row, _ in extra], dtype=torch.long, device=device)])
            batch.targets = torch.cat([batch.targets, torch.tensor([encoded[i][1][0] for _, i in extra], dtype=torch.long, device=device)])
        logits = logits_at(model, batch).float()
        logp = torch.log_softmax(logits, dim=-1)
        token_nll = -logp.gather(1, batch.targets[:, None])[:, 0].cpu()
        preds = logits.argmax(-1).cpu()
        offset = 0
        for (carrier, _), length in zip(chunk, batch.lengths):
            results[carrier] = {
                "target": encoded[carrier][1],
                "pred": preds[offset : offset + length].tolist(),
                "nll": token_nll[offset : offset + length].mean().item(),
            }
            offset += length
        for _, i in extra:
            results[i] = {"target": encoded[i][1], "pred": preds[offset : offset + 1].tolist(), "nll": token_nll[offset : offset + 1].mean().item()}
            offset += 1
    return results  # type: ignore[return-value]


def measure_cases(
    model, tokenizer, requests: Sequence[EditRequest], config: EvalConfig, on_step: Callable[[str], None] | None = None, select: Select | None = None
) -> list[dict[str, Any]]:
    """Raw, JSON-ready measurements of each case on the model as it is now (one dict per request).

    Each teacher-forced probe keeps its target ids, the predicted ids (``pred``: what the scores
    use) and their decoding (``pred_text``: for people reading ``cases.jsonl``). The probes of all
    the cases share batches (a case's repeated probes are run once), and so do their fluency
    samples and greedy answers; with ``select`` (:class:`~factedit.evaluation.row_edits.RowEdits`)
    each row runs with its own case's edit. ``on_step`` is told the name of each generation step
    (``"fluency"``, ``"generation"``) as it starts: those take most of the time on a CPU.
    """
    groups = [_case_pairs(request) for request in requests]
    unique = list(dict.fromkeys((case, pair) for case, by_group in enumerate(groups) for pairs in by_group.values() for pair in pairs))
    scored = dict(zip(unique, score_pairs(model, tokenizer, [pair for _, pair in unique], config.batch_size, [case for case, _ in unique], select)))
    raws: list[dict[str, Any]] = []
    for case, (request, by_group) in enumerate(zip(requests, groups)):
        raw: dict[str, Any] = {}
        for group in TOKEN_GROUPS:
            raw[group] = []
            for pair in by_group[group]:
                result = scored[case, pair]
                raw[group].append({"target": result["target"], "pred": result["pred"], "pred_text": tokenizer.decode(result["pred"])})
        for item, probe in zip(raw["portability"], request.portability):
            item["kind"] = probe.kind  # for the per-kind portability scores
        for group in PROBABILITY_GROUPS:
            if f"{group}_new" in by_group:
                raw[group] = {
                    "nll_new": [scored[case, pair]["nll"] for pair in by_group[f"{group}_new"]],
                    "nll_true": [scored[case, pair]["nll"] for pair in by_group[f"{group}_true"]],
                }
        raws.append(raw)
    if config.fluency:
        sampled = [(case, prompt) for case, r in enumerate(requests) for prompt in list(dict.fromkeys(r.generation_prompts))[: config.generation_prompts]]
        if sampled:
            if on_step is not None:
                on_step("fluency")
            texts = generate_texts(model, tokenizer, [p for _, p in sampled], config, [c for c, _ in sampled], select)
            for (case, _), text in zip(sampled, texts):
                raws[case].setdefault("fluency", {"texts": []})["texts"].append(text)
    if config.generation_scoring:
        if on_step is not None:
            on_step("generation")
        for raw, generation in zip(raws, measure_generations(model, tokenizer, requests, config, select)):
            raw["generation"] = generation
    return raws


def measure_case(model, tokenizer, request: EditRequest, config: EvalConfig, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """:func:`measure_cases` of one case."""
    return measure_cases(model, tokenizer, [request], config, on_step)[0]


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def portability_by_kind(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """A case's raw portability measurements split by probe kind, keyed by :func:`portability_key`;
    empty when every probe is of the unnamed kind (then ``portability`` says it all)."""
    kinds = [item.get("kind") or UNNAMED_KIND for item in items]
    if all(kind == UNNAMED_KIND for kind in kinds):
        return {}
    split: dict[str, list[dict[str, Any]]] = {}
    for item, kind in zip(items, kinds):
        split.setdefault(portability_key(kind), []).append(item)
    return split


def _row(key: str) -> Score:
    """The score table's row of ``key`` (per-kind portability keys get one from :func:`score_of`)."""
    for score in SCORES:
        if score.key == key:
            return score
    return score_of(key)


def metric_inputs(raw: dict[str, Any], reference: dict[str, Any] | None = None) -> dict[str, tuple]:
    """The arguments each metric receives for one case, as each row of the score table ``reads``
    them (:data:`MEASUREMENTS`).

    ``reference`` is the unedited model's raw measurements; locality exists only with it.
    Per-kind portability keys appear for the kinds the case has; ``gen_*`` keys when the case was
    measured with generation scoring.
    """
    inputs: dict[str, tuple] = {}
    for score in SCORES:
        if score.reads is not None:
            kind, group = score.reads
            args = MEASUREMENTS[kind](raw, reference, group)
            if args is not None:
                inputs[score.key] = args
    for key, items in portability_by_kind(raw.get("portability", [])).items():
        inputs[key] = token_pairs(items)
    return inputs


def case_scores(raw: dict[str, Any], reference: dict[str, Any] | None = None) -> dict[str, float | None]:
    """Per-case scores from raw measurements; ``reference`` is the unedited model's (for locality).
    Each score is its row's ``case_score`` (:data:`factedit.metrics.SCORES`)."""
    scores: dict[str, float | None] = {}
    for name, args in metric_inputs(raw, reference).items():
        score = _row(name)
        result = score.case_score(*args)
        if score.magnitude is not None:  # a probability comparison: success rate and magnitude
            scores[name], scores[score.magnitude] = result if result is not None else (None, None)
        else:
            scores[name] = result
    return scores


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RunMetrics:
    """torchmetrics accumulators for a run, fed one case record at a time (pre and post).

    Per-kind portability metrics are created as their kinds turn up. In a sharded run (an
    initialised process group) :meth:`summary` first agrees with the other processes on the set
    of metrics, so that every process synchronises the same metrics in the same order.
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}
        for stage in ("pre", "post"):
            self.stages[stage] = {
                score.key: score.accumulator() for score in SCORES if not score.derived and (stage == "post" or not score.post_only)
            }
        self.fixed = {stage: tuple(metrics) for stage, metrics in self.stages.items()}
        self.seconds = MeanMetric()
        self.seconds_all = CatMetric()
        self.peak_memory = MaxMetric()
        self.cases = 0

    def _metric(self, stage: str, name: str) -> Any:
        metrics = self.stages[stage]
        if name not in metrics:
            if not name.startswith(PORTABILITY_KIND_PREFIX):
                raise KeyError(f"no metric for {name!r}")
            metrics[name] = _row(name).accumulator()
        return metrics[name]

    def update(self, record: dict[str, Any]) -> None:
        """Add a case's line of ``cases.jsonl``; a failed case's line (``failed``, no
        measurements) is skipped, so the metrics are over the cases that were scored."""
        if "failed" in record:
            return
        self.cases += 1
        pre_raw = record["pre"]["raw"]
        for stage in ("pre", "post"):
            reference = pre_raw if stage == "post" else None
            for name, args in metric_inputs(record[stage]["raw"], reference).items():
                self._metric(stage, name).update(*args)
        if record.get("seconds") is not None:
            self.seconds.update(record["seconds"])
            self.seconds_all.update(record["seconds"])
        if record.get("peak_memory_mb") is not None:
            self.peak_memory.update(record["peak_memory_mb"])

    def _names(self, stage: str) -> list[str]:
        """The stage's metrics in an order every process shares: fixed ones, then kinds sorted."""
        if _distributed():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sorted(self.stages[stage]))
            for name in sorted(set().union(*gathered)):
                self._metric(stage, name)
        fixed = self.fixed[stage]
        return list(fixed) + sorted(name for name in self.stages[stage] if name not in fixed)

    def summary(self) -> dict[str, float]:
        """Flat summary: every score's key, ``pre_``-prefixed before editing; absent when not measured."""
        flat: dict[str, float] = {}
        sharded = _distributed()
        for stage, metrics in self.stages.items():
            prefix = "pre_" if stage == "pre" else ""
            values: dict[str, float] = {}
            for name in self._names(stage):
                metric = metrics[name]
                # Never fed here: nothing to report, unless other processes fed it (their
                # cases count after synchronisation; a metric no process fed computes nan).
                if metric.update_count == 0 and not sharded:
                    continue
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                    out = metric.compute()
                if isinstance(metric, ProbabilityComparison):
                    values[name], values[MAGNITUDE_KEYS[name]] = float(out["success"]), float(out["magnitude"])
                else:
                    values[name] = float(out)
            if all(k in values and not math.isnan(values[k]) for k in PROBABILITY_GROUPS):
                values["score"] = harmonic_mean([values["es"], values["ps"], values["ns"]])
            for name, value in values.items():
                if not math.isnan(value):
                    flat[prefix + name] = value
        if self.cases and self.seconds.update_count:
            flat["seconds_per_edit"] = float(self.seconds.compute())
            flat["median_seconds_per_edit"] = float(torch.quantile(torch.atleast_1d(self.seconds_all.compute()).double(), 0.5))
        if self.peak_memory.update_count:
            flat["peak_memory_mb"] = float(self.peak_memory.compute())
        return flat


def protocols_of(summary: dict[str, float]) -> dict[str, str]:
    """Summary key -> the protocol that produced it (:func:`metrics.protocol_of`): per-kind
    portability keys are ``token``, ``gen_*`` keys ``generation``."""
    return {key: protocol_of(key) for key in summary}
