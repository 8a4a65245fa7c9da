"""Log-likelihoods with shared prefixes: :class:`PrefixScorer` computes each distinct context once
and continues every option from its key/value cache (the speed of the multiple-choice tasks)."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

from factedit.editors.core.lm import cache_kwargs, cache_of


logger = logging.getLogger(__name__)


# -- log-likelihoods with shared prefixes --------------------------------------------------------


class _Unsupported(Exception):
    pass


def _take_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new key/value cache holding ``rows`` of ``cache`` (rows may repeat)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise _Unsupported(f"cache of type {type(cache).__name__} with layers {sorted({type(layer).__name__ for layer in layers or []})}")
    return DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)) for layer in layers])


class PrefixScorer:
    """Summed log-probabilities (and greedy-match flags) of continuations given contexts.

    For a request ``(context, continuation)`` the model reads ``(context + continuation)[:-1]``
    (left-truncated to ``max_length``) and the continuation's tokens are scored, as in HFLM. Here
    that input is split at the position that predicts the first continuation token:

    1. one forward pass per distinct *prefix* (the input up to and including that position),
       batched and right-padded, with the vocabulary projection at that position only
       (``logits_to_keep``). A prefix common to all prompts (few-shot examples, a fixed primer) is
       run once beforehand and its key/value cache shared;
    2. the rest of each continuation (its *tail*) runs on its prefix's key/value cache, projected
       only at real (not padding) positions, in chunks that bound the logits held at once.
       Requests that differ only in their last token (one-token options " A" / " B") share all
       forward passes.

    Batches are cut from the length-sorted prefixes (tails) where padding would cost more than
    another forward pass (``pass_cost`` tokens), within ``batch_size`` rows (tails: four times
    as many), ``batch_size * 256`` tokens and ``CACHE_BUDGET`` bytes of key/value cache.
    """

    MIN_SHARED = 16  # tokens: a common prefix shorter than this is not worth a separate pass
    LOGIT_BUDGET = 1 << 26  # logits held at once (256 MiB in float32)
    CACHE_BUDGET = 1 << 30  # bytes of key/value cache per forward pass

    def __init__(self, model: torch.nn.Module, max_length: int, batch_size: int, pad_id: int = 0) -> None:
        self.model = model
        self.max_length = max_length
        self.rows = max(1, batch_size)
        self.max_tokens = self.rows * 256
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        # The fixed cost of one forward pass, in tokens: a few dozen on a CPU, far more on a GPU.
        self.pass_cost = 64 if self.device.type == "cpu" else 1024
        self.tokens = 0  # real (not padding) tokens fed to the model so far
        self.cache_bytes_per_token = 0  # per sequence, measured on the first cache seen
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab = int(head.weight.shape[0]) if head is not None else 1 << 17

    def _plan(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]):
        """Distinct prefixes, each request's (prefix, first target), and the distinct (prefix, tail)
        rows with the requests scored on them (their remaining targets)."""
        prefix_ids: dict[tuple[int, ...], int] = {}
        row_ids: dict[tuple[int, tuple[int, ...]], int] = {}
        firsts: list[tuple[int, int]] = []
        rows: list[tuple[int, tuple[int, ...]]] = []
        on_row: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
        for i, (context, continuation) in enumerate(pairs):
            continuation = list(continuation)
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens: must be 1 to max_length={self.max_length}")
            inputs = (list(context) + continuation)[-(self.max_length + 1) :][:-1]
            cut = len(inputs) - len(continuation) + 1
            if cut < 1:
                raise ValueError("a request needs at least one context token")
            pid = prefix_ids.setdefault(tuple(inputs[:cut]), len(prefix_ids))
            firsts.append((pid, continuation[0]))
            if len(continuation) > 1:
                key = (pid, tuple(inputs[cut:]))
                if key not in row_ids:
                    row_ids[key] = len(rows)
                    rows.append(key)
                on_row[row_ids[key]].append((i, continuation[1:]))
        return list(prefix_ids), firsts, rows, on_row

    @torch.inference_mode()
    def __call__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        prefixes, firsts, rows, on_row = self._plan(pairs)
        self._logprob = [0.0] * len(pairs)
        self._greedy = [True] * len(pairs)
        by_prefix: dict[int, list[int]] = defaultdict(list)
        for i, (pid, _) in enumerate(firsts):
            by_prefix[pid].append(i)
        rows_of: dict[int, list[int]] = defaultdict(list)
        for rid, (pid, _) in enumerate(rows):
            rows_of[pid].append(rid)

        shared = self._common_length(prefixes)
        base = None
        if shared:
            base = cache_of(self.model(input_ids=self._tensor([list(prefixes[0][:shared])]), use_cache=True))
            self._measure(base)
            self.tokens += shared

        order = sorted(range(len(prefixes)), key=lambda pid: (-len(prefixes[pid]), pid))
        for batch in self._batches([len(prefixes[pid]) - shared for pid in order], self.rows, past=shared):
            batch = [order[k] for k in batch]
            rests = [list(prefixes[pid][shared:]) for pid in batch]
            width = max(map(len, rests))
            lengths = torch.tensor([len(rest) for rest in rests], device=self.device)
            needs_cache = any(rows_of[pid] for pid in batch)
            out = self.model(
                input_ids=self._tensor([rest + [self.pad_id] * (width - len(rest)) for rest in rests]),
                position_ids=(shared + torch.arange(width, device=self.device)).expand(len(batch), width),
                **cache_kwargs(self.model, _take_rows(base, torch.zeros(len(batch), dtype=torch.long, device=self.device)) if base is not None else None),
                use_cache=needs_cache,
                logits_to_keep=(lengths - 1)[:, None],
            )
            self.tokens += int(lengths.sum())
            logits = out.logits.reshape(len(batch), -1)
            for row, pid in enumerate(batch):
                for i in by_prefix[pid]:
                    self._add(i, logits[row : row + 1], [firsts[i][1]])
                if progress is not None:
                    progress(len(by_prefix[pid]) - sum(len(on_row[rid]) for rid in rows_of[pid]))
            if needs_cache:
                self._measure(cache_of(out))
                mask = torch.ones(len(batch), shared + width, dtype=torch.long, device=self.device)
                mask[:, shared:] = (torch.arange(width, device=self.device)[None, :] < lengths[:, None]).long()
                self._tails(cache_of(out), mask, shared + lengths, batch, rows, rows_of, on_row, progress)
            del out
        return list(zip(self._logprob, self._greedy))

    def _common_length(self, prefixes: list[tuple[int, ...]]) -> int:
        """Length of the prefix common to all prefixes (each keeps at least one token of its own)."""
        if len(prefixes) < 2:
            return 0
        limit = min(len(p) for p in prefixes) - 1
        first = prefixes[0]
        shared = 0
        while shared < limit and all(p[shared] == first[shared] for p in prefixes):
            shared += 1
        return shared if shared >= self.MIN_SHARED else 0

    def _tails(self, cache, mask, ends, batch, rows, rows_of, on_row, progress) -> None:
        """Score the continuation tails of the prefixes in ``batch``, continuing from their cache."""
        slot = {pid: index for index, pid in enumerate(batch)}
        tails = sorted((rid for pid in batch for rid in rows_of[pid]), key=lambda rid: (-len(rows[rid][1]), rid))
        for group in self._batches([len(rows[rid][1]) for rid in tails], 4 * self.rows, past=mask.shape[1]):
            group = [tails[k] for k in group]
            select = torch.tensor([slot[rows[rid][0]] for rid in group], device=self.device)
            lengths = [len(rows[rid][1]) for rid in group]
            width = lengths[0]
            ids = self._tensor([list(rows[rid][1]) + [self.pad_id] * (width - len(rows[rid][1])) for rid in group])
            real = torch.arange(width, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]
            attention = torch.cat([mask.index_select(0, select), real.long()], dim=1)
            # Padding positions are clamped so that absolute position tables are never overrun.
            positions = (ends.index_select(0, select)[:, None] + torch.arange(width, device=self.device)[None, :]).clamp(max=self.max_length - 1)
            cache_rows = _take_rows(cache, select)
            past = mask.shape[1]
            step = max(1, self.LOGIT_BUDGET // (len(group) * self.vocab))  # bounds the logits held at once
            for start in range(0, width, step):
                stop = min(width, start + step)
                keep = real[:, start:stop]
                out = self.model(
                    input_ids=ids[:, start:stop],
                    attention_mask=attention[:, : past + stop],
                    position_ids=positions[:, start:stop],
                    **cache_kwargs(self.model, cache_rows),
                    use_cache=stop < width,
                    logits_to_keep=keep,
                )
                logits = out.logits.reshape(-1, out.logits.shape[-1])  # the kept positions, row by row
                offset = 0
                for row, rid in enumerate(group):
                    span = int(keep[row].sum())
                    for i, targets in on_row[rid]:
                        self._add(i, logits[offset : offset + span], targets[start : start + span])
                    offset += span
                del out, logits
            self.tokens += sum(lengths)
            if progress is not None:
                progress(sum(len(on_row[rid]) for rid in group))

    def _add(self, i: int, logits: torch.Tensor, targets: Sequence[int]) -> None:
        """Add the log-probabilities of ``targets`` under ``logits`` (one row per target) to request ``i``."""
        if not len(targets):
            return
        logits = logits.float()
        wanted = torch.tensor(targets, device=logits.device)
        chosen = logits.gather(-1, wanted[:, None])[:, 0]
        self._logprob[i] += float((chosen - torch.logsumexp(logits, dim=-1)).sum())
        self._greedy[i] = self._greedy[i] and bool((logits.argmax(dim=-1) == wanted).all())

    def _measure(self, cache: Any) -> None:
        if not self.cache_bytes_per_token:
            layers = cache.layers
            self.cache_bytes_per_token = sum(
                (layer.keys.shape[1] * layer.keys.shape[-1] + layer.values.shape[1] * layer.values.shape[-1]) * layer.keys.element_size() for layer in layers
            )

    def _batches(self, widths: list[int], max_rows: int, past: int = 0) -> list[list[int]]:
        """Cut positions ``0..n-1`` (widths falling) into consecutive batches of least total cost:
        ``pass_cost`` per batch plus its padded size, within ``max_rows``, ``max_tokens`` and the
        cache budget (``past`` cached tokens per row come on top of the widths)."""
        n = len(widths)
        best = [0.0] + [math.inf] * n
        start_of = [0] * (n + 1)
        for stop in range(1, n + 1):
            for start in range(stop - 1, max(-1, stop - 1 - max_rows), -1):
                count = stop - start
                padded = count * max(1, widths[start])
                cached = count * (past + widths[start]) * self.cache_bytes_per_token
                if count > 1 and (padded > self.max_tokens or cached > self.CACHE_BUDGET):
                    break
                cost = best[start] + self.pass_cost + padded
                if cost < best[stop]:
                    best[stop], start_of[stop] = cost, start
        batches = []
        stop = n
        while stop > 0:
            batches.append(list(range(start_of[stop], stop)))
            stop = start_of[stop]
        return batches[::-1]

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def check(self) -> bool:
        """Compare with plain forward passes on random requests; False if this model needs HFLM's loop."""
        generator = torch.Generator().manual_seed(0)
        high = max(2, min(self.vocab, 1000))

        def tokens(n: int) -> list[int]:
            return torch.randint(1, high, (n,), generator=generator).tolist()

        common = tokens(self.MIN_SHARED + 2)
        pairs = [
            (common + tokens(3), tokens(3)),
            (common + tokens(3), tokens(1)),
            (common + tokens(1), tokens(4)),
            (common + tokens(6), tokens(2)),
        ]
        pairs.append((pairs[0][0], pairs[0][1][:2] + tokens(1)))
        before = self.tokens
        try:
            got = self(pairs)
        except Exception as err:  # any failure of the cache path means: use HFLM's loop
            logger.info("general: shared-prefix scoring unavailable for this model (%s: %s); using HFLM's loop", type(err).__name__, err)
            return False
        finally:
            self.tokens = before
        tolerance = 1e-3 if next(self.model.parameters()).dtype == torch.float32 else 5e-2
        # The reference: one plain forward pass over all requests, right-padded (causal attention
        # never looks at the padding that follows a sequence).
        inputs = [list(context) + list(continuation)[:-1] for context, continuation in pairs]
        width = max(map(len, inputs))
        with torch.inference_mode():
            logits = self.model(input_ids=self._tensor([ids + [self.pad_id] * (width - len(ids)) for ids in inputs])).logits.float()
        scores = torch.log_softmax(logits, dim=-1)
        for row, ((context, continuation), (value, _)) in enumerate(zip(pairs, got)):
            targets = torch.tensor(continuation, device=self.device)
            positions = torch.arange(len(context) - 1, len(inputs[row]), device=self.device)
            expected = float(scores[row, positions].gather(-1, targets[:, None]).sum())
            if not math.isclose(value, expected, rel_tol=tolerance, abs_tol=tolerance * len(continuation)):
                logger.info("general: shared-prefix scoring disagrees with plain forward passes (%.5f vs %.5f); using HFLM's loop", value, expected)
                return False
        return True


