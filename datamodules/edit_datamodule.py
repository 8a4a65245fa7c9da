"""LightningDataModules of edit requests, for training hypernetwork editors (MEND, KE, ...).

Each batch holds three teacher-forced sub-batches built from the same requests::

    {
        "edit":      {"input_ids", "attention_mask", "labels"},  # prompt + " " + target_new
        "rephrase":  {...},                                      # first rephrase + " " + target_new
        "locality":  {...},                                      # first locality prompt + " " + answer
        "case_id":   [str, ...],
    }

Prompt and target are tokenized by :func:`editors.lm.encode_pair`, the rule editing and
evaluation use too, and concatenated, so that ``labels`` is ``-100`` on the prompt and the
padding and equals the target's token ids everywhere else. Padding is on
the right.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import BatchSampler, DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from factedit.batches import labelled_batch, pad_id, teacher_forced
from factedit.datamodules.records import load_requests, requests_to_dataset
from factedit.datamodules.sources import resolve_source
from factedit.editors.base import EditRequest
from factedit.editors.core.lm import encode_pair

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("edit", "rephrase", "locality")
"""The parts of an edit request a training step reads: the edit, a rephrase (both with the new
target) and an unrelated locality probe with its own answer."""
BATCH_PARTS: tuple[str, ...] = (*PARTS, "contrast")
"""What a batch holds: the parts and ``contrast`` (the locality prompt with the edit's new target,
for the contrast term of :class:`factedit.lit_modules.base.WeightEditModule`)."""
GROUP_BY: tuple[str, ...] = ("template",)  # the values of ``EditDataModule(group_by=...)`` besides None


# --------------------------------------------------------------------------------------------
# Tokenization and collation (module-level callables, so dataloader workers can pickle them)
# --------------------------------------------------------------------------------------------


class EditTokenizer:
    """``datasets.Dataset.map`` function (batched) that tokenizes the three parts of each request."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        pairs: dict[str, tuple[list[str], list[str]]] = {
            "edit": (batch["prompt"], batch["target_new"]),
            "rephrase": (
                [rephrases[0] if rephrases else prompt for rephrases, prompt in zip(batch["rephrase_prompts"], batch["prompt"])],
                batch["target_new"],
            ),
            "locality": ([qas[0]["prompt"] for qas in batch["locality"]], [qas[0]["answer"] for qas in batch["locality"]]),
            # The locality prompt continued by the edit's new target: how much likelier the edit made
            # the new target where it must not apply (CounterFact's NS compares exactly this with
            # the locality answer).
            "contrast": ([qas[0]["prompt"] for qas in batch["locality"]], batch["target_new"]),
        }
        out: dict[str, list[list[int]]] = {}
        for part, (prompts, targets) in pairs.items():
            # The same prompt/target tokenization as editing and evaluation use.
            encoded = [encode_pair(self.tokenizer, p, t) for p, t in zip(prompts, targets)]
            joined = [teacher_forced(p, t, self.max_length) for p, t in encoded]
            out[f"{part}_input_ids"] = [ids for ids, _ in joined]
            out[f"{part}_labels"] = [labels for _, labels in joined]
        return out


