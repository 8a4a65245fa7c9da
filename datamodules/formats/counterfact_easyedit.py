"""EasyEdit's flat CounterFact splits: ``case_id``, ``prompt``, ``subject``, ``target_new``,
``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from factedit.editors.requests import QA

from ..rows import Row
from .base import Format, register_format


def _parse_counterfact_easyedit(row: Row) -> dict[str, Any]:
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


def _matches(record: dict[str, Any]) -> bool:
    """EasyEdit's flat split: a prompt, a new target and one locality prompt."""
    return {"prompt", "target_new"} <= set(record) and isinstance(record.get("locality_prompt"), str)


register_format(
    Format(
        name="counterfact_easyedit",
        parse=_parse_counterfact_easyedit,
        source_fields=MappingProxyType({
            "target_true": "ground_truth",
            "rephrase_prompts": "rephrase_prompt",
            "locality": "locality_ground_truth",
            "neighborhood_prompts": "locality_prompt",
        }),
        matches=_matches,
        detect_rank=50,
        hint="counterfact_easyedit (case_id, prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth)",
    )
)
