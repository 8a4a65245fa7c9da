"""MEND's zsRE: ``subject``, ``src``, ``alt`` (the new answer), ``answers``, ``rephrase``,
``loc``/``loc_ans`` (a Natural Questions probe), optionally ``portability``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from factedit.editors.requests import QA

from ..rows import Row, easyedit_portability
from .base import Format, register_format


def _parse_zsre(row: Row) -> dict[str, Any]:
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
        portability=easyedit_portability(row),
    )


def _matches(record: dict[str, Any]) -> bool:
    """MEND's keys: the question ``src`` and the new answer ``alt``."""
    return {"src", "alt"} <= set(record)


register_format(
    Format(
        name="zsre",
        parse=_parse_zsre,
        source_fields=MappingProxyType({
            "prompt": "src",
            "target_new": "alt",
            "target_true": "answers",
            "rephrase_prompts": "rephrase",
            "locality": "loc_ans",
            "portability": "portability.New Answer",
        }),
        matches=_matches,
        detect_rank=30,
        hint="zsre (MEND: subject, src, alt, answers, rephrase, loc, loc_ans)",
    )
)
