"""The one place where raw JSON rows become :class:`~editors.base.EditRequest` objects.

Five source formats are understood (``format=`` names, or detected from the first record):

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
``mquake``
    MQuAKE (Zhong et al., 2023, "MQuAKE: Assessing Knowledge Editing in Language Models via
    Multi-Hop Questions"): ``case_id``, ``requested_rewrite`` as a *list* of CounterFact-style
    rewrites (each ``{prompt with "{}", subject, target_new{str}, target_true{str}, question?}``),
    ``questions`` (multi-hop questions), ``new_answer``, ``new_answer_alias`` and
    ``new_single_hops`` (``{question, cloze, answer, answer_alias}``). One record is one edit case
    that asks for several edits at once: it yields one request per rewrite (see
    :func:`parse_records`).

Raw files are parsed with the standard library (``json.loads``; JSON Lines line by line) rather
than with ``datasets.load_dataset`` for two reasons: a broken file is reported with its exact
line and column (and, for JSON Lines, the record's line), and KnowEdit mixes strings and
(nested) lists in the same field, which Arrow's schema inference rejects. Every record is then
checked and normalised here, and the result is one :class:`EditRequest` per record (several for
a record that asks for several edits, as MQuAKE's do) with one fixed schema,
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

from factedit.datamodules.sources import resolve_source
from factedit.editors.requests import QA, EditRequest

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("counterfact", "counterfact_easyedit", "zsre", "knowedit", "mquake")

_FORMAT_HINTS = (
    "counterfact (ROME: case_id, requested_rewrite, paraphrase_prompts, neighborhood_prompts, ...), "
    "counterfact_easyedit (case_id, prompt, subject, target_new, ground_truth, rephrase_prompt, "
    "locality_prompt, locality_ground_truth), "
    "zsre (MEND: subject, src, alt, answers, rephrase, loc, loc_ans), "
    "knowedit (prompt, subject, target_new, ground_truth, rephrase_prompt, locality{...}, portability{...}), "
    "mquake (case_id, requested_rewrite [list], questions, new_answer, new_answer_alias, new_single_hops)"
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
        elif self.case_id is not None:  # a record found by its case id (checks made after loading)
            where.append(f"case_id {self.case_id}")
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


MULTI_HOP_KIND = "multi_hop"
"""``QA.kind`` of MQuAKE's multi-hop questions (scored as ``portability_multi_hop``)."""
SINGLE_HOP_KIND = "single_hop"
"""``QA.kind`` of MQuAKE's single-hop probes of the edited chain (``portability_single_hop``)."""


def _answer_and_aliases(row: _Row, answer_keys: tuple[_Key, ...], alias_keys: tuple[_Key, ...]) -> tuple[str, tuple[str, ...]]:
    """A required non-empty answer and every acceptable answer (the answer first, then its aliases)."""
    answer = row.nonempty_string(*answer_keys)
    aliases = (answer,) + tuple(a for a in row.aliases(*alias_keys) if a != answer)
    return answer, aliases


def _mquake_probes(row: _Row) -> tuple[QA, ...]:
    """The case's multi-hop questions (answered by ``new_answer``) and its new single hops.

    Single hops are asked as their cloze statement (``"The capital of France is"``), the form in
    which MQuAKE checks single-hop knowledge; a hop without a cloze is asked as its question.
    """
    if row.get("questions") is _MISSING:
        raise row.error("questions", "missing (an MQuAKE case needs its multi-hop questions)")
    questions = row.strings("questions")
    if not questions:
        raise row.error("questions", "is empty (an MQuAKE case needs its multi-hop questions)")
    for i, question in enumerate(questions):
        if not question.strip():
            raise row.error(("questions", i), "is empty")
    answer, aliases = _answer_and_aliases(row, ("new_answer",), ("new_answer_alias",))
    probes = [QA(question, answer, aliases=aliases, kind=MULTI_HOP_KIND) for question in questions]
    hops = row.get("new_single_hops")
    if hops is not _MISSING and hops is not None:
        if not isinstance(hops, list):
            raise row.error("new_single_hops", f"expected a list of {{question, cloze, answer, answer_alias}} objects, got {_type_name(hops)}")
        for i, hop in enumerate(hops):
            if not isinstance(hop, dict):
                raise row.error(("new_single_hops", i), f"expected an object, got {_type_name(hop)}")
            cloze = row.optional_string("new_single_hops", i, "cloze")
            prompt = cloze if cloze is not None and cloze.strip() else row.nonempty_string("new_single_hops", i, "question")
            hop_answer, hop_aliases = _answer_and_aliases(row, ("new_single_hops", i, "answer"), ("new_single_hops", i, "answer_alias"))
            probes.append(QA(prompt, hop_answer, aliases=hop_aliases, kind=SINGLE_HOP_KIND))
    return tuple(probes)


