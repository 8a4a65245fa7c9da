"""Decoding for scoring: top-k samples for fluency and greedy answers for generation scoring.

Both decode many prompts in one batch (left-padded, with the key-value cache), because one
decoding step costs about as much for one sequence as for thirty: on a CPU a step is bound by
reading the weights, not by arithmetic. Prompts of different cases may share a batch: each prompt
has an *owner* (the case it belongs to) and, when the cases run with different edits
(:class:`~factedit.evaluation.row_edits.RowEdits`), ``select`` is told the owner of every row
before the batch is decoded.

Sampling stays per case: the rows of one case draw from their own random generator, seeded with
``config.seed`` (:class:`CaseSampler`), exactly as when the case is decoded alone, so a case's
fluency sample does not depend on which other cases share its batch (up to the float rounding of
a differently shaped batch).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from factedit.batches import pack, pad_id
from factedit.editors.base import EditRequest
from factedit.editors.core.lm import encode_pair, model_device

from .config import CHAT_TEMPLATE, EvalConfig

GENERATION_MARGIN = 3
"""New tokens a greedy answer may have beyond its longest accepted answer's token length."""

Select = Callable[[list[int]], None]
"""Told the owner of every batch row before a batch runs (:meth:`RowEdits.select`)."""


def _eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a generated answer: the model's and the tokenizer's end of sequence."""
    found: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return found


def _left_padded(encoded: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of ``encoded``, left-padded so that every prompt ends at the last column."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _generate(model, encoded: Sequence[Sequence[int]], batch: Sequence[int], owners: Sequence[int] | None, select: Select | None, pad: int, **settings) -> tuple[torch.Tensor, int]:
    """``model.generate`` on the prompts ``encoded[i]`` of ``batch``, left-padded, after telling
    ``select`` the owner of each row; the output ids and the padded prompts' width."""
    if select is not None:
        select([owners[i] for i in batch])  # type: ignore[index]
    input_ids, attention_mask = _left_padded([encoded[i] for i in batch], pad, model_device(model))
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1, pad_token_id=pad, **settings), input_ids.shape[1]


