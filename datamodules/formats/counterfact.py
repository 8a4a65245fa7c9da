"""ROME's CounterFact: ``case_id``, ``requested_rewrite{prompt with "{}", subject,
target_new{str}, target_true{str}}``, ``paraphrase_prompts``, ``neighborhood_prompts``,
``attribute_prompts``, ``generation_prompts`` and, in EasyEdit's portability files,
``portability{New Question, New Answer}``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from factedit.editors.requests import QA

from ..rows import easyedit_portability, MISSING, Row
from .base import Format, register_format


def _parse_counterfact(row: Row) -> dict[str, Any]:
    row.case_id = row.case_id_field("case_id")
    if row.mapping("requested_rewrite") is None:
        raise row.error("requested_rewrite", "missing" if row.get("requested_rewrite") is MISSING else "is null")
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
        portability=easyedit_portability(row),
        neighborhood_prompts=neighborhood,
        attribute_prompts=row.strings("attribute_prompts"),
        generation_prompts=row.strings("generation_prompts"),
    )


def _matches(record: dict[str, Any]) -> bool:
    """ROME's layout: one ``requested_rewrite`` object (MQuAKE, which lists several, is tried first)."""
    return "requested_rewrite" in record


register_format(
    Format(
        name="counterfact",
        parse=_parse_counterfact,
        source_fields=MappingProxyType({
            "prompt": "requested_rewrite.prompt",
            "subject": "requested_rewrite.subject",
            "target_new": "requested_rewrite.target_new.str",
            "target_true": "requested_rewrite.target_true.str",
            "rephrase_prompts": "paraphrase_prompts",
            "locality": "neighborhood_prompts",
            "portability": "portability.New Answer",
        }),
        matches=_matches,
        detect_rank=20,
        hint="counterfact (ROME: case_id, requested_rewrite, paraphrase_prompts, neighborhood_prompts, ...)",
    )
)
