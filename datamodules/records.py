"""The one place where raw JSON rows become :class:`~editors.base.EditRequest` objects.

Four source formats are understood (``format=`` names, or detected from the first record):

``counterfact``
    ROME's CounterFact: ``case_id``, ``requested_rewrite{prompt with "{}", subject,
    target_new{str}, target_true{str}}``, ``paraphrase_prompts``, ``neighborhood_prompts``,
    ``attribute_prompts``, ``generation_prompts`` and, in EasyEdit's portability files,
    ``portability{New Question, New Answer}``.
``counterfact_easyedit``
    EasyEdit's flat CounterFact splits: ``case_id``, ``prompt``, ``subject``, ``target_new``,
    ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``.
``zsre``
    MEND's zsRE: ``subject``, ``src``, ``alt`` (the new answer), ``answers``, ``rephrase``,
    ``loc``/``loc_ans`` (a Natural Questions probe), optionally ``portability``.
``knowedit``
    KnowEdit (ZsRE, WikiData counterfact, WikiData recent): ``prompt``, ``subject``,
    ``target_new``, ``ground_truth`` (a string, a list, or a nested list of aliases; absent for
    new facts), ``rephrase_prompt``, and ``locality``/``portability`` as
    ``{category: [{prompt, ground_truth}]}``.

Raw files are parsed with the standard library (``json.loads``; JSON Lines line by line) rather
than with ``datasets.load_dataset`` for two reasons: a broken file is reported with its exact
line and column (and, for JSON Lines, the record's line), and KnowEdit mixes strings and
(nested) lists in the same field, which Arrow's schema inference rejects. Every record is then
checked and normalised here, and the result is an :class:`EditRequest` with one fixed schema,
which :func:`requests_to_dataset` turns into a HF ``datasets.Dataset`` for tokenization and
caching in the datamodules.

Every bad record raises :class:`RecordError`, which names the file, the record's index (and
``case_id``), and the field as the *source file* spells it, e.g.
``counterfact.json: record 12 (case_id 345): field 'requested_rewrite.subject': ...``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from datamodules.sources import resolve_source
from editors.base import QA, EditRequest

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("counterfact", "counterfact_easyedit", "zsre", "knowedit")

_FORMAT_HINTS = (
    "counterfact (ROME: case_id, requested_rewrite, paraphrase_prompts, neighborhood_prompts, ...), "
    "counterfact_easyedit (case_id, prompt, subject, target_new, ground_truth, rephrase_prompt, "
    "locality_prompt, locality_ground_truth), "
    "zsre (MEND: subject, src, alt, answers, rephrase, loc, loc_ans), "
    "knowedit (prompt, subject, target_new, ground_truth, rephrase_prompt, locality{...}, portability{...})"
)

_JSONL_SUFFIXES = (".jsonl", ".ndjson")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class RecordError(ValueError):
    """A data file or one of its records cannot be turned into an :class:`EditRequest`.

    ``path`` is the file; ``index`` the record's position (0-based, ``None`` for errors about the
    whole file); ``field`` the offending field as the source spells it (dotted for nested keys,
    ``[i]`` for list items; ``None`` when the record as a whole is wrong); ``line`` and
    ``column`` locate JSON syntax errors and JSON Lines records; ``reason`` is the message
    without its location.
    """

    def __init__(
        self,
        reason: str,
        path: str | os.PathLike[str],
        index: int | None = None,
        field: str | None = None,
        case_id: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.reason = reason
        self.path = Path(path)
        self.index = index
        self.field = field
        self.case_id = case_id
        self.line = line
        self.column = column
        super().__init__(self._render())

    def _render(self) -> str:
        where = [str(self.path)]
        if self.index is not None:
            record = f"record {self.index}"
            if self.line is not None:
                record += f" (line {self.line})"
            if self.case_id is not None:
                record += f" (case_id {self.case_id})"
            where.append(record)
        elif self.line is not None:
            where.append(f"line {self.line}" + (f" column {self.column}" if self.column is not None else ""))
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return ": ".join(where + [self.reason])

    def __reduce__(self):  # keep the attributes when pickled (e.g. by dataloader workers)
        return (_rebuild_record_error, (self.reason, str(self.path), self.index, self.field, self.case_id, self.line, self.column))


def _rebuild_record_error(*args: Any) -> RecordError:
    return RecordError(*args)


# --------------------------------------------------------------------------------------------
# Raw files
# --------------------------------------------------------------------------------------------


class RawRecord(NamedTuple):
    """One parsed JSON value from a data file, with where it came from."""

    index: int
    line: int | None  # 1-based line in a JSON Lines file; None for records of a JSON array
    data: Any


def read_raw_records(path: str | os.PathLike[str]) -> list[RawRecord]:
    """Parse a JSON array file or a JSON Lines file into its raw records.

    Files ending in ``.jsonl``/``.ndjson``, or whose first non-blank character is not ``[``, are
    read as JSON Lines (one object per line, blank lines ignored). Syntax errors raise
    :class:`RecordError` with the line and column.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecordError(f"not UTF-8 text (byte {err.start}: {err.reason})", path) from err
    stripped = text.lstrip()
    if not stripped:
        return []
    if path.suffix.lower() in _JSONL_SUFFIXES or not stripped.startswith("["):
        return _read_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"invalid JSON: {err.msg}", path, line=err.lineno, column=err.colno) from err
    return [RawRecord(i, None, row) for i, row in enumerate(data)]


