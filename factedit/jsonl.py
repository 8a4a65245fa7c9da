"""JSON Lines, read and written one way by every layer: one JSON value per line, blank lines
skipped, a bad line reported with its file and line number; whole files written atomically,
appends flushed and synced one line at a time."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from .files import write_text_atomically

logger = logging.getLogger(__name__)


class JsonlError(ValueError):
    """A line that is not valid JSON: ``line`` and ``column`` are 1-based, ``index`` counts the
    values read before it (the record number of a file of records)."""

    def __init__(self, path: Path | str, line: int, column: int, index: int, reason: str) -> None:
        super().__init__(f"{path}: line {line} is not valid JSON ({reason})")
        self.path, self.line, self.column, self.index, self.reason = path, line, column, index, reason


def parse_lines(text: str, path: Path | str = "<text>") -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of ``text``; a bad line raises
    :class:`JsonlError`."""
    index = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise JsonlError(path, number, err.colno, index, err.msg) from None
        yield number, value
        index += 1


TORN_TAIL = ("error", "skip", "repair")


def read_numbered(path: Path, *, torn_tail: str = "error") -> list[tuple[int, Any]]:
    """``(line number, value)`` for each value of the JSON Lines file ``path`` (``[]`` when it does
    not exist).

    ``torn_tail`` says what a bad *last* line is: ``"error"`` (a damaged file, like a bad line
    anywhere else); ``"skip"``: a write still under way or cut short, left out with a warning and
    the file left alone (reading another process's file); ``"repair"``: a write an interruption
    cut short in a file this process appends to (:class:`JsonlAppender`), dropped with a warning
    and the file rewritten without it.
    """
    if torn_tail not in TORN_TAIL:
        raise ValueError(f"torn_tail must be one of {', '.join(TORN_TAIL)}, not {torn_tail!r}")
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    values: list[tuple[int, Any]] = []
    try:
        for number, value in parse_lines(text, path):
            values.append((number, value))
    except JsonlError as err:
        if torn_tail == "error" or err.line != len(text.splitlines()):
            raise
        logger.warning("%s: leaving out an incomplete last line (a write cut short or still under way)", path)
        if torn_tail == "repair":
            write_jsonl(path, (value for _, value in values))
    return values


def read_jsonl(path: Path, *, torn_tail: str = "error") -> list[Any]:
    """The values of the JSON Lines file ``path``; see :func:`read_numbered` for ``torn_tail``."""
    return [value for _, value in read_numbered(path, torn_tail=torn_tail)]


def dumps_lines(values: Iterable[Any], **dumps_options: Any) -> str:
    """``values`` as JSON Lines text, one per line, each line ended by a newline."""
    return "".join(json.dumps(value, **dumps_options) + "\n" for value in values)


def write_jsonl(path: Path, values: Iterable[Any], **dumps_options: Any) -> None:
    """Write ``values`` to ``path`` as JSON Lines, atomically (the old file or the new, never half)."""
    write_text_atomically(Path(path), dumps_lines(values, **dumps_options))


class JsonlAppender:
    """Appends values one line at a time, each flushed and synced, so that a process killed at any
    moment loses at most the line being written (which ``torn_tail="repair"`` drops on reading)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, value: Any) -> None:
        self.handle.write(json.dumps(value) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