class EditCollator:
    """Pads each part of a list of tokenized rows on the right into ``input_ids``/``attention_mask``/``labels``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"case_id": [row["case_id"] for row in rows]}
        for part in BATCH_PARTS:
            batch[part] = labelled_batch([(row[f"{part}_input_ids"], row[f"{part}_labels"]) for row in rows], self.pad_token_id)
        return batch


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A shuffled order that depends only on ``seed`` and the epoch (Lightning calls
    ``set_epoch``), so a run resumed from a checkpoint sees the batches an uninterrupted run
    would have seen."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def prompt_template(request: EditRequest) -> str | None:
    """The request's prompt with (the first occurrence of) its subject replaced by ``{}``, as
    CounterFact writes its templates; ``None`` when the subject is not in the prompt (which
    :class:`~editors.base.EditRequest` refuses, so only for objects built otherwise)."""
    if not request.subject or request.subject not in request.prompt:
        return None
    return request.prompt.replace(request.subject, "{}", 1)


def template_ids(requests: Sequence[EditRequest]) -> list[int]:
    """A group number per request: requests with the same prompt template share one, and a
    request without a template (its subject is not in its prompt) has a group of its own."""
    numbers: dict[str | int, int] = {}
    # A request without a template is keyed by its position, which no template equals.
    keys = [prompt_template(r) or i for i, r in enumerate(requests)]
    return [numbers.setdefault(key, len(numbers)) for key in keys]


class GroupedBatches(BatchSampler):
    """Batches of requests that share a group (their prompt template), for in-batch hard negatives.

    Per epoch: the indices come in ``sampler``'s order (:class:`EpochShuffle`, a seeded shuffle);
    a generator seeded by ``seed`` and the epoch draws a random rank per group; the indices are
    sorted by their group's rank (stably, so the shuffle survives within a group), cut into
    batches of ``batch_size`` (the last may be short) and the batches' order is shuffled by the
    same generator. Every index comes once per epoch, and the batches depend only on ``seed`` and
    the epoch, so a resumed run sees the batches an uninterrupted one would have seen. A group
    whose size is not a multiple of ``batch_size`` shares a batch with the next group.

    Lightning calls ``set_epoch`` on a batch sampler's ``sampler``, where the epoch is kept. Under
    DDP it injects a distributed sampler as ``sampler``: each process then groups its own shard,
    with the same ranks of the groups.
    """

    def __init__(self, sampler: Sampler[int], groups: Sequence[int], batch_size: int, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.groups = list(groups)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        # A stream of its own (EpochShuffle seeds the index shuffle with seed * 100_003 + epoch).
        generator = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 2 + 1)
        rank = torch.randperm(max(self.groups, default=-1) + 1, generator=generator).tolist()
        order = sorted(self.sampler, key=lambda i: rank[self.groups[i]])
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return iter([batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()])


def same_group_share(batches: Sequence[Sequence[int]], groups: Sequence[int]) -> float:
    """The mean, over the requests of batches of two or more, of the share of the batch's other
    requests that are in the request's group."""
    shares: list[float] = []
    for batch in batches:
        if len(batch) < 2:
            continue
        counts = Counter(groups[i] for i in batch)
        shares.extend((counts[groups[i]] - 1) / (len(batch) - 1) for i in batch)
    return sum(shares) / len(shares) if shares else 0.0


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/validation split of ``range(n)``; both lists keep the file order.

    A positive ``val_fraction`` puts at least one and at most ``n - 1`` items in validation.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    return sorted(order[n_val:]), sorted(order[:n_val])


# --------------------------------------------------------------------------------------------
# DataModules
# --------------------------------------------------------------------------------------------


