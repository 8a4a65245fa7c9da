"""Checks ``edit.py`` makes once the model is loaded and before anything is scored.

The data layer (:mod:`datamodules.records`) checks a record's format without a model. Whether a
record fits the model needs the model's tokenizer and context length, and whether an editor can
find its modules needs the model's architecture: both are checked here, so that a run stops (or
skips the record) at once with the record or setting named, instead of failing deep inside the
model after minutes of scoring.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Sequence

from factedit.datamodules import RecordError
from factedit.editors.base import EditorConfig, EditRequest
from factedit.editors.core.corpus import max_positions
from factedit.editors.core.lm import encode_pair
from factedit.editors.core.targets import UnknownArchitectureError, get_targets

from .generation import GENERATION_MARGIN
from .scoring import EvalConfig


class PreflightError(ValueError):
    """The editor's settings cannot work on the loaded model."""


def check_targets(model, config: EditorConfig) -> None:
    """Refuse an architecture the targets table lacks, for editors that locate modules by that
    table (those whose config has ``targets`` overrides), naming the setting that fixes it."""
    if not any(f.name == "targets" for f in dataclasses.fields(config)):
        return
    try:
        get_targets(model, getattr(config, "targets"))
    except UnknownArchitectureError as error:
        raise PreflightError(
            f"{error.args[0]}. Set --editor.targets to a mapping of role -> module template of this model "
            f"(or add the architecture to TARGETS in editors/core/targets.py)"
        ) from None


def _probes(tokenizer, request: EditRequest, config: EvalConfig) -> Iterator[tuple[str, int]]:
    """(field, tokens) of every sequence scoring puts through the model for ``request``: each
    prompt with its longest target under teacher forcing, and with the new tokens generation
    may add to it (greedy answers, fluency samples), as :mod:`evaluation.scoring` measures."""

    def tokens(prompt: str) -> int:
        return len(tokenizer(prompt)["input_ids"])

    def forced(prompt: str, answers: Sequence[str]) -> int:
        return max(sum(map(len, encode_pair(tokenizer, prompt, answer))) for answer in answers)

    def answered(prompt: str, answers: Sequence[str]) -> int:
        longest = max(len(encode_pair(tokenizer, prompt, answer)[1]) for answer in answers)
        greedy = tokens(prompt) + min(longest + GENERATION_MARGIN, config.generation_max_new_tokens) if config.generation_scoring else 0
        return max(forced(prompt, answers), greedy)

    targets = [request.target_new] + ([request.target_true] if request.target_true is not None else [])
    yield "prompt", answered(request.prompt, targets)
    for i, prompt in enumerate(request.rephrase_prompts):
        yield f"rephrase_prompts[{i}]", answered(prompt, targets)
    for i, qa in enumerate(request.locality):
        yield f"locality[{i}]", forced(qa.prompt, [qa.answer])
    for i, qa in enumerate(request.portability):
        yield f"portability[{i}]", answered(qa.prompt, list(dict.fromkeys((qa.answer, *qa.aliases))))
    if request.target_true is not None:
        for i, prompt in enumerate(request.neighborhood_prompts):
            yield f"neighborhood_prompts[{i}]", forced(prompt, targets)
    if config.fluency:
        for i, prompt in enumerate(list(dict.fromkeys(request.generation_prompts))[: config.generation_prompts]):
            yield f"generation_prompts[{i}]", tokens(prompt) + config.generation_length


def _surely_fits(request: EditRequest, config: EvalConfig, limit: int) -> bool:
    """A bound that spares tokenizing every probe of a large data set: a text is at most two
    tokens per UTF-8 byte (byte-level BPE: one; SentencePiece may add a word-boundary piece),
    plus a few special tokens, plus what generation adds."""
    prompts = [request.prompt, *request.rephrase_prompts, *request.neighborhood_prompts, *request.generation_prompts]
    prompts += [qa.prompt for qa in (*request.locality, *request.portability)]
    answers = [request.target_new, request.target_true or ""] + [a for qa in (*request.locality, *request.portability) for a in (qa.answer, *qa.aliases)]
    longest = max(len(p.encode()) for p in prompts) + max(len(a.encode()) for a in answers) + 1
    added = max(config.generation_max_new_tokens if config.generation_scoring else 0, config.generation_length if config.fluency else 0)
    return 2 * longest + 8 + added <= limit


def too_long(model, tokenizer, request: EditRequest, config: EvalConfig) -> tuple[str, int, int] | None:
    """The first field of ``request`` that does not fit the model's context, as (field, tokens,
    positions); ``None`` when everything fits or the model's config names no maximum."""
    limit = max_positions(model)
    if limit is None or _surely_fits(request, config, limit):
        return None
    for field, length in _probes(tokenizer, request, config):
        if length > limit:
            return field, length, limit
    return None


def requests_that_fit(
    model, tokenizer, requests: Sequence[EditRequest], config: EvalConfig, path: str | os.PathLike[str]
) -> tuple[list[EditRequest], list[RecordError]]:
    """The requests whose every probe fits the model's context, and an error naming the file
    (``path``), the case and the field of each record that does not. The rewrites of a group
    are one record: one that does not fit rejects the group."""
    errors: dict[str, RecordError] = {}  # record (group or case id) -> its error
    for request in requests:
        record = request.group or request.case_id
        found = None if record in errors else too_long(model, tokenizer, request, config)
        if found is not None:
            field, length, limit = found
            hint = f" with --eval.generation_length {config.generation_length} new tokens" if field.startswith("generation_prompts") else ""
            reason = f"{length} tokens{hint} do not fit the model's context of {limit} positions"
            errors[record] = RecordError(reason, path, field=field, case_id=record)
    kept = [r for r in requests if (r.group or r.case_id) not in errors]
    return kept, list(errors.values())
