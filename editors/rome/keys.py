"""Module inputs and outputs at the subject's last token, averaged over prefixed prompts.

ROME's key k* (Meng et al., 2022, eq. 3) and MEMIT's per-layer keys and current hidden states
(Meng et al., 2023, Algorithm 1) are all read here. Only the tokens up to the subject's last one
are run (nothing after it can influence that position), and the forward pass stops as soon as
every requested module has been seen.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from factedit.batches import pad_id, right_pad

from ..base import EditRequest
from ..core.hooks import trace
from ..core.lm import model_device
from .context import subject_last_index


@torch.no_grad()
def subject_reads(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    inputs_of: Sequence[str] = (),
    outputs_of: Sequence[str] = (),
    batch_rows: int = 256,
) -> dict[tuple[str, str], torch.Tensor]:
    """``{("input"|"output", module): [n_requests, d]}``, float32, averaged over ``prefixes``."""
    sequences, positions, owner = [], [], []
    for j, req in enumerate(requests):
        start = req.prompt.find(req.subject)
        for prefix in prefixes:
            text = prefix + req.prompt
            index = subject_last_index(tokenizer, text, req.subject, len(prefix) + start)
            sequences.append(tokenizer(text)["input_ids"][: index + 1])
            positions.append(index)
            owner.append(j)
    wanted = [("input", name) for name in inputs_of] + [("output", name) for name in outputs_of]
    device = model_device(model)
    pad = pad_id(tokenizer)
    sums: dict[tuple[str, str], torch.Tensor] = {}
    for begin in range(0, len(sequences), batch_rows):
        chunk = sequences[begin : begin + batch_rows]
        ids, mask = right_pad(chunk, pad)
        rows = torch.arange(len(chunk), device=device)
        cols = torch.tensor(positions[begin : begin + batch_rows], device=device)
        seen = _run_until_seen(model, wanted, input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        who = torch.tensor(owner[begin : begin + batch_rows], device=device)
        for key, tensor in seen.items():
            values = tensor[rows, cols].float()
            total = sums.setdefault(key, torch.zeros((len(requests), values.shape[-1]), device=device))
            total.index_add_(0, who, values)
    return {key: total / len(prefixes) for key, total in sums.items()}


def _run_until_seen(model: nn.Module, wanted: Sequence[tuple[str, str]], **inputs: Any) -> dict[tuple[str, str], torch.Tensor]:
    """Run ``model`` until every wanted ``("input" | "output", module)`` has been captured, then stop."""
    names = list(dict.fromkeys(name for _, name in wanted))
    kinds = {kind for kind, _ in wanted}
    with trace(model, names, inputs="input" in kinds, outputs="output" in kinds, stop=True) as traced:
        model(**inputs)
    missing = [key for key in wanted if not traced[key[1]].calls]
    if missing:
        raise RuntimeError(f"modules {missing} were not called during the forward pass")
    return {(kind, name): traced[name].input if kind == "input" else traced[name].output for kind, name in wanted}
