"""Second-moment statistics of the keys of a linear module: C = E[k kᵀ].

ROME (Meng et al., 2022, eq. 2) and MEMIT (Meng et al., 2023, eq. 14) weight their updates by
the uncentred covariance of the inputs ("keys") of an MLP's output projection, estimated over a
text corpus. Here it is accumulated as a running sum of kᵀk over every non-padding token, in
float64 by default, so that the estimate does not depend on batch order or size.

Statistics are cached on disk under a key that names everything that determines them: a
fingerprint of the model's weights, the module, the corpus identity, the number of texts, the
truncation length and the accumulation dtype. Statistics precomputed by ROME's code (``.npz``
files holding ``mom2.mom2``, the unnormalised sum, and ``mom2.count``) load with
:func:`load_rome_npz`.

Which corpus to use is the caller's choice; this module only computes, caches and loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .hooks import run_until_input
from .lm import model_device

logger = logging.getLogger(__name__)

STATS_FORMAT_VERSION = 1


@dataclass
class SecondMoment:
    """The running sum of k kᵀ over ``count`` keys; :meth:`moment` is the estimate of E[k kᵀ]."""

    total: torch.Tensor  # [d, d]
    count: int

    def moment(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no keys were accumulated")
        return self.total / self.count


def model_fingerprint(model: torch.nn.Module, values_per_tensor: int = 4096) -> str:
    """A hash of the model's configuration and a strided sample of every parameter's values.

    A sample, not every byte, keeps this cheap for large models; an edit of a weight matrix
    (dense or low-rank) changes values throughout it and so changes the fingerprint.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // values_per_tensor)
        sample = flat[::stride].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:20]


def _batches(texts: Iterable[str], max_texts: int, batch_size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for i, text in enumerate(texts):
        if i >= max_texts:
            break
        if not text.strip():
            continue
        batch.append(text)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def second_moment(
    model: torch.nn.Module,
    tokenizer,
    module_name: str,
    texts: Iterable[str],
    max_texts: int,
    max_length: int = 256,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> SecondMoment:
    """Accumulate kᵀk over the inputs of ``module_name`` for up to ``max_texts`` texts."""
    device = model_device(model)
    total: torch.Tensor | None = None
    count = 0
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        bar = tqdm(total=max_texts, desc=f"key statistics {module_name}", unit="text", disable=not progress)
        for batch in _batches(texts, max_texts, batch_size):
            inputs = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(device)
            keys = run_until_input(model, module_name, **inputs, use_cache=False)
            keys = keys[inputs["attention_mask"].bool()].to(dtype)
            total = keys.T @ keys if total is None else total + keys.T @ keys
            count += keys.shape[0]
            bar.update(len(batch))
        bar.close()
    finally:
        tokenizer.padding_side = side
    if total is None:
        raise ValueError("no non-empty texts to compute key statistics on")
    return SecondMoment(total.cpu(), count)


def stats_key(model_id: str, module_name: str, corpus_id: str, max_texts: int, max_length: int, dtype: torch.dtype) -> str:
    """The cache key: a hash of everything that determines the statistics."""
    spec = dict(
        version=STATS_FORMAT_VERSION, model=model_id, module=module_name, corpus=corpus_id, texts=max_texts, max_length=max_length, dtype=str(dtype)
    )
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def cached_second_moment(
    model: torch.nn.Module,
    tokenizer,
    module_name: str,
    texts: Iterable[str],
    corpus_id: str,
    cache_dir: str | Path,
    max_texts: int,
    max_length: int = 256,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float64,
    model_id: str | None = None,
    progress: bool = True,
) -> SecondMoment:
    """:func:`second_moment`, read from ``cache_dir`` when it was computed before.

    ``model_id`` defaults to :func:`model_fingerprint`; pass the unedited model's fingerprint to
    keep using its statistics while the model is being edited.
    """
    model_id = model_id or model_fingerprint(model)
    key = stats_key(model_id, module_name, corpus_id, max_texts, max_length, dtype)
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            return SecondMoment(stored["total"], int(stored["count"].item()))
        except Exception as err:  # a damaged cache entry is recomputed, not trusted
            logger.warning("%s: unreadable statistics cache (%s); recomputing", path, err)
    stats = second_moment(model, tokenizer, module_name, texts, max_texts, max_length, batch_size, dtype, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    os.close(handle)
    try:
        metadata = dict(model=model_id, module=module_name, corpus=corpus_id, texts=str(max_texts), max_length=str(max_length), dtype=str(dtype))
        save_file({"total": stats.total.contiguous(), "count": torch.tensor(stats.count)}, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return stats


def load_rome_npz(path: str | Path) -> SecondMoment:
    """Statistics precomputed by ROME's code: ``mom2.mom2`` (sum of k kᵀ) and ``mom2.count``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mom2.mom2", "mom2.count") if k not in data.files]
            if missing:
                raise ValueError(f"{path}: fields {missing} are missing; found {sorted(data.files)}")
            return SecondMoment(torch.from_numpy(np.array(data["mom2.mom2"])), int(data["mom2.count"]))
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable ROME statistics file ({err})") from err
