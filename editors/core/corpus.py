"""Text corpora for key statistics, named by a short spec string.

ROME and MEMIT estimate E[k kᵀ] over Wikipedia text. A fresh machine may have no network and no
dataset, so the default corpus is text sampled from the model itself (``"model"``): it needs
nothing but the model, and it follows the model's own distribution of inputs, which is what the
statistics are meant to describe. Other corpora are local files or an already cached Hugging
Face dataset:

==========================================  =====================================================
spec                                        texts
==========================================  =====================================================
``"model"``                                 unconditional samples from the model, cached as JSONL
``"path/to/file.txt"``                      paragraphs (blank-line separated), else lines
``"path/to/folder"``                        the folder's ``*.txt`` files in name order, as above
``"path/to/file.jsonl"`` / ``.json``        the ``"text"`` field of each record
``"hf:<dataset>[:<config>[:<split>]]"``     the ``"text"`` column of a dataset in the local
                                            Hugging Face cache (split ``train`` by default)
==========================================  =====================================================

Each corpus has an identity string that changes when its texts can change (the model's
fingerprint and the sampling settings, a hash of a file's content, a dataset's fingerprint);
statistics are cached under it. :func:`open_corpus` gives the identity without reading or
generating the texts, so that cached statistics are found without that cost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from factedit.batches import start_id
from factedit.files import cache_root
from factedit.jsonl import JsonlError, parse_lines, read_jsonl, write_jsonl

from .lm import cache_kwargs, cache_of, model_device

logger = logging.getLogger(__name__)

CORPUS_FORMS = (
    "'model' (text sampled from the model), a path to a .txt file, a folder of .txt files, "
    "a .jsonl/.json file whose records have a 'text' field, or 'hf:<dataset>[:<config>[:<split>]]'"
)


class CorpusError(ValueError):
    """A corpus spec that cannot be resolved into texts."""


@dataclass(frozen=True)
class CorpusSource:
    """A corpus whose identity is known before its texts are read or generated."""

    id: str
    load: Callable[[], list[str]]


# -- sampling from the model -------------------------------------------------------------------


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover (``None`` when its config
    does not say): longer inputs fail deep inside the model with an indexing error."""
    config = getattr(model, "config", None)
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def model_samples(
    model: torch.nn.Module, tokenizer, n_texts: int, length: int = 128, seed: int = 0, batch_size: int = 256, progress: bool = True
) -> list[str]:
    """``n_texts`` unconditional samples of ``length`` tokens each, decoded without special tokens.

    Every sequence starts from the BOS token (EOS when the tokenizer has none) and is sampled
    at temperature 1 with no top-k/top-p truncation: the model's own distribution, which is what
    the key statistics should describe. Sampling does not stop at an end-of-text token; the
    model goes on with a new document, so every text costs the same. A ``torch.Generator``
    seeded with ``seed`` on the model's device makes the result reproducible for a given model,
    device and ``batch_size``.

    Each step of sampling reads every weight of the model once whatever the number of rows, so
    large batches share that read (SmolLM2-135M on one CPU thread: about 120 sampled tokens/s at
    batch 32, 150 at batch 64). The progress bar counts sampled tokens and moves at every step, so
    its rate and time estimate are live from the first steps; the batches and the random stream
    are those of ``batch_size``, so the texts do not depend on the bar.
    """
    if n_texts < 1 or length < 1 or batch_size < 1:
        raise ValueError(f"n_texts, length and batch_size must be >= 1, got {n_texts}, {length}, {batch_size}")
    start = start_id(tokenizer)
    limit = max_positions(model)
    if limit is not None and length + 1 > limit:
        raise ValueError(f"samples of {length} tokens after the start token exceed the model's {limit} positions")
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    texts: list[str] = []
    batches = -(-n_texts // batch_size)
    logger.info(
        "sampling %d texts of %d tokens from the model for its statistics corpus: %d decoding steps in %d batch(es); "
        "done once per model, then read from the cache",
        n_texts, length, batches * length, batches,
    )
    bar = tqdm(total=n_texts * length, desc=f"sampling corpus from the model ({n_texts} texts)", unit="tok", unit_scale=True, disable=not progress)
    while len(texts) < n_texts:
        rows = min(batch_size, n_texts - len(texts))
        token = torch.full((rows, 1), start, dtype=torch.long, device=device)
        past = None
        sampled = []
        for _ in range(length):
            out = model(input_ids=token, **cache_kwargs(model, past), use_cache=True, logits_to_keep=1)
            past = cache_of(out)
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
            sampled.append(token)
            bar.update(rows)
        texts += tokenizer.batch_decode(torch.cat(sampled, dim=1).tolist(), skip_special_tokens=True)
    bar.close()
    return texts


def _samples_path(fingerprint: str, n_texts: int, length: int, seed: int) -> Path:
    # A caller-given identity may not be a safe file name (a hub id has a slash): hash it then.
    name = fingerprint if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", fingerprint) else _sha16([fingerprint.encode()])
    return cache_root() / "corpus" / f"model-{name}-{n_texts}-{length}-{seed}.jsonl"


def _read_samples(path: Path, n_texts: int) -> list[str] | None:
    """The cached samples at ``path``; ``None`` (with a warning) when missing or damaged."""
    if not path.is_file():
        return None
    try:
        texts = [record["text"] for record in read_jsonl(path)]
        if len(texts) != n_texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"expected {n_texts} text records, found {len(texts)}")
        return texts
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("%s: damaged corpus cache (%s); sampling again", path, err)
        return None


