"""The one place where data files become :class:`~factedit.editors.requests.EditRequest` objects:
read (:mod:`.rows`), detect the format, check every record, and hand back requests.

The formats are registered in :mod:`.formats`, one module each (``format=`` names, or detected
from the first record): ``counterfact`` (ROME's CounterFact), ``counterfact_easyedit`` (EasyEdit's
flat CounterFact splits), ``zsre`` (MEND's zsRE), ``knowedit`` (KnowEdit's ZsRE and WikiData sets)
and ``mquake`` (MQuAKE's multi-hop cases, several requests per record).

Raw files are parsed with the standard library (``json.loads``; JSON Lines line by line) rather
than with ``datasets.load_dataset`` for two reasons: a broken file is reported with its exact
line and column (and, for JSON Lines, the record's line), and KnowEdit mixes strings and
(nested) lists in the same field, which Arrow's schema inference rejects. Every record is then
checked and normalised here, and the result is one :class:`EditRequest` per record (several for
a record that asks for several edits, as MQuAKE's do) with one fixed schema,
which :func:`requests_to_dataset` turns into a HF ``datasets.Dataset`` for tokenization and
caching in the datamodules.

Every bad record raises :class:`~.rows.RecordError`, which names the file, the record's index (and
``case_id``), and the field as the *source file* spells it, e.g.
``counterfact.json: record 12 (case_id 345): field 'requested_rewrite.subject': ...``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from factedit.datamodules.sources import resolve_source
from factedit.editors.requests import EditRequest

from .formats import Format, registered_formats
from .rows import RawRecord, RecordError, Row, read_raw_records, type_name

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = tuple(registered_formats())
"""The built-in formats' names (a format registered later is known to every function here too)."""

__all__ = ["FORMATS", "RecordError", "dataset_to_requests", "detect_format", "load_requests", "parse_records", "requests_to_dataset", "validate_records"]


