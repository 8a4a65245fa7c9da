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

:func:`layer_statistics` is the entry point for editors: it takes a corpus spec (by default
text sampled from the model itself, see :mod:`editors.corpus`), reads what is cached and computes
the rest in one pass over the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from factedit.batches import pad_id, right_pad
from factedit.files import atomic_path, cache_root
from factedit.models import model_fingerprint

from .corpus import max_positions, open_corpus
from .hooks import trace
from .lm import model_device

logger = logging.getLogger(__name__)

STATS_FORMAT_VERSION = 1

# Texts of the default corpus for :func:`layer_statistics`. Measured on SmolLM2-135M (MLP width
# 1536) with 128-token samples from the model: the direction of C⁻¹k, which sets ROME's update,
# agrees between two independent halves of 128 texts (16k tokens each) to cosine 0.82, so each
# estimate is within cosine ~0.91 of the limit, and the error shrinks like 1/tokens: ~0.95 at 256
# texts, ~0.99 at 1000. C from model samples and C from WikiText differ by more than that
# (cosine ~0.85 between their C⁻¹k at layer 4), so texts beyond a few hundred refine an estimate
# whose corpus matters more. Sampling dominates the cost (one CPU thread: ~1 s per text, plus
# ~0.2 s per text for the statistics of five layers), so 256 texts cost a few minutes, once.
DEFAULT_STATS_TEXTS = 256


