"""Token batches built one way by every layer: one pad-id rule, right padding, and teacher-forced
rows whose labels hide the prompt.

Right padding under causal attention leaves every real token's computation as it is unpadded, so
the pad id's value never changes a result; it only has to be a valid token id.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch

IGNORE_INDEX = -100
"""The label of a position that predicts nothing (the prompt, padding): PyTorch's cross-entropy
default and Hugging Face's convention."""


def _special_id(tokenizer: Any, attributes: tuple[str, str], missing: str) -> int:
    """The first of the tokenizer's ``attributes`` (token ids) that is set; ``missing`` says what
    was needed when neither is."""
    for attribute in attributes:
        value = getattr(tokenizer, attribute, None)
        if value is not None:
            return int(value)
    raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has neither {missing}")


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token."""
    return _special_id(tokenizer, ("pad_token_id", "eos_token_id"), "a pad token nor an end-of-sequence token to pad with")


def start_id(tokenizer: Any) -> int:
    """The id unconditional samples start from: the tokenizer's beginning-of-sequence token, else
    its end-of-sequence token (GPT-2's ``<|endoftext|>``, which ROME samples from)."""
    return _special_id(tokenizer, ("bos_token_id", "eos_token_id"), "a BOS nor an EOS token to start sampling from")


def right_pad(sequences: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[len(sequences), longest]``, the sequences at the left
    of each row and ``pad`` after them."""
    width = max((len(seq) for seq in sequences), default=0)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)


def teacher_forced(prompt_ids: Sequence[int], target_ids: Sequence[int], max_length: int | None = None) -> tuple[list[int], list[int]]:
    """``(input ids, labels)`` of a prompt followed by its target, the prompt's labels
    :data:`IGNORE_INDEX`.

    With ``max_length``, a pair too long loses tokens from the *start* of the prompt (the end of
    the prompt and the target are what a loss needs), and a target longer than ``max_length - 1``
    is cut at its end.
    """
    target = list(target_ids)
    prompt = list(prompt_ids)
    if max_length is not None:
        target = target[: max_length - 1]
        prompt = prompt[max(0, len(prompt) - (max_length - len(target))) :]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def labelled_batch(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding labelled
    :data:`IGNORE_INDEX`) of ``(input ids, labels)`` rows, as :func:`teacher_forced` makes them."""
    input_ids, attention_mask = right_pad([ids for ids, _ in rows], pad, device)
    labels = torch.full(input_ids.shape, IGNORE_INDEX, dtype=torch.long)
    for row, (_, row_labels) in enumerate(rows):
        labels[row, : len(row_labels)] = torch.as_tensor(list(row_labels), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels.to(device)}


Group = TypeVar("Group", bound=Sequence)


def pack(groups: Sequence[Group], size: int) -> list[list[Group]]:
    """Consecutive ``groups`` packed into bins of at most ``size`` items in all, in order; a group is
    never split, and a group larger than ``size`` is a bin of its own."""
    bins: list[list[Group]] = []
    count = 0
    for group in groups:
        if bins and count + len(group) <= size:
            bins[-1].append(group)
            count += len(group)
        else:
            bins.append([group])
            count = len(group)
    return bins
