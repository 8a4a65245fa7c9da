"""Language-model helpers shared by editors and evaluation.

Everything here is about (prompt, target) pairs under teacher forcing: the input is the prompt's
tokens followed by the target's, and the target's i-th token is predicted at the position just
before it. Logits are computed only at those positions: the unembedding over a large vocabulary
costs a large share of a small model's forward pass.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from factedit.batches import right_pad


# -- the key-value cache under both of its names ----------------------------------------------
# transformers renamed the forward argument and output field ``past_key_values`` to ``cache``
# (5.x; the old name stays as a deprecated alias for a while). Generation hands the cache over
# under the new name, so a forward hook that looks only for ``past_key_values`` believes every
# decoding step starts a new sequence. These helpers read and pass it under whichever name the
# installed release uses.
_CACHE_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _cache_argument_of(forward: Any) -> str:
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward takes a key-value cache."""
    return _cache_argument_of(type(model).forward)


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a forward call of ``model`` (``**cache_kwargs(model, past)``)."""
    return {cache_argument(model): cache}


def cache_in(kwargs: Mapping[str, Any]) -> Any:
    """The key-value cache among a forward call's keyword arguments (``None`` if none)."""
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_of(output: Any) -> Any:
    """The key-value cache a forward pass returned (``None`` if none)."""
    for name in _CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


JOIN_RULES = ("smart", "reference")
_join = ["smart"]  # the rule in force (a run sets it for its duration with :func:`join_rule`)


@contextlib.contextmanager
def join_rule(rule: str) -> Iterator[None]:
    """Use ``rule`` to join prompts and targets (editing, scoring and training alike) inside the
    block: ``"smart"``, a space between them unless one is there; ``"reference"``, always a space,
    as EasyEdit and ROME's code write ``f"{prompt} {target}"`` (a target that starts with a space,
    13 of zsRE's 837 evaluation targets, then follows two)."""
    if rule not in JOIN_RULES:
        raise ValueError(f"join rule must be one of {JOIN_RULES}, got {rule!r}")
    previous, _join[0] = _join[0], rule
    try:
        yield
    finally:
        _join[0] = previous


def join_text(prompt: str, target: str) -> tuple[str, str]:
    """Prompt and target as they are concatenated, by the rule in force (:func:`join_rule`)."""
    if _join[0] == "reference" and target:
        return prompt, " " + target
    if not target or target[0].isspace() or not prompt or prompt[-1].isspace():
        return prompt, target
    return prompt, " " + target


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` (with the tokenizer's special tokens) and of its ``target``.

    The target's ids are read off the tokenization of the joined text, which is what the model
    sees; if the tokenizer merged across the boundary, the target is tokenized on its own.
    """
    prompt, target = join_text(prompt, target)
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + target)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        target_ids = full_ids[len(prompt_ids) :]
    else:
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return list(prompt_ids), list(target_ids)


@dataclass
class PairBatch:
    """A right-padded batch of prompt+target sequences and the positions that predict targets."""

    input_ids: torch.Tensor  # [batch, length]
    attention_mask: torch.Tensor  # [batch, length]
    rows: torch.Tensor  # [n_target_tokens] batch index of each predicted target token
    cols: torch.Tensor  # [n_target_tokens] position whose output predicts it
    targets: torch.Tensor  # [n_target_tokens] the target token ids
    lengths: list[int]  # target length per sequence, to split flat results back
    prompt_lengths: list[int]


def collate_pairs(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str = "cpu") -> PairBatch:
    """``encoded`` (pairs of prompt and target ids, :func:`encode_pair`) right-padded with
    ``pad_id`` (:func:`factedit.batches.pad_id` of the tokenizer)."""
    input_ids, attention_mask = right_pad([p + t for p, t in encoded], pad_id)
    rows, cols, targets, lengths = [], [], [], []
    for i, (p, t) in enumerate(encoded):
        rows += [i] * len(t)
        cols += range(len(p) - 1, len(p) + len(t) - 1)
        targets += t
        lengths.append(len(t))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)
    return PairBatch(
        input_ids.to(device), attention_mask.to(device), as_long(rows), as_long(cols), as_long(targets), lengths, [len(p) for p, _ in encoded]
    )


def length_batches(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str, max_tokens: int) -> list[PairBatch]:
    """``encoded`` sorted by length and cut into :func:`collate_pairs` batches of at most
    ``max_tokens`` padded tokens each (at least one sequence each): little padding when lengths
    differ. The sequences' order across the batches is the sorted one."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    batches, current = [], []
    for i in order:
        length = len(encoded[i][0]) + len(encoded[i][1])  # the longest so far: the list is sorted
        if current and (len(current) + 1) * length > max_tokens:
            batches.append(collate_pairs(current, pad_id, device))
            current = []
        current.append(encoded[i])
    if current:
        batches.append(collate_pairs(current, pad_id, device))
    return batches


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the final norm) of a causal LM's body, without the unembedding."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError("encoder-decoder (T5-style) models are not supported yet by the scoring helpers")
    body = model.base_model
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def unembed(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states, with the output scaling some architectures apply."""
    logits = model.get_output_embeddings()(hidden)
    scale = getattr(model.config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logits_at(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """Logits ``[n_target_tokens, vocab]`` at exactly the positions that predict target tokens."""
    hidden = hidden_states(model, batch.input_ids, batch.attention_mask)
    return unembed(model, hidden[batch.rows, batch.cols])


def target_nll(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """Per-sequence negative log-likelihood of the targets, averaged over each target's tokens."""
    return sequence_nll(logits_at(model, batch), batch.rows, batch.targets, batch.lengths)


def sequence_nll(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Per-sequence mean NLL of target tokens from their logits ``[n_tokens, vocab]``: token ``i``
    is ``targets[i]`` of sequence ``rows[i]``, which has ``lengths[row]`` target tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_nll = -logp.gather(1, targets[:, None])[:, 0]
    per_seq = torch.zeros(len(lengths), device=token_nll.device).index_add(0, rows, token_nll)
    return per_seq / torch.tensor(lengths, device=token_nll.device, dtype=per_seq.dtype)


def minimise_target_nll(model: nn.Module, batch: PairBatch, optimizer: torch.optim.Optimizer, steps: int, stop_loss: float, after_step=None) -> tuple[int, float]:
    """Gradient steps on the mean target NLL of ``batch`` until it falls below ``stop_loss`` or
    ``steps`` are done; ``after_step()`` runs after each step (e.g. a projection). Returns the
    steps taken and the last loss measured."""
    steps_run, loss_value = 0, float("nan")
    for steps_run in range(1, steps + 1):
        loss = target_nll(model, batch).mean()
        loss_value = loss.item()
        if loss_value < stop_loss:
            steps_run -= 1
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
    return steps_run, loss_value


def hinge(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries of ``x`` (zero, with a gradient, when there are none): a margin loss."""
    positive = x[x > 0]
    return positive.mean() if positive.numel() else x.sum() * 0.0