class EditDataModule(LightningDataModule):
    """Edit requests from a data file or named source, tokenized for training an editor.

    Args:
        data: a JSON/JSONL file of edit records or a known source name (``counterfact-demo``,
            ``zsre-demo``, ``counterfact``, ``zsre``).
        format: the records' format (see :data:`factedit.datamodules.records.FORMATS`); ``None`` detects it.
        tokenizer: a tokenizer, or a model name/path whose tokenizer is loaded when first needed.
        batch_size: requests per batch.
        val_fraction: share of the requests held out for validation (seeded split).
        limit: use only the first ``limit`` valid requests.
        max_length: longest tokenized prompt + target; longer pairs lose the start of the prompt.
        seed: seeds the split and the training order.
        num_workers: dataloader worker processes.
        skip_invalid: leave invalid records out (with a warning each) instead of failing.
        group_by: ``"template"`` makes training batches of edits that share their prompt template
            (the prompt with the subject replaced by ``{}``, i.e. CounterFact's relation wording;
            see :class:`GroupedBatches`), so that a batch's other edits are hard negatives for
            SERAC's scope classifier (Mitchell et al., 2022); ``None`` (the default) shuffles.
            Validation batches are never grouped. It pays off on CounterFact, whose training
            split (EasyEdit's, 9,867 records) has 215 templates; zsRE's questions are paraphrased
            per record (509 templates in MEND's 1,000-record training split, most used once), so
            there grouping changes little.
    """

    def __init__(
        self,
        data: str,
        format: str | None = None,
        tokenizer: str | PreTrainedTokenizerBase = "smollm2-135m",
        batch_size: int = 8,
        val_fraction: float = 0.1,
        limit: int | None = None,
        max_length: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        skip_invalid: bool = False,
        group_by: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one prompt and one target token), got {max_length}")
        if group_by is not None and group_by not in GROUP_BY:
            allowed = ", ".join(["None", *map(repr, GROUP_BY)])
            raise ValueError(f"group_by must be one of {allowed}, got {group_by!r}")
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, str) else ["tokenizer"])
        self.data = data
        self.format = format
        self.tokenizer_spec = tokenizer
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.limit = limit
        self.max_length = max_length
        self.seed = seed
        self.num_workers = num_workers
        self.skip_invalid = skip_invalid
        self.group_by = group_by
        self.train_groups: list[int] = []
        self._tokenizer: PreTrainedTokenizerBase | None = None if isinstance(tokenizer, str) else tokenizer
        self.train_requests: list[EditRequest] = []
        self.val_requests: list[EditRequest] = []
        self.train_dataset: "datasets.Dataset | None" = None
        self.val_dataset: "datasets.Dataset | None" = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer; a name or path given at construction is loaded on first use."""
        if self._tokenizer is None:
            from factedit.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad token, or its end-of-sequence token when it has no pad token."""
        return pad_id(self.tokenizer)

    def prepare_data(self) -> None:
        """Make sure the data exists locally (downloads named full datasets on first use)."""
        resolve_source(self.data, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Load the requests once, split them, and tokenize both splits."""
        if self.train_dataset is not None:
            return
        path, named_format = resolve_source(self.data, download=False)
        requests = load_requests(path, format=self.format or named_format, limit=self.limit, skip_invalid=self.skip_invalid)
        usable = [r for r in requests if r.locality]
        if len(usable) < len(requests):
            logger.warning(
                "%s: %d of %d requests have no locality probe and are left out (training needs one per request)",
                path, len(requests) - len(usable), len(requests),
            )
        if not usable:
            raise ValueError(f"{path}: no usable edit requests (each needs a locality probe)")
        train_idx, val_idx = split_indices(len(usable), self.val_fraction, self.seed)
        self.train_requests = [usable[i] for i in train_idx]
        self.val_requests = [usable[i] for i in val_idx]
        self.train_dataset = self._tokenize(self.train_requests, "train")
        self.val_dataset = self._tokenize(self.val_requests, "val")
        logger.info("%s: %d training and %d validation requests", path, len(self.train_requests), len(self.val_requests))
        if self.group_by == "template":
            self.train_groups = template_ids(self.train_requests)
            self._log_groups(path)

    def _log_groups(self, path: Any) -> None:
        n = len(self.train_groups)
        templates = Counter(t for t in map(prompt_template, self.train_requests) if t is not None)
        sizes = Counter(self.train_groups).values()
        # For comparison, a shuffled batch: the chance that another request shares the template.
        shuffled = sum(c * (c - 1) for c in sizes) / (n * (n - 1)) if n > 1 else 0.0
        logger.info(
            "%s: %d prompt templates among %d training requests (%d without one; largest %s); a batch's other "
            "edits share the edit's template %.1f%% of the time on average (%.1f%% in a shuffled batch)",
            path, len(templates), n, n - sum(templates.values()),
            ", ".join(f"{t!r} {c}" for t, c in templates.most_common(3)),
            100 * same_group_share(list(self._train_batches()), self.train_groups), 100 * shuffled,
        )

    def _train_batches(self) -> GroupedBatches:
        return GroupedBatches(EpochShuffle(len(self.train_groups), self.seed), self.train_groups, self.batch_size, self.seed)

    def _tokenize(self, requests: list[EditRequest], split: str) -> "datasets.Dataset":
        dataset = requests_to_dataset(requests)
        keep = {"case_id"}
        return dataset.map(
            EditTokenizer(self.tokenizer, self.max_length),
            batched=True,
            remove_columns=[c for c in dataset.column_names if c not in keep],
            desc=f"tokenizing {split} requests",
        )

    def _loader(self, dataset: "datasets.Dataset | None", shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if shuffle and self.group_by is not None:
            batching: dict[str, Any] = {"batch_sampler": self._train_batches()}
        else:
            batching = {"batch_size": self.batch_size, "sampler": EpochShuffle(len(dataset), self.seed) if shuffle else None}
        return DataLoader(
            dataset,
            **batching,
            collate_fn=EditCollator(self.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)


class CounterFactDataModule(EditDataModule):
    """:class:`EditDataModule` with CounterFact's bundled demo set as the default data."""

    def __init__(
        self,
        data: str = "counterfact-demo",
        format: str | None = None,
        tokenizer: str | PreTrainedTokenizerBase = "smollm2-135m",
        batch_size: int = 8,
        val_fraction: float = 0.1,
        limit: int | None = None,
        max_length: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        skip_invalid: bool = False,
        group_by: str | None = None,
    ) -> None:
        super().__init__(
            data, format, tokenizer, batch_size, val_fraction, limit, max_length, seed, num_workers, skip_invalid, group_by
        )


class ZsREDataModule(EditDataModule):
    """:class:`EditDataModule` with zsRE's bundled demo set as the default data."""

    def __init__(
        self,
        data: str = "zsre-demo",
        format: str | None = None,
        tokenizer: str | PreTrainedTokenizerBase = "smollm2-135m",
        batch_size: int = 8,
        val_fraction: float = 0.1,
        limit: int | None = None,
        max_length: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        skip_invalid: bool = False,
        group_by: str | None = None,
    ) -> None:
        super().__init__(
            data, format, tokenizer, batch_size, val_fraction, limit, max_length, seed, num_workers, skip_invalid, group_by
        )