@dataclass
class SecondMoment:
    """The running sum of k kᵀ over ``count`` keys; :meth:`moment` is the estimate of E[k kᵀ]."""

    total: torch.Tensor  # [d, d]
    count: int

    def moment(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no keys were accumulated")
        return self.total / self.count


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


def _encode(tokenizer, texts: list[str], max_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)``; padding is done here, so no pad token is needed.

    Under causal attention, right padding leaves every real token's keys as they are unpadded.
    """
    encoded = [ids for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if ids]
    return right_pad(encoded, pad_id(tokenizer), device)


def _inputs_until(model: torch.nn.Module, module_names: Sequence[str], **inputs) -> dict[str, torch.Tensor]:
    """The first positional input of every named module, running the model only until all have run
    (:func:`~factedit.editors.core.hooks.trace` with ``stop=True``)."""
    with trace(model, module_names, stop=True) as traced:
        model(**inputs)
    missing = [name for name in module_names if not traced[name].calls]
    if missing:
        raise RuntimeError(f"modules {missing} were not called during the forward pass")
    return {name: traced[name].input for name in module_names}


@torch.no_grad()
def second_moments(
    model: torch.nn.Module,
    tokenizer,
    module_names: Sequence[str],
    texts: Iterable[str],
    max_texts: int,
    max_length: int = 256,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> dict[str, SecondMoment]:
    """Accumulate kᵀk over the inputs of each of ``module_names``, for up to ``max_texts`` texts.

    All modules share one forward pass per batch, which stops after the deepest of them; each
    text is truncated to ``max_length`` tokens and every non-padding token contributes one key.
    """
    names = list(dict.fromkeys(module_names))
    if not names:
        raise ValueError("no module names given")
    max_length = fit_length(model, max_length)
    device = model_device(model)
    totals: dict[str, torch.Tensor] = {}
    count = 0
    label = names[0] if len(names) == 1 else f"{len(names)} modules"
    bar = tqdm(total=max_texts, desc=f"key statistics {label}", unit="text", disable=not progress)
    for batch in _batches(texts, max_texts, batch_size):
        input_ids, attention_mask = _encode(tokenizer, batch, max_length, device)
        if input_ids.numel():
            keys = _inputs_until(model, names, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            real = attention_mask.bool()
            for name in names:
                k = keys[name][real].to(dtype)
                totals[name] = k.T @ k if name not in totals else totals[name].addmm_(k.T, k)
            count += int(real.sum())
        bar.update(len(batch))
    bar.close()
    if not totals:
        raise ValueError("no non-empty texts to compute key statistics on")
    return {name: SecondMoment(totals[name].cpu(), count) for name in names}


def stats_key(model_id: str, module_name: str, corpus_id: str, max_texts: int, max_length: int, dtype: torch.dtype) -> str:
    """The cache key: a hash of everything that determines the statistics."""
    spec = dict(
        version=STATS_FORMAT_VERSION, model=model_id, module=module_name, corpus=corpus_id, texts=max_texts, max_length=max_length, dtype=str(dtype)
    )
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class _Entry:
    """One cache entry: where the statistics of one module live and what they were computed from."""

    path: Path
    metadata: dict[str, str]

    @classmethod
    def of(cls, cache_dir: str | Path, model_id: str, module_name: str, corpus_id: str, max_texts: int, max_length: int, dtype: torch.dtype) -> "_Entry":
        key = stats_key(model_id, module_name, corpus_id, max_texts, max_length, dtype)
        metadata = dict(model=model_id, module=module_name, corpus=corpus_id, texts=str(max_texts), max_length=str(max_length), dtype=str(dtype))
        return cls(Path(cache_dir) / f"{key}.safetensors", metadata)

    def read(self) -> SecondMoment | None:
        """The stored statistics; ``None`` when absent or unreadable (a damaged entry is recomputed, not trusted)."""
        if not self.path.is_file():
            return None
        try:
            stored = load_file(str(self.path))
            return SecondMoment(stored["total"], int(stored["count"].item()))
        except Exception as err:
            logger.warning("%s: unreadable statistics cache (%s); recomputing", self.path, err)
            return None

    def write(self, stats: SecondMoment) -> None:
        """Store atomically: a temporary file beside the entry, renamed into place."""
        with atomic_path(self.path) as temporary:
            save_file({"total": stats.total.contiguous(), "count": torch.tensor(stats.count)}, str(temporary), metadata=self.metadata)


def fit_length(model: torch.nn.Module, max_length: int) -> int:
    """``max_length`` clamped to what the model can read: a sample from the model is its start
    token plus ``max_length`` tokens, so at most the model's positions minus one. A longer
    setting (e.g. ROME's default 128 on a model of 128 positions) would stop the edit: sampling
    refuses it, and a corpus file's longer texts fail inside the model's position embeddings."""
    limit = max_positions(model)
    if limit is not None and max_length > limit - 1:
        logger.warning("statistics texts of %d tokens do not fit the model's %d positions; using %d tokens", max_length, limit, limit - 1)
        return limit - 1
    return max_length


def layer_statistics(
    model: torch.nn.Module,
    tokenizer,
    module_names: Sequence[str],
    corpus: str = "model",
    n_texts: int = DEFAULT_STATS_TEXTS,
    max_length: int = 128,
    dtype: torch.dtype = torch.float64,
    cache_dir: str | Path | None = None,
    model_id: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, SecondMoment]:
    """Key statistics of each of ``module_names`` over ``corpus``, from the cache where possible.

    ``corpus`` is a spec of :func:`editors.corpus.open_corpus` (``"model"``: ``n_texts``
    samples of ``max_length`` tokens from the model). Cached modules are read; the others are
    computed together in one pass over the corpus and cached. The corpus is only read (or
    sampled) when some module is missing from the cache. ``cache_dir`` defaults to
    ``cache_root()/"stats"``; ``model_id`` defaults to :func:`model_fingerprint` (pass the
    unedited model's fingerprint during sequential editing, so that neither the statistics nor
    the sampled corpus change with each edit).
    """
    names = list(dict.fromkeys(module_names))
    max_length = fit_length(model, max_length)
    model_id = model_id or model_fingerprint(model)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "stats"
    source = open_corpus(corpus, model, tokenizer, n_texts, length=max_length, model_id=model_id, progress=progress)
    entries = {name: _Entry.of(cache_dir, model_id, name, source.id, n_texts, max_length, dtype) for name in names}
    found = {name: stats for name, entry in entries.items() if (stats := entry.read()) is not None}
    missing = [name for name in names if name not in found]
    if missing:
        computed = second_moments(model, tokenizer, missing, source.load(), n_texts, max_length, batch_size, dtype, progress)
        for name in missing:
            entries[name].write(computed[name])
        found.update(computed)
    return {name: found[name] for name in names}


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
