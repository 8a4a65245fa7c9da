"""Scoring one edit case: the raw measurements, their per-case scores, and run-level metrics.

``measure_case`` runs the model on every probe of a request and returns *raw* results (token ids
predicted under teacher forcing, per-token-averaged NLLs, generated texts) as plain JSON data.
``case_scores`` turns raw results into the per-case numbers, and :class:`RunMetrics` feeds the
same raw results into torchmetrics objects for the summary. Pre- and post-edit numbers come from
this one path. A case's probes are always batched the same way (sorted within the case, never
mixed with other cases), so pre and post forward passes see identical padding and batch shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torchmetrics import CatMetric, MaxMetric, MeanMetric

from editors.base import EditRequest
from editors.lm import collate_pairs, encode_pair, logits_at, model_device
from metrics import (
    PROTOCOLS,
    LocalityAgreement,
    NGramEntropy,
    ProbabilityComparison,
    TokenAccuracy,
    harmonic_mean,
    locality_agreement,
    mean_ngram_entropy,
    probability_comparison,
    token_accuracy,
)

TOKEN_GROUPS = ("reliability", "generalization", "portability", "locality")
PROBABILITY_GROUPS = {"es": "new", "ps": "new", "ns": "true"}
MAGNITUDE_KEYS = {"es": "em", "ps": "pm", "ns": "nm"}


@dataclass
class EvalConfig:
    """How edits are scored (shared by every editor and mode)."""

    batch_size: int = 32  # sequences per forward pass
    fluency: bool = True  # generate from generation prompts and score n-gram entropy
    generation_prompts: int = 1  # distinct generation prompts per case (ROME uses all 10 of CounterFact's; each costs ~6 s on 2 CPU cores)
    generation_length: int = 100  # new tokens per generation (ROME: 100)
    top_k: int = 5  # top-k sampling for generation (ROME: 5)
    seed: int = 0  # sampling seed; the same for pre- and post-edit generation


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


@torch.no_grad()
def score_pairs(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[dict[str, Any]]:
    """For each (prompt, target): target ids, argmax predictions at those positions, mean NLL."""
    encoded = [encode_pair(tokenizer, p, t) for p, t in pairs]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]) + len(encoded[i][1]), i))
    results: list[dict[str, Any] | None] = [None] * len(encoded)
    device = model_device(model)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate_pairs([encoded[i] for i in chunk], tokenizer.pad_token_id, device)
        logits = logits_at(model, batch).float()
        logp = torch.log_softmax(logits, dim=-1)
        token_nll = -logp.gather(1, batch.targets[:, None])[:, 0].cpu()
        preds = logits.argmax(-1).cpu()
        offset = 0
        for i, length in zip(chunk, batch.lengths):
            results[i] = {
                "target": encoded[i][1],
                "pred": preds[offset : offset + length].tolist(),
                "nll": token_nll[offset : offset + length].mean().item(),
            }
            offset += length
    return results  # type: ignore[return-value]


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], config: EvalConfig) -> list[str]:
    """Top-k sampled continuations (prompt included, as ROME scores them), seeded identically each call."""
    if not prompts:
        return []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model_device(model))
    finally:
        tokenizer.padding_side = side
    with torch.random.fork_rng(devices=[model_device(model)] if model_device(model).type == "cuda" else []):
        torch.manual_seed(config.seed)
        out = model.generate(
            **inputs,
            do_sample=True,
            top_k=config.top_k,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=config.generation_length,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def measure_case(model, tokenizer, request: EditRequest, config: EvalConfig) -> dict[str, Any]:
    """Raw, JSON-ready measurements of one case on the model as it is now."""
    groups = _case_pairs(request)
    unique = list(dict.fromkeys(pair for pairs in groups.values() for pair in pairs))
    scored = dict(zip(unique, score_pairs(model, tokenizer, unique, config.batch_size)))
    raw: dict[str, Any] = {}
    for group in TOKEN_GROUPS:
        raw[group] = [{"target": scored[pair]["target"], "pred": scored[pair]["pred"]} for pair in groups[group]]
    for group in PROBABILITY_GROUPS:
        if f"{group}_new" in groups:
            raw[group] = {
                "nll_new": [scored[pair]["nll"] for pair in groups[f"{group}_new"]],
                "nll_true": [scored[pair]["nll"] for pair in groups[f"{group}_true"]],
            }
    if config.fluency and request.generation_prompts:
        prompts = list(dict.fromkeys(request.generation_prompts))[: config.generation_prompts]
        raw["fluency"] = {"texts": generate_texts(model, tokenizer, prompts, config)}
    return raw


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _ids(items: list[dict[str, Any]], key: str) -> list[torch.Tensor]:
    return [torch.tensor(item[key], dtype=torch.long) for item in items]


def metric_inputs(raw: dict[str, Any], reference: dict[str, Any] | None = None) -> dict[str, tuple]:
    """The arguments each metric receives for one case: the one map from raw groups to metrics.

    ``reference`` is the unedited model's raw measurements; locality exists only with it.
    """
    inputs: dict[str, tuple] = {group: (_ids(raw[group], "pred"), _ids(raw[group], "target")) for group in ("reliability", "generalization", "portability")}
    if reference is not None:
        inputs["locality"] = (_ids(raw["locality"], "pred"), _ids(reference["locality"], "pred"))
    for group in PROBABILITY_GROUPS:
        if group in raw:
            inputs[group] = (torch.tensor(raw[group]["nll_new"]), torch.tensor(raw[group]["nll_true"]))
    if "fluency" in raw:
        inputs["fluency"] = (raw["fluency"]["texts"],)
    return inputs


def case_scores(raw: dict[str, Any], reference: dict[str, Any] | None = None) -> dict[str, float | None]:
    """Per-case scores from raw measurements; ``reference`` is the unedited model's (for locality)."""
    scores: dict[str, float | None] = {}
    for name, args in metric_inputs(raw, reference).items():
        if name in PROBABILITY_GROUPS:
            result = probability_comparison(*args, PROBABILITY_GROUPS[name])
            scores[name], scores[MAGNITUDE_KEYS[name]] = result if result is not None else (None, None)
        elif name == "locality":
            scores[name] = locality_agreement(*args)
        elif name == "fluency":
            scores[name] = mean_ngram_entropy(*args)
        else:
            scores[name] = token_accuracy(*args)
    return scores