def _cached_samples(model, tokenizer, fingerprint: str, n_texts: int, length: int, seed: int, progress: bool) -> list[str]:
    path = _samples_path(fingerprint, n_texts, length, seed)
    texts = _read_samples(path, n_texts)
    if texts is None:
        texts = model_samples(model, tokenizer, n_texts, length=length, seed=seed, progress=progress)
        write_jsonl(path, ({"text": t} for t in texts), ensure_ascii=False)
    return texts


# -- local files ---------------------------------------------------------------------------------


def _sha16(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:16]


def _split_text(content: str) -> list[str]:
    """Paragraphs separated by blank lines; single lines when there is no blank line."""
    content = content.replace("\r\n", "\n").replace("\r", "\n")
    pieces = re.split(r"\n[ \t]*\n", content) if re.search(r"\n[ \t]*\n", content) else content.splitlines()
    return [piece.strip() for piece in pieces]


def _json_records(path: Path, content: str) -> Iterator[tuple[str, object]]:
    """(position label, record) of a JSON array file or of a JSON-lines file."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(content)
        except json.JSONDecodeError:
            data = None  # not one JSON document: read it as JSON lines
        if data is not None:
            if not isinstance(data, list):
                raise CorpusError(f"{path}: expected a JSON list of records or JSON lines, found a {type(data).__name__}")
            for index, record in enumerate(data):
                yield f"record {index}", record
            return
    try:
        for index, (number, record) in enumerate(parse_lines(content, path)):
            yield f"record {index} (line {number})", record
    except JsonlError as err:
        raise CorpusError(f"{path}: record {err.index} (line {err.line}) is not valid JSON ({err.reason})") from err


def _json_texts(path: Path, content: str) -> Iterator[str]:
    for where, record in _json_records(path, content):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            found = f"fields {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
            raise CorpusError(f"{path}: {where} has no string field 'text' (found {found})")
        yield text.strip()


def _first_texts(texts: Iterable[str], n_texts: int, name: str) -> list[str]:
    """The first ``n_texts`` non-empty texts; an error when there are none."""
    chosen: list[str] = []
    for text in texts:
        if len(chosen) == n_texts:
            break
        if text.strip():
            chosen.append(text)
    if not chosen:
        raise CorpusError(f"{name}: the corpus has no non-empty texts")
    if len(chosen) < n_texts:
        logger.warning("%s: only %d non-empty texts, fewer than the %d asked for", name, len(chosen), n_texts)
    return chosen


def _open_path(path: Path, n_texts: int) -> CorpusSource:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CorpusError(f"{path}: the folder has no *.txt files")
        contents = [(f.name, f.read_bytes()) for f in files]
        identity = "file:" + _sha16(part for name, data in contents for part in (name.encode(), b"\0", data, b"\0"))
        load = lambda: _first_texts((t for _, data in contents for t in _split_text(data.decode("utf-8"))), n_texts, str(path))
        return CorpusSource(identity, load)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise CorpusError(f"{path}: unsupported file type {suffix!r}; the corpus must be {CORPUS_FORMS}")
    data = path.read_bytes()
    identity = "file:" + _sha16([data])
    if suffix == ".txt":
        return CorpusSource(identity, lambda: _first_texts(_split_text(data.decode("utf-8")), n_texts, str(path)))
    return CorpusSource(identity, lambda: _first_texts(_json_texts(path, data.decode("utf-8")), n_texts, str(path)))


# -- Hugging Face datasets -------------------------------------------------------------------------


def _open_hf(spec: str, n_texts: int) -> CorpusSource:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise CorpusError(f"{spec!r}: expected 'hf:<dataset>[:<config>[:<split>]]'")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 and parts[2] else "train")
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types: connection, missing config, missing split
        raise CorpusError(
            f"cannot load {spec!r} ({type(err).__name__}: {err}). Without network access a 'hf:' corpus works only when the dataset "
            f"is already in the local Hugging Face cache (HF_DATASETS_OFFLINE=1 makes that check fail fast). Use corpus='model' "
            f"(text sampled from the model) or a local .txt/.jsonl file instead."
        ) from err
    if "text" not in dataset.column_names:
        raise CorpusError(f"{spec!r}: the dataset has no 'text' column (columns: {dataset.column_names})")
    identity = f"hf:{name}:{config or ''}:{split}:{getattr(dataset, '_fingerprint', '')}"
    return CorpusSource(identity, lambda: _first_texts((row["text"] or "" for row in dataset), n_texts, spec))


# -- specs ---------------------------------------------------------------------------------------


def open_corpus(
    spec: str, model: torch.nn.Module, tokenizer, n_texts: int, *, length: int = 128, seed: int = 0, model_id: str | None = None, progress: bool = True
) -> CorpusSource:
    """The identity of corpus ``spec`` and a function that returns its first ``n_texts`` texts.

    ``length`` and ``seed`` apply to ``"model"`` only. ``model_id`` names the model the samples
    are cached under (default: :func:`editors.stats.model_fingerprint`); pass the unedited
    model's identity to keep one corpus while the model is being edited.
    """
    if n_texts < 1:
        raise ValueError(f"n_texts must be >= 1, got {n_texts}")
    if spec == "model":
        if model_id is None:
            from factedit.models import model_fingerprint

            model_id = model_fingerprint(model)
        fingerprint = model_id
        return CorpusSource(
            f"model-samples:{fingerprint}:{length}:{seed}",
            lambda: _cached_samples(model, tokenizer, fingerprint, n_texts, length, seed, progress),
        )
    if spec.startswith("hf:"):
        return _open_hf(spec, n_texts)
    path = Path(spec).expanduser()
    if path.exists():
        return _open_path(path, n_texts)
    raise CorpusError(f"unknown corpus {spec!r} (no such file or folder); the corpus must be {CORPUS_FORMS}")