def _read_jsonl(path: Path, text: str) -> list[RawRecord]:
    records: list[RawRecord] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(
                f"invalid JSON: {err.msg} (JSON Lines files hold one complete object per line; "
                f"a JSON file must hold an array of records)",
                path,
                index=len(records),
                line=line_no,
                column=err.colno,
            ) from err
        records.append(RawRecord(len(records), line_no, data))
    return records


# --------------------------------------------------------------------------------------------
# Typed access to one raw record
# --------------------------------------------------------------------------------------------

_Key = str | int


def _field_name(keys: Sequence[_Key]) -> str:
    name = ""
    for key in keys:
        if isinstance(key, int):
            name += f"[{key}]"
        else:
            name += f".{key}" if name else key
    return name


class _Missing:
    """Marks a key that the record does not have (``None`` is JSON's null)."""


_MISSING = _Missing()


class _Row:
    """Reads typed fields from one raw record; every failure names the source field."""

    def __init__(self, raw: RawRecord, path: Path) -> None:
        self.raw = raw
        self.path = path
        self.case_id: str | None = None  # shown in messages once known

    def error(self, field: Sequence[_Key] | str | None, reason: str) -> RecordError:
        name = field if isinstance(field, str) or field is None else _field_name(field)
        return RecordError(reason, self.path, index=self.raw.index, field=name, case_id=self.case_id, line=self.raw.line)

    def get(self, *keys: _Key) -> Any:
        """The value at ``keys``, or ``_MISSING``; an intermediate that is not an object is an error."""
        value = self.raw.data
        for depth, key in enumerate(keys):
            if isinstance(key, int):
                if not isinstance(value, list):
                    raise self.error(keys[:depth], f"expected a list, got {_type_name(value)}")
                if key >= len(value):
                    return _MISSING
            elif not isinstance(value, dict):
                raise self.error(keys[:depth], f"expected an object, got {_type_name(value)}")
            elif key not in value:
                return _MISSING
            value = value[key]
        return value

    def has(self, *keys: _Key) -> bool:
        """Whether the field is present and not null."""
        value = self.get(*keys)
        return value is not _MISSING and value is not None

    def string(self, *keys: _Key) -> str:
        """A required string field (emptiness is checked by :meth:`EditRequest.problems`)."""
        value = self.get(*keys)
        if value is _MISSING:
            raise self.error(keys, "missing")
        if not isinstance(value, str):
            raise self.error(keys, f"expected a string, got {_type_name(value)}")
        return value

    def optional_string(self, *keys: _Key) -> str | None:
        return self.string(*keys) if self.has(*keys) else None

    def nonempty_string(self, *keys: _Key) -> str:
        value = self.string(*keys)
        if not value.strip():
            raise self.error(keys, "is empty")
        return value

    def strings(self, *keys: _Key) -> tuple[str, ...]:
        """An optional list of strings (missing or null gives an empty tuple)."""
        value = self.get(*keys)
        if value is _MISSING or value is None:
            return ()
        if not isinstance(value, list):
            raise self.error(keys, f"expected a list of strings, got {_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error((*keys, i), f"expected a string, got {_type_name(item)}")
        return tuple(value)

    def mapping(self, *keys: _Key) -> dict[str, Any] | None:
        value = self.get(*keys)
        if value is _MISSING or value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(keys, f"expected an object, got {_type_name(value)}")
        return value

    def case_id_field(self, *keys: _Key) -> str:
        value = self.get(*keys)
        if value is _MISSING:
            raise self.error(keys, "missing")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.error(keys, f"expected a string or an integer, got {_type_name(value)}")
        if isinstance(value, str) and not value.strip():
            raise self.error(keys, "is empty")
        return str(value)

    def aliases(self, *keys: _Key) -> tuple[str, ...]:
        """Every non-empty string in a string, list or nested list of aliases, in order, deduplicated."""
        found: list[str] = []

        def walk(value: Any, at: tuple[_Key, ...]) -> None:
            if isinstance(value, str):
                if value.strip() and value not in found:
                    found.append(value)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    walk(item, (*at, i))
            else:
                raise self.error(at, f"expected a string or a (nested) list of strings, got {_type_name(value)}")

        value = self.get(*keys)
        if value is not _MISSING and value is not None:
            walk(value, tuple(keys))
        return tuple(found)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------
# The formats
# --------------------------------------------------------------------------------------------


def _portability_qa(row: _Row) -> tuple[QA, ...]:
    """EasyEdit's single portability probe ``{Recalled Relation, New Question, New Answer}``."""
    if row.mapping("portability") is None:
        return ()
    return (QA(row.string("portability", "New Question"), row.string("portability", "New Answer"), kind="portability"),)


def _parse_counterfact(row: _Row) -> dict[str, Any]:
    row.case_id = row.case_id_field("case_id")
    if row.mapping("requested_rewrite") is None:
        raise row.error("requested_rewrite", "missing" if row.get("requested_rewrite") is _MISSING else "is null")
    template = row.string("requested_rewrite", "prompt")
    subject = row.string("requested_rewrite", "subject")
    if "{}" not in template:
        raise row.error("requested_rewrite.prompt", f"has no '{{}}' placeholder for the subject: {template!r}")
    target_true = row.nonempty_string("requested_rewrite", "target_true", "str")
    neighborhood = row.strings("neighborhood_prompts")
    return dict(
        case_id=row.case_id,
        prompt=template.replace("{}", subject),
        subject=subject,
        target_new=row.string("requested_rewrite", "target_new", "str"),
        target_true=target_true,
        rephrase_prompts=row.strings("paraphrase_prompts"),
        # Neighbours share the true answer: the token protocol scores them as locality probes.
        locality=tuple(QA(p, target_true, kind="neighborhood") for p in neighborhood),
        portability=_portability_qa(row),
        neighborhood_prompts=neighborhood,
        attribute_prompts=row.strings("attribute_prompts"),
        generation_prompts=row.strings("generation_prompts"),
    )


def _parse_counterfact_easyedit(row: _Row) -> dict[str, Any]:
    row.case_id = row.case_id_field("case_id")
    target_true = row.nonempty_string("ground_truth")
    rephrase = row.optional_string("rephrase_prompt")
    locality: tuple[QA, ...] = ()
    neighborhood: tuple[str, ...] = ()
    if row.has("locality_prompt") or row.has("locality_ground_truth"):
        loc_prompt = row.string("locality_prompt")
        loc_answer = row.string("locality_ground_truth")
        locality = (QA(loc_prompt, loc_answer, kind="neighborhood"),)
        # The probability protocol compares P(true) with P(new) on neighbourhood prompts, which
        # only means something when the neighbour's true answer is this fact's true answer.
        if loc_answer == target_true:
            neighborhood = (loc_prompt,)
    return dict(
        case_id=row.case_id,
        prompt=row.string("prompt"),
        subject=row.string("subject"),
        target_new=row.string("target_new"),
        target_true=target_true,
        rephrase_prompts=(rephrase,) if rephrase is not None else (),
        locality=locality,
        neighborhood_prompts=neighborhood,
    )


def _parse_zsre(row: _Row) -> dict[str, Any]:
    row.case_id = row.case_id_field("case_id") if row.has("case_id") else str(row.raw.index)
    answers = row.strings("answers")
    # An empty true answer means "unknown", as a missing one does.
    target_true = answers[0] if answers and answers[0].strip() else None
    rephrase = row.optional_string("rephrase")
    locality: tuple[QA, ...] = ()
    if row.has("loc") or row.has("loc_ans"):
        # Kept verbatim, with its "nq question: " prefix, as EasyEdit scores it.
        locality = (QA(row.string("loc"), row.string("loc_ans"), kind="nq"),)
    return dict(
        case_id=row.case_id,
        prompt=row.string("src"),
        subject=row.string("subject"),
        target_new=row.string("alt"),
        target_true=target_true,
        rephrase_prompts=(rephrase,) if rephrase is not None else (),
        locality=locality,
        portability=_portability_qa(row),
    )


def _knowedit_probes(row: _Row, section: str) -> tuple[QA, ...]:
    groups = row.mapping(section)
    if groups is None:
        return ()
    probes: list[QA] = []
    for kind, items in groups.items():
        if items is None:
            continue
        if not isinstance(items, list):
            raise row.error((section, kind), f"expected a list of {{prompt, ground_truth}} objects, got {_type_name(items)}")
        for i, _ in enumerate(items):
            prompt = row.string(section, kind, i, "prompt")
            aliases = row.aliases(section, kind, i, "ground_truth")
            if not aliases:
                # KnowEdit's WikiData sets contain probes whose alias lists are all empty: there is
                # nothing to score, so the probe (not the record) is left out.
                logger.debug("%s: record %d: %s.%s[%d] has no answer; probe left out", row.path, row.raw.index, section, kind, i)
                continue
            probes.append(QA(prompt, aliases[0], aliases=aliases, kind=kind))
    return tuple(probes)


def _parse_knowedit(row: _Row) -> dict[str, Any]:
    row.case_id = row.case_id_field("case_id") if row.has("case_id") else str(row.raw.index)
    truths = row.aliases("ground_truth")  # absent for new facts (wiki_recent); empty means unknown too
    if isinstance(row.get("rephrase_prompt"), list):  # some KnowEdit versions list several
        rephrases = row.strings("rephrase_prompt")
    else:
        rephrase = row.optional_string("rephrase_prompt")
        rephrases = (rephrase,) if rephrase is not None else ()
    return dict(
        case_id=row.case_id,
        prompt=row.string("prompt"),
        subject=row.string("subject"),
        target_new=row.string("target_new"),
        target_true=truths[0] if truths else None,
        rephrase_prompts=rephrases,
        locality=_knowedit_probes(row, "locality"),
        portability=_knowedit_probes(row, "portability"),
    )


@dataclass(frozen=True)
class _Format:
    parse: Callable[[_Row], dict[str, Any]]
    # EditRequest field -> the source field it comes from, to name problems as the file spells them.
    source_fields: Mapping[str, str]


_FORMATS: Mapping[str, _Format] = MappingProxyType(
    {
        "counterfact": _Format(
            _parse_counterfact,
            MappingProxyType(
                {
                    "prompt": "requested_rewrite.prompt",
                    "subject": "requested_rewrite.subject",
                    "target_new": "requested_rewrite.target_new.str",
                    "target_true": "requested_rewrite.target_true.str",
                    "rephrase_prompts": "paraphrase_prompts",
                    "locality": "neighborhood_prompts",
                    "portability": "portability.New Answer",
                }
            ),
        ),
        "counterfact_easyedit": _Format(
            _parse_counterfact_easyedit,
            MappingProxyType(
                {
                    "target_true": "ground_truth",
                    "rephrase_prompts": "rephrase_prompt",
                    "locality": "locality_ground_truth",
                    "neighborhood_prompts": "locality_prompt",
                }
            ),
        ),
        "zsre": _Format(
            _parse_zsre,
            MappingProxyType(
                {
                    "prompt": "src",
                    "target_new": "alt",
                    "target_true": "answers",
                    "rephrase_prompts": "rephrase",
                    "locality": "loc_ans",
                    "portability": "portability.New Answer",
                }
            ),
        ),
        "knowedit": _Format(
            _parse_knowedit,
            MappingProxyType({"target_true": "ground_truth", "rephrase_prompts": "rephrase_prompt"}),
        ),
    }
)


def detect_format(record: Any, path: str | os.PathLike[str] = "<records>", index: int = 0) -> str:
    """Guess a record's format from its keys; raise :class:`RecordError` when none fits."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {_type_name(record)}", path, index=index)
    keys = set(record)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"text", "labels"} <= keys or "concept" in keys:
        raise RecordError(
            f"looks like a WikiBio record (keys {sorted(keys)}); the WikiBio format (long-form text "
            f"edits) is not supported; supported formats: {', '.join(FORMATS)}",
            path,
            index=index,
        )
    if {"prompt", "target_new"} <= keys:
        if isinstance(record.get("locality"), dict) or isinstance(record.get("portability"), dict) or isinstance(record.get("ground_truth"), list):
            return "knowedit"
        if isinstance(record.get("locality_prompt"), str):
            return "counterfact_easyedit"
    raise RecordError(
        f"cannot tell the format from the keys {sorted(keys)}; known formats: {_FORMAT_HINTS}. "
        f"Pass format= explicitly if the file is one of them",
        path,
        index=index,
    )


def parse_record(raw: RawRecord, format: str, path: str | os.PathLike[str] = "<records>") -> EditRequest:
    """Turn one raw record into an :class:`EditRequest`, or raise :class:`RecordError`."""
    spec = _format_spec(format)
    row = _Row(raw, Path(path))
    if not isinstance(raw.data, dict):
        raise row.error(None, f"expected a JSON object, got {_type_name(raw.data)}")
    fields = spec.parse(row)
    try:
        return EditRequest(**fields)
    except ValueError:
        problems = _problems(fields)
        if not problems:  # pragma: no cover - EditRequest raises only for what problems() reports
            raise
        name, reason = problems[0]
        raise row.error(spec.source_fields.get(name, name), reason) from None


def _problems(fields: dict[str, Any]) -> list[tuple[str, str]]:
    """:meth:`EditRequest.check_fields` for fields that do not make a valid request."""
    return EditRequest.check_fields(fields)


def _format_spec(format: str) -> _Format:
    try:
        return _FORMATS[format]
    except KeyError:
        raise ValueError(f"unknown record format {format!r}; known formats: {', '.join(FORMATS)}") from None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def validate_records(
    source: str | os.PathLike[str],
    format: str | None = None,
    limit: int | None = None,
) -> tuple[list[EditRequest], list[RecordError]]:
    """Parse every record of ``source``; return the valid requests and the errors of the others.

    ``source`` is a file path or a known source name (see :mod:`datamodules.sources`); named
    full datasets are downloaded when missing. ``format=None`` detects the format from the
    first record. With ``limit``, reading stops once ``limit`` valid requests are found.
    Errors that concern the whole file (unreadable, invalid JSON, unknown format) are raised.
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
    for raw in raws:
        if limit is not None and len(requests) >= limit:
            break
        try:
            request = parse_record(raw, format, path)
            if request.case_id in first_seen:
                raise RecordError(
                    f"duplicate case_id (first used by record {first_seen[request.case_id]})",
                    path, index=raw.index, field="case_id", case_id=request.case_id, line=raw.line,
                )
        except RecordError as err:
            errors.append(err)
            continue
        first_seen[request.case_id] = raw.index
        requests.append(request)
    return requests, errors


def load_requests(
    source: str | os.PathLike[str],
    format: str | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
) -> list[EditRequest]:
    """Read the edit requests of a data file or named source.

    ``source``: a JSON array file, a JSON Lines file, or a known name (``counterfact-demo``,
    ``zsre-demo``, ``counterfact``, ``zsre``). ``format``: one of :data:`FORMATS`, or ``None`` to
    detect it. ``limit``: keep the first ``limit`` valid requests. ``skip_invalid``: log a
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


# --------------------------------------------------------------------------------------------
# HF datasets
# --------------------------------------------------------------------------------------------


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
