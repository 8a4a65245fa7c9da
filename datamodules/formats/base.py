"""The registry of record formats: each format is one module of this package that describes its
records and calls :func:`register_format` when imported.

A :class:`Format` says how to recognise a record (:attr:`Format.matches`), how to read it into the
fields of one or several :class:`~factedit.editors.requests.EditRequest` (:attr:`Format.parse`), and
which source field each request field comes from, so that a problem found only when the request is
built is still reported under the field name the file uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ..rows import Row


@dataclass(frozen=True)
class Format:
    """One record format.

    name: the ``format=`` name (lower case).
    parse: a record's request fields: a dict, or a list of dicts for a record that asks for
        several edits (MQuAKE).
    source_fields: request field -> the source field it comes from, or a function of the
        request's position in its record where that differs (MQuAKE's rewrites).
    matches: whether a record (a JSON object) is in this format, judged from its keys.
    detect_rank: detection tries the formats in increasing rank, so a format whose records
        also match a broader one (MQuAKE's over CounterFact's) goes first.
    hint: the fields a user recognises the format by, for the message when none matches.
    """

    name: str
    parse: Callable[[Row], dict[str, Any] | list[dict[str, Any]]]
    source_fields: Mapping[str, str] | Callable[[int], Mapping[str, str]]
    matches: Callable[[dict[str, Any]], bool]
    detect_rank: int
    hint: str

    def source_field(self, name: str, position: int) -> str:
        fields = self.source_fields(position) if callable(self.source_fields) else self.source_fields
        return fields.get(name, name)


_REGISTRY: dict[str, Format] = {}


def register_format(spec: Format) -> Format:
    """Add a record format; a name already taken is refused."""
    if spec.name != spec.name.lower() or not spec.name.replace("_", "").isalnum():
        raise ValueError(f"format name {spec.name!r} must be lower-case letters, digits and underscores")
    if spec.name in _REGISTRY:
        raise ValueError(f"record format {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def registered_formats() -> Mapping[str, Format]:
    """The registered formats by name, in the order they were registered (a read-only view)."""
    return MappingProxyType(_REGISTRY)
