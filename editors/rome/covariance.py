"""The key second moments C = E[k k^T] that ROME-family updates are weighted by."""

from __future__ import annotations

from typing import Sequence

import torch

from ..core import stats
from .config import LocateConfig


def key_moments(model, tokenizer, module_names: Sequence[str], layers: Sequence[int], config: LocateConfig, model_id: str) -> dict[str, torch.Tensor]:
    """E[k k^T] (float64) of each module's inputs: from ROME ``.npz`` files where the config names
    one for the layer, otherwise from ``config.stats_corpus`` (computed once, cached on disk)."""
    npz = {int(k): v for k, v in (config.stats_npz or {}).items()}
    out: dict[str, torch.Tensor] = {}
    wanted = []
    for name, layer in zip(module_names, layers):
        if layer in npz:
            out[name] = stats.load_rome_npz(npz[layer]).moment().double()
        else:
            wanted.append(name)
    if wanted:
        computed = stats.layer_statistics(
            model,
            tokenizer,
            wanted,
            corpus=config.stats_corpus,
            n_texts=config.stats_samples,
            max_length=config.stats_max_length,
            model_id=model_id,
        )
        out.update({name: computed[name].moment().double() for name in wanted})
    return out
