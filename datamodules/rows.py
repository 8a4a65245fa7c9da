"""Reading data files: the raw records of a JSON or JSON Lines file, typed access to one record's
fields, and :class:`RecordError`, which names the file, the record and the field of every problem.

The record formats (``formats/``, one per file) read their fields through :class:`Row`, so that
every message spells a field as the source file does, e.g.
``counterfact.json: record 12 (case_id 345): field 'requested_rewrite.subject': missing``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from factedit.editors.requests import QA
from factedit.jsonl import JsonlError, parse_lines

_JSONL_SUFFIXES = (".jsonl", ".ndjson")


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
    try:
        return [RawRecord(index, line_no, data) for index, (line_no, data) in enumerate(parse_lines(text, path))]
    except JsonlError as err:
        raise RecordError(
            f"invalid JSON: {err.reason} (JSON Lines files hold one complete object per line; "
            f"a JSON file must hold an array of records)",
            path,
            index=err.index,
            line=err.line,
            column=err.column,
        ) from err


Key = str | int


def _field_name(keys: Sequence[Key]) -> str:
    name = ""
    for key in keys:
        if isinstance(key, int):
            name += f"[{key}]"
        else:
            name += f".{key}" if name else key
    return name


class _Missing:
    """Marks a key that the record does not have (``None`` is JSON's null)."""


MISSING = _Missing()


class Row:
    """Reads typed fields from one raw record; every failure names the source field."""

    def __init__(self, raw: RawRecord, path: Path) -> None:
        self.raw = raw
        self.path = path
        self.case_id: str | None = None  # shown in messages once known

    def error(self, field: Sequence[Key] | str | None, reason: str) -> RecordError:
        name = field if isinstance(field, str) or field is None else _field_name(field)
        return RecordError(reason, self.path, index=self.raw.index, field=name, case_id=self.case_id, line=self.raw.line)

    def get(self, *keys: Key) -> Any:
        """The value at ``keys``, or ``MISSING``; an intermediate that is not an object is an error."""
        value = self.raw.data
        for depth, key in enumerate(keys):
            if isinstance(key, int):
                if not isinstance(value, list):
                    raise self.error(keys[:depth], f"expected a list, got {type_name(value)}")
                if key >= len(value):
                    return MISSING
            elif not isinstance(value, dict):
                raise self.error(keys[:depth], f"expected an object, got {type_name(value)}")
            elif key not in value:
                return MISSING
            value = value[key]
        return value

    def has(self, *keys: Key) -> bool:
        """Whether the field is present and not null."""
        value = self.get(*keys)
        return value is not MISSING and value is not None

    def string(self, *keys: Key) -> str:
        """A required string field (emptiness is checked by :meth:`EditRequest.problems`)."""
        value = self.get(*keys)
        if value is MISSING:
            raise self.error(keys, "missing")
        if not isinstance(value, str):
            raise self.error(keys, f"expected a string, got {type_name(value)}")
        return value

    def optional_string(self, *keys: Key) -> str | None:
        return self.string(*keys) if self.has(*keys) else None

    def nonempty_string(self, *keys: Key) -> str:
        value = self.string(*keys)
        if not value.strip():
            raise self.error(keys, "is empty")
        return value

    def strings(self, *keys: Key) -> tuple[str, ...]:
        """An optional list of strings (missing or null gives an empty tuple)."""
        value = self.get(*keys)
        if value is MISSING or value is None:
            return ()
        if not isinstance(value, list):
            raise self.error(keys, f"expected a list of strings, got {type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error((*keys, i), f"expected a string, got {type_name(item)}")
        return tuple(value)

    def mapping(self, *keys: Key) -> dict[str, Any] | None:
        value = self.get(*keys)
        if value is MISSING or value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(keys, f"expected an object, got {type_name(value)}")
        return value

    def case_id_field(self, *keys: Key) -> str:
        value = self.get(*keys)
        if value is MISSING:
            raise self.error(keys, "missing")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.error(keys, f"expected a string or an integer, got {type_name(value)}")
        if isinstance(value, str) and not value.strip():
            raise self.error(keys, "is empty")
        return str(value)

    def aliases(self, *keys: Key) -> tuple[str, ...]:
        """Every non-empty string in a string, list or nested list of aliases, in order, deduplicated."""
        found: list[str] = []

        def walk(value: Any, at: tuple[Key, ...]) -> None:
            if isinstance(value, str):
                if value.strip() and value not in found:
                    found.append(value)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    walk(item, (*at, i))
            else:
                raise self.error(at, f"expected a string or a (nested) list of strings, got {type_name(value)}")

        value = self.get(*keys)
        if value is not MISSING and value is not None:
            walk(value, tuple(keys))
        return tuple(found)


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), type(value).__name__)


def easyedit_portability(row: Row) -> tuple[QA, ...]:
    """EasyEdit's single portability probe ``{Recalled Relation, New Question, New Answer}``, which
    its CounterFact and zsRE files carry."""
    if row.mapping("portability") is None:
        return ()
    return (QA(row.string("portability", "New Question"), row.string("portability", "New Answer"), kind="portability"),)