def detect_format(record: Any, path: str | os.PathLike[str] = "<records>", index: int = 0) -> str:
    """Guess a record's format from its keys; raise :class:`RecordError` when none fits."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type_name(record)}", path, index=index)
    keys = set(record)
    formats = sorted(registered_formats().values(), key=lambda spec: spec.detect_rank)
    match = next((spec for spec in formats if spec.matches(record)), None)
    if match is not None:
        return match.name
    if {"text", "labels"} <= keys or "concept" in keys:
        raise RecordError(
            f"looks like a WikiBio record (keys {sorted(keys)}); the WikiBio format (long-form text "
            f"edits) is not supported; supported formats: {', '.join(registered_formats())}",
            path,
            index=index,
        )
    hints = ", ".join(spec.hint for spec in registered_formats().values())
    raise RecordError(
        f"cannot tell the format from the keys {sorted(keys)}; known formats: {hints}. "
        f"Pass format= explicitly if the file is one of them",
        path,
        index=index,
    )


def parse_records(raw: RawRecord, format: str, path: str | os.PathLike[str] = "<records>") -> list[EditRequest]:
    """Turn one raw record into its :class:`EditRequest` objects, or raise :class:`RecordError`.

    Most formats give one request per record; an MQuAKE record gives one per rewrite (all in one
    ``group``). A record is valid only as a whole: one bad rewrite rejects all of its requests.
    """
    spec = _format_spec(format)
    row = Row(raw, Path(path))
    if not isinstance(raw.data, dict):
        raise row.error(None, f"expected a JSON object, got {type_name(raw.data)}")
    parsed = spec.parse(row)
    requests: list[EditRequest] = []
    for position, fields in enumerate(parsed if isinstance(parsed, list) else [parsed]):
        try:
            requests.append(EditRequest(**fields))
        except ValueError:
            problems = _problems(fields)
            if not problems:  # pragma: no cover - EditRequest raises only for what problems() reports
                raise
            name, reason = problems[0]
            raise row.error(spec.source_field(name, position), reason) from None
    return requests


def _problems(fields: dict[str, Any]) -> list[tuple[str, str]]:
    """:meth:`EditRequest.check_fields` for fields that do not make a valid request."""
    return EditRequest.check_fields(fields)


def _format_spec(format: str) -> Format:
    try:
        return registered_formats()[format]
    except KeyError:
        raise ValueError(f"unknown record format {format!r}; known formats: {', '.join(registered_formats())}") from None


def validate_records(
    source: str | os.PathLike[str],
    format: str | None = None,
    limit: int | None = None,
) -> tuple[list[EditRequest], list[RecordError]]:
    """Parse every record of ``source``; return the valid requests and the errors of the others.

    ``source`` is a file path or a known source name (see :mod:`datamodules.sources`); named
    full datasets are downloaded when missing. ``format=None`` detects the format from the
    first record. With ``limit``, reading stops once ``limit`` valid records are read; a record
    that asks for several edits (MQuAKE) gives all its requests, so a group is never split
    (for the other formats a record is one request). Errors that concern the whole file
    (unreadable, invalid JSON, unknown format) are raised.
    """
    if format is not None:
        _format_spec(format)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be a non-negative integer or None, got {limit}")
    path, named_format = resolve_source(source)
    raws = read_raw_records(path)
    if not raws:
        logger.warning("%s holds no records", path)
        return [], []
    format = format or named_format or detect_format(raws[0].data, path, raws[0].index)
    requests: list[EditRequest] = []
    errors: list[RecordError] = []
    first_seen: dict[str, int] = {}
    valid_records = 0
    for raw in raws:
        if limit is not None and valid_records >= limit:
            break
        try:
            parsed = parse_records(raw, format, path)
            seen_here: set[str] = set()
            for request in parsed:
                if request.case_id in first_seen or request.case_id in seen_here:
                    first = first_seen.get(request.case_id, raw.index)
                    raise RecordError(
                        f"duplicate case_id (first used by record {first})",
                        # a grouped record is named by its own case_id (the group), as in the file
                        path, index=raw.index, field="case_id", case_id=request.group or request.case_id, line=raw.line,
                    )
                seen_here.add(request.case_id)
        except RecordError as err:
            errors.append(err)
            continue
        for request in parsed:
            first_seen[request.case_id] = raw.index
        requests.extend(parsed)
        valid_records += 1
    return requests, errors


def load_requests(
    source: str | os.PathLike[str],
    format: str | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
) -> list[EditRequest]:
    """Read the edit requests of a data file or named source.

    ``source``: a JSON array file, a JSON Lines file, or a known name (``counterfact-demo``,
    ``zsre-demo``, ``mquake-demo``, ``counterfact``, ``zsre``, ``mquake``). ``format``: one of
    :data:`FORMATS`, or ``None`` to detect it. ``limit``: keep the requests of the first ``limit``
    valid records (one request each, except MQuAKE's: one per rewrite). ``skip_invalid``: log a
    warning for each invalid record and leave it out, instead of raising :class:`RecordError`
    for the first one (use :func:`validate_records` to get the errors as values).
    """
    requests, errors = validate_records(source, format=format, limit=limit)
    if errors and not skip_invalid:
        first = errors[0]
        if len(errors) > 1:
            more = f" ({len(errors)} invalid records in all; pass skip_invalid=True to leave them out)"
        else:
            more = " (pass skip_invalid=True to leave invalid records out)"
        raise RecordError(first.reason + more, first.path, first.index, first.field, first.case_id, first.line, first.column)
    for err in errors:
        logger.warning("skipping invalid record: %s", err)
    if errors:
        logger.warning("%s: skipped %d invalid record(s), kept %d", errors[0].path, len(errors), len(requests))
    return requests


def request_features() -> "datasets.Features":
    """The Arrow schema of a normalised request (one row per :class:`EditRequest`)."""
    from datasets import Features, List, Value

    qa = {"prompt": Value("string"), "answer": Value("string"), "aliases": List(Value("string")), "kind": Value("string")}
    strings = List(Value("string"))
    return Features(
        {
            "case_id": Value("string"),
            "prompt": Value("string"),
            "subject": Value("string"),
            "target_new": Value("string"),
            "target_true": Value("string"),
            "rephrase_prompts": strings,
            "locality": List(qa),
            "portability": List(qa),
            "neighborhood_prompts": strings,
            "attribute_prompts": strings,
            "generation_prompts": strings,
            "group": Value("string"),
        }
    )


def requests_to_dataset(requests: Iterable[EditRequest]) -> "datasets.Dataset":
    """An in-memory ``datasets.Dataset`` with one row per request (see :func:`request_features`)."""
    from datasets import Dataset

    features = request_features()
    rows = [request.to_dict() for request in requests]
    if not rows:  # from_list cannot take the schema from an empty list
        return Dataset.from_dict({name: [] for name in features}, features=features)
    return Dataset.from_list(rows, features=features)


def dataset_to_requests(dataset: "datasets.Dataset") -> list[EditRequest]:
    """The inverse of :func:`requests_to_dataset` (extra columns are ignored)."""
    return [EditRequest.from_dict(row) for row in dataset]