def _multinomial_one(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``torch.multinomial(probs, 1, generator=generator)[:, 0]``, the same draws, at about a third
    of the cost on the CPU for sparse ``probs`` (top-k).

    On the CPU PyTorch draws one sample as ``argmax(probs / q)`` with ``q`` exponential draws for
    every entry, ``-log1p(-u)`` of float64 uniforms ``u`` taken from the generator in order; the
    logarithms, not the uniforms, are most of its cost. Here the generator gives the same uniforms
    and only the entries with nonzero probability get their ``q`` (the others divide to 0, which
    never wins). A zero uniform (``q = 0``, where PyTorch divides by zero) takes the full
    computation, as does any other device or dtype.
    """
    if probs.device.type != "cpu" or probs.dtype not in (torch.float32, torch.float64) or probs.dim() != 2:
        return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]
    uniforms = torch.empty(probs.shape, dtype=torch.float64).uniform_(generator=generator)
    if bool((uniforms == 0).any()):
        return torch.argmax(probs / (-torch.log1p(-uniforms)).to(probs.dtype), dim=-1)
    rows, cols = probs.nonzero(as_tuple=True)
    ratio = torch.zeros_like(probs)
    ratio[rows, cols] = probs[rows, cols] / (-torch.log1p(-uniforms[rows, cols])).to(probs.dtype)
    return torch.argmax(ratio, dim=-1)


class CaseSampler:
    """A logits processor that samples each case's rows with that case's own generator.

    For the rows of each case it keeps the ``top_k`` largest scores (ties kept, as transformers'
    top-k warper), takes their softmax and draws one token with ``torch.multinomial`` from a
    generator seeded with ``seed`` at the start: the draws the case would get decoded alone with
    ``do_sample=True`` after ``torch.manual_seed(seed)``. It returns scores that are 0 at the drawn
    token and -inf elsewhere, so ``generate``'s greedy step takes the draw.
    """

    def __init__(self, owners: Sequence[int], top_k: int, seed: int, device) -> None:
        self.top_k = top_k
        self.groups: dict[int, list[int]] = {}
        for row, owner in enumerate(owners):
            self.groups.setdefault(owner, []).append(row)
        self.generators = {owner: torch.Generator(device=device).manual_seed(seed) for owner in self.groups}
        self.rows = {owner: torch.tensor(rows, dtype=torch.long, device=device) for owner, rows in self.groups.items()}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for owner, rows in self.rows.items():
            part = scores.index_select(0, rows)
            if self.top_k:
                k = min(self.top_k, part.shape[-1])
                part = part.masked_fill(part < torch.topk(part, k)[0][..., -1, None], -float("inf"))
            probs = torch.softmax(part, dim=-1)
            chosen[rows] = _multinomial_one(probs, self.generators[owner])
        out = torch.full_like(scores, -float("inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out


def _owner_batches(owners: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the items, in batches of at most ``batch_size`` that never split an owner's items
    (an owner with more items than that gets a batch of its own)."""
    by_owner: dict[int, list[int]] = {}
    for i, owner in enumerate(owners):
        by_owner.setdefault(owner, []).append(i)
    return [[i for items in batch for i in items] for batch in pack(list(by_owner.values()), batch_size)]


@torch.no_grad()
def generate_texts(
    model, tokenizer, prompts: Sequence[str], config: EvalConfig, owners: Sequence[int] | None = None, select: Select | None = None
) -> list[str]:
    """Top-k sampled continuations (prompt included, as ROME scores them) of ``prompts``.

    The prompts of one owner (a case; all prompts are one owner's when ``owners`` is None) are
    sampled together, seeded with ``config.seed`` each call (:class:`CaseSampler`), so a case's
    pre- and post-edit samples share their random draws; owners are packed ``config.batch_size``
    rows to a batch.
    """
    if not prompts:
        return []
    owners = list(owners) if owners is not None else [0] * len(prompts)
    if len(owners) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(owners)} owners")
    device = model_device(model)
    pad = pad_id(tokenizer)
    encoded = [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    texts: list[str | None] = [None] * len(prompts)
    for batch in _owner_batches(owners, config.batch_size):
        sampler = CaseSampler([owners[i] for i in batch], config.top_k, config.seed, device)
        out, _ = _generate(model, encoded, batch, owners, select, pad, max_new_tokens=config.generation_length, logits_processor=[sampler])
        for row, text in zip(batch, tokenizer.batch_decode(out, skip_special_tokens=True)):
            texts[row] = text
    return texts  # type: ignore[return-value]


@torch.no_grad()
def greedy_continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: Sequence[int],
    batch_size: int = 32,
    add_special_tokens: bool = True,
    owners: Sequence[int] | None = None,
    select: Select | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (the text after each prompt, up to its end of sequence).

    Prompts are sorted by token length and generated ``batch_size`` at a time, left-padded, with
    the KV cache; a batch runs for its longest budget and each continuation is cut to its own
    ``max_new_tokens[i]`` (greedy decoding is causal, so the cut equals a shorter run). Decoding
    is plain greedy (``do_sample=False``, one beam, no repetition penalty), whatever sampling
    settings the model's generation config carries, and goes through ``model.generate``, so the
    forward hooks of memory-based editors (SERAC) apply at every step. ``add_special_tokens=False``
    for prompts that already hold them (a chat template's output). ``owners`` and ``select``: see
    the module's docstring.
    """
    if len(prompts) != len(max_new_tokens):
        raise ValueError(f"got {len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    if any(n < 1 for n in max_new_tokens):
        raise ValueError(f"every token budget must be at least 1, got {list(max_new_tokens)}")
    if not prompts:
        return []
    pad = pad_id(tokenizer)
    stop = _eos_ids(model, tokenizer)
    encoded = [list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    texts: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out, width = _generate(model, encoded, chunk, owners, select, pad, repetition_penalty=1.0, max_new_tokens=max(max_new_tokens[i] for i in chunk), use_cache=True)
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


def measure_generations(model, tokenizer, requests: Sequence[EditRequest], config: EvalConfig, select: Select | None = None) -> list[dict[str, list[dict[str, Any]]]]:
    """Greedy answers to each case's edit, rephrased and portability prompts, with their accepted
    answers: per case ``{group: [{"text": continuation, "answers": [...]}, ...]}``.

    Each prompt may generate its longest accepted answer's token length (as teacher forcing
    tokenizes it after the prompt) plus :data:`GENERATION_MARGIN` tokens, at most
    ``config.generation_max_new_tokens`` (``generation_budget="target"``), or that cap whatever the
    answer (``"open"``: only the model's end of sequence stops it, so the budget does not tell the
    model how long the answer is). With ``config.chat_template`` each prompt is asked as one user
    turn of the tokenizer's chat template (:func:`as_user_turn`): an instruction-tuned model asked a
    bare question often ends its turn at once. A case's prompts are asked once each; the prompts
    of all cases share batches, the same for the pre- and post-edit answers of the same cases.
    """
    chat = uses_chat_template(config.chat_template, tokenizer)
    probes = [_generation_probes(request) for request in requests]
    budgets: list[dict[tuple[str, tuple[str, ...]], int]] = []
    for groups in probes:
        budget: dict[tuple[str, tuple[str, ...]], int] = {}
        for items in groups.values():
            for prompt, answers in items:
                if (prompt, answers) in budget:
                    continue
                if config.generation_budget == "open":
                    budget[prompt, answers] = config.generation_max_new_tokens
                else:
                    longest = max(len(encode_pair(tokenizer, prompt, answer)[1]) for answer in answers)
                    budget[prompt, answers] = min(longest + GENERATION_MARGIN, config.generation_max_new_tokens)
        budgets.append(budget)
    unique = list(dict.fromkeys((case, prompt, n) for case, budget in enumerate(budgets) for (prompt, _), n in budget.items()))
    asked = [as_user_turn(tokenizer, p) if chat else p for _, p, _ in unique]
    texts = greedy_continuations(
        model, tokenizer, asked, [n for _, _, n in unique], config.batch_size, add_special_tokens=not chat, owners=[c for c, _, _ in unique], select=select
    )
    answered = dict(zip(unique, texts))
    return [
        {
            group: [{"text": answered[case, prompt, budgets[case][prompt, answers]], "answers": list(answers)} for prompt, answers in items]
            for group, items in groups.items()
        }
        for case, groups in enumerate(probes)
    ]


def measure_generation(model, tokenizer, request: EditRequest, config: EvalConfig) -> dict[str, list[dict[str, Any]]]:
    """:func:`measure_generations` of one case."""
    return measure_generations(model, tokenizer, [request], config)[0]