def _parse_mquake(row: _Row) -> list[dict[str, Any]]:
    """One request per rewrite, ``case_id`` ``"<case>/<k>"``, all in group ``"<case>"``; the
    multi-hop and single-hop probes go to the last request, which completes the group's edits."""
    row.case_id = row.case_id_field("case_id")
    rewrites = row.get("requested_rewrite")
    if rewrites is _MISSING or rewrites is None:
        raise row.error("requested_rewrite", "missing" if rewrites is _MISSING else "is null")
    if not isinstance(rewrites, list):
        raise row.error("requested_rewrite", f"expected a list of rewrites (MQuAKE), got {_type_name(rewrites)}")
    if not rewrites:
        raise row.error("requested_rewrite", "is empty (an MQuAKE case needs at least one rewrite)")
    fields: list[dict[str, Any]] = []
    for k in range(len(rewrites)):
        if row.mapping("requested_rewrite", k) is None:
            raise row.error(("requested_rewrite", k), "expected an object, got null")
        template = row.string("requested_rewrite", k, "prompt")
        subject = row.string("requested_rewrite", k, "subject")
        if "{}" not in template:
            raise row.error(("requested_rewrite", k, "prompt"), f"has no '{{}}' placeholder for the subject: {template!r}")
        question = row.optional_string("requested_rewrite", k, "question")
        fields.append(
            dict(
                case_id=f"{row.case_id}/{k}",
                prompt=template.replace("{}", subject),
                subject=subject,
                target_new=row.string("requested_rewrite", k, "target_new", "str"),
                target_true=row.nonempty_string("requested_rewrite", k, "target_true", "str"),
                # The rewrite asked as a question has the new target as its answer: a rephrasing.
                rephrase_prompts=(question,) if question is not None and question.strip() else (),
                group=row.case_id,
            )
        )
    fields[-1]["portability"] = _mquake_probes(row)
    return fields


def _mquake_source_fields(k: int) -> Mapping[str, str]:
    rewrite = f"requested_rewrite[{k}]"
    return {
        "prompt": f"{rewrite}.prompt",
        "subject": f"{rewrite}.subject",
        "target_new": f"{rewrite}.target_new.str",
        "target_true": f"{rewrite}.target_true.str",
        "rephrase_prompts": f"{rewrite}.question",
        "portability": "new_answer",
        "group": "case_id",
    }


@dataclass(frozen=True)
class _Format:
    # The request fields of one raw record: a dict, or a list of dicts for a record that asks for
    # several edits (MQuAKE).
    parse: Callable[[_Row], dict[str, Any] | list[dict[str, Any]]]
    # EditRequest field -> the source field it comes from, to name problems as the file spells
    # them; a function of the request's position in its record where that matters.
    source_fields: Mapping[str, str] | Callable[[int], Mapping[str, str]]

    def source_field(self, name: str, position: int) -> str:
        fields = self.source_fields(position) if callable(self.source_fields) else self.source_fields
        return fields.get(name, name)


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
        "mquake": _Format(_parse_mquake, _mquake_source_fields),
    }
)


def detect_format(record: Any, path: str | os.PathLike[str] = "<records>", index: int = 0) -> str:
    """Guess a record's format from its keys; raise :class:`RecordError` when none fits."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {_type_name(record)}", path, index=index)
    keys = set(record)
    if "requested_rewrite" in keys:
        # MQuAKE lists its rewrites (one case, several edits); CounterFact has exactly one.
        if isinstance(record["requested_rewrite"], list) or {"questions", "new_single_hops"} & keys:
            return "mquake"
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


def parse_records(raw: RawRecord, format: str, path: str | os.PathLike[str] = "<records>") -> list[EditRequest]:
    """Turn one raw record into its :class:`EditRequest` objects, or raise :class:`RecordError`.

    Most formats give one request per record; an MQuAKE record gives one per rewrite (all in one
    ``group``). A record is valid only as a whole: one bad rewrite rejects all of its requests.
    """
    spec = _format_spec(format)
    row = _Row(raw, Path(path))
    if not isinstance(raw.data, dict):
        raise row.error(None, f"expected a JSON object, got {_type_name(raw.data)}")
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


def parse_record(raw: RawRecord, format: str, path: str | os.PathLike[str] = "<records>") -> EditRequest:
    """Turn one raw record of a one-request-per-record format into an :class:`EditRequest`.

    Raises :class:`RecordError` for a bad record and ``ValueError`` for a valid record that asks
    for several edits (MQuAKE): use :func:`parse_records` for those.
    """
    requests = parse_records(raw, format, path)
    if len(requests) != 1:
        raise ValueError(
            f"{path}: record {raw.index} gives {len(requests)} edit requests ({format} records may ask for several edits); "
            f"use parse_records"
        )
    return requests[0]


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
