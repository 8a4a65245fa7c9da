"""Scoring one edit case: the raw measurements, their per-case scores, and run-level metrics.

``measure_case`` runs the model on every probe of a request and returns *raw* results (token ids
predicted under teacher forcing with their decoded text, per-token-averaged NLLs, generated
texts) as plain JSON data.
``case_scores`` turns raw results into the per-case numbers, and :class:`RunMetrics` feeds the
same raw results into torchmetrics objects for the summary. Pre- and post-edit numbers come from
this one path. A case's probes are always batched the same way (sorted within the case, never
mixed with other cases), so pre and post forward passes see identical padding and batch shapes.

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

from .config import CHAT_TEMPLATE, EvalConfig  # defined with the other run settings, importable without torch
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
GENERATION_MARGIN = 3
"""New tokens a greedy answer may have beyond its longest accepted answer's token length."""
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


@torch.no_grad()
def score_pairs(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[dict[str, Any]]:
    """For each (prompt, target): target ids, argmax predictions at those positions, mean NLL."""
    encoded = [encode_pair(tokenizer, p, t) for p, t in pairs]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]) + len(encoded[i][1]), i))
    results: list[dict[str, Any] | None] = [None] * len(encoded)
    device = model_device(model)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate_pairs([encoded[i] for i in chunk], pad_id(tokenizer), device)
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
            pad_token_id=pad_id(tokenizer),
        )
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def _eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a generated answer: the model's and the tokenizer's end of sequence."""
    found: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return found


@torch.no_grad()
def greedy_continuations(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: Sequence[int], batch_size: int = 32, add_special_tokens: bool = True
) -> list[str]:
    """Greedy continuations of ``prompts`` (the text after each prompt, up to its end of sequence).

    Prompts are sorted by token length and generated ``batch_size`` at a time, left-padded, with
    the KV cache; a batch runs for its longest budget and each continuation is cut to its own
    ``max_new_tokens[i]`` (greedy decoding is causal, so the cut equals a shorter run). Decoding
    is plain greedy (``do_sample=False``, one beam, no repetition penalty), whatever sampling
    settings the model's generation config carries, and goes through ``model.generate``, so the
    forward hooks of memory-based editors (SERAC) apply at every step. ``add_special_tokens=False``
    for prompts that already hold them (a chat template's output).
    """
    if len(prompts) != len(max_new_tokens):
        raise ValueError(f"got {len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    if any(n < 1 for n in max_new_tokens):
        raise ValueError(f"every token budget must be at least 1, got {list(max_new_tokens)}")
    if not prompts:
        return []
    pad = pad_id(tokenizer)
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token to pad with")
    stop = _eos_ids(model, tokenizer)
    encoded = [list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    device = model_device(model)
    texts: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: every prompt ends at the last column
            input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
            attention_mask[row, width - len(encoded[i]) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            max_new_tokens=max(max_new_tokens[i] for i in chunk),
            pad_token_id=pad,
            use_cache=True,
        )
        new = out[:, width:].tolist()
        for row, i in enumerate(chunk):
            tokens = new[row][: max_new_tokens[i]]
            end = next((t for t, token in enumerate(tokens) if token in stop), len(tokens))
            texts[i] = tokenizer.decode(tokens[:end], skip_special_tokens=True)
    return texts  # type: ignore[return-value]


def uses_chat_template(setting: str, tokenizer) -> bool:
    """Whether prompts go through the tokenizer's chat template: ``"on"`` (an error without one),
    ``"auto"`` (when the tokenizer has one) or ``"off"``."""
    if setting not in CHAT_TEMPLATE:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE}, got {setting!r}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting == "on" and not has:
        raise ValueError("chat_template='on', but the tokenizer has no chat template; use 'auto' or 'off'")
    return has and setting != "off"


def as_user_turn(tokenizer, prompt: str) -> str:
    """``prompt`` as one user turn of the tokenizer's chat template, ready for the assistant's answer
    (the template's default system prompt, if it has one, included)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def _generation_probes(request: EditRequest) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """Every (prompt, accepted answers) the case's greedy answers are matched against, by group."""
    new = (request.target_new,)
    return {
        "reliability": [(request.prompt, new)],
        "generalization": [(p, new) for p in request.rephrase_prompts],
        "portability": [(q.prompt, tuple(dict.fromkeys((q.answer, *q.aliases)))) for q in request.portability],
    }


def measure_generation(model, tokenizer, request: EditRequest, config: EvalConfig) -> dict[str, list[dict[str, Any]]]:
    """Greedy answers to the case's edit, rephrased and portability prompts, with their accepted
    answers: ``{group: [{"text": continuation, "answers": [...]}, ...]}``.

    Each prompt may generate its longest accepted answer's token length (as teacher forcing
    tokenizes it after the prompt) plus :data:`GENERATION_MARGIN` tokens, at most
    ``config.generation_max_new_tokens`` (``generation_budget="target"``), or that cap whatever the
    answer (``"open"``: only the model's end of sequence stops it, so the budget does not tell the
    model how long the answer is). With ``config.chat_template`` each prompt is asked as one user
    turn of the tokenizer's chat template (:func:`as_user_turn`): an instruction-tuned model asked a
    bare question often ends its turn at once. The case's prompts are batched among themselves only,
    so pre- and post-edit generations see the same batches.
    """
    groups = _generation_probes(request)
    budgets: dict[tuple[str, tuple[str, ...]], int] = {}
    for probes in groups.values():
        for prompt, answers in probes:
            if (prompt, answers) in budgets:
                continue
            if config.generation_budget == "open":
                budgets[prompt, answers] = config.generation_max_new_tokens
            else:
                longest = max(len(encode_pair(tokenizer, prompt, answer)[1]) for answer in answers)
                budgets[prompt, answers] = min(longest + GENERATION_MARGIN, config.generation_max_new_tokens)
    unique = list(dict.fromkeys((prompt, budget) for (prompt, _), budget in budgets.items()))
    chat = uses_chat_template(config.chat_template, tokenizer)
    asked = [as_user_turn(tokenizer, p) if chat else p for p, _ in unique]
    texts = greedy_continuations(model, tokenizer, asked, [n for _, n in unique], config.batch_size, add_special_tokens=not chat)
    answered = dict(zip(unique, texts))
    return {
        group: [{"text": answered[prompt, budgets[prompt, answers]], "answers": list(answers)} for prompt, answers in probes]
        for group, probes in groups.items()
    }


def measure_case(model, tokenizer, request: EditRequest, config: EvalConfig, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Raw, JSON-ready measurements of one case on the model as it is now.

    Each teacher-forced probe keeps its target ids, the predicted ids (``pred``: what the scores
    use) and their decoding (``pred_text``: for people reading ``cases.jsonl``). ``on_step`` is
    told the name of each generation step (``"fluency"``, ``"generation"``) as it starts: those
    take most of a case's time on a CPU.
    """
    groups = _case_pairs(request)
    unique = list(dict.fromkeys(pair for pairs in groups.values() for pair in pairs))
    scored = dict(zip(unique, score_pairs(model, tokenizer, unique, config.batch_size)))
    raw: dict[str, Any] = {}
    for group in TOKEN_GROUPS:
        raw[group] = [
            {"target": scored[pair]["target"], "pred": scored[pair]["pred"], "pred_text": tokenizer.decode(scored[pair]["pred"])} for pair in groups[group]
        ]
    for item, probe in zip(raw["portability"], request.portability):
        item["kind"] = probe.kind  # for the per-kind portability scores
    for group in PROBABILITY_GROUPS:
        if f"{group}_new" in groups:
            raw[group] = {
                "nll_new": [scored[pair]["nll"] for pair in groups[f"{group}_new"]],
                "nll_true": [scored[pair]["nll"] for pair in groups[f"{group}_true"]],
            }
    if config.fluency and request.generation_prompts:
        prompts = list(dict.fromkeys(request.generation_prompts))[: config.generation_prompts]
        if on_step is not None:
            on_step("fluency")
        raw["fluency"] = {"texts": generate_texts(model, tokenizer, prompts, config)}
    if config.generation_scoring:
        if on_step is not None:
            on_step("generation")
        raw["generation"] = measure_generation(model, tokenizer, request, config)
    return raw


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