class RunMetrics:
    """torchmetrics accumulators for a run, fed one case record at a time (pre and post)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}
        for stage in ("pre", "post"):
            metrics: dict[str, Any] = {
                "reliability": TokenAccuracy(),
                "generalization": TokenAccuracy(),
                "portability": TokenAccuracy(),
                "es": ProbabilityComparison(expect="new"),
                "ps": ProbabilityComparison(expect="new"),
                "ns": ProbabilityComparison(expect="true"),
                "fluency": NGramEntropy(),
            }
            if stage == "post":
                metrics["locality"] = LocalityAgreement()
            self.stages[stage] = metrics
        self.seconds = MeanMetric()
        self.seconds_all = CatMetric()
        self.peak_memory = MaxMetric()
        self.cases = 0

    def update(self, record: dict[str, Any]) -> None:
        self.cases += 1
        pre_raw = record["pre"]["raw"]
        for stage in ("pre", "post"):
            reference = pre_raw if stage == "post" else None
            for name, args in metric_inputs(record[stage]["raw"], reference).items():
                self.stages[stage][name].update(*args)
        if record.get("seconds") is not None:
            self.seconds.update(record["seconds"])
            self.seconds_all.update(record["seconds"])
        if record.get("peak_memory_mb") is not None:
            self.peak_memory.update(record["peak_memory_mb"])

    def summary(self) -> dict[str, float]:
        """Flat summary: the issue's keys, ``pre_``-prefixed before editing; absent when not measured."""
        flat: dict[str, float] = {}
        for stage, metrics in self.stages.items():
            prefix = "pre_" if stage == "pre" else ""
            values: dict[str, float] = {}
            for name, metric in metrics.items():
                if metric.update_count == 0:  # never fed (e.g. no generations): nothing to report
                    continue
                if isinstance(metric, ProbabilityComparison):
                    out = metric.compute()
                    values[name], values[MAGNITUDE_KEYS[name]] = float(out["success"]), float(out["magnitude"])
                else:
                    values[name] = float(metric.compute())
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
    out = {}
    for key in summary:
        base = key.removeprefix("pre_").removeprefix("median_")
        out[key] = PROTOCOLS.get(base, "efficiency" if "seconds" in base or "memory" in base else "unknown")
    return out
