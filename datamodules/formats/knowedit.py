"""KnowEdit (ZsRE, WikiData counterfact, WikiData recent): ``prompt``, ``subject``,
``target_new``, ``ground_truth`` (a string, a list, or a nested list of aliases; absent for
new facts), ``rephrase_prompt``, and ``locality``/``portability`` as
``{category: [{prompt, ground_truth}]}``.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import Any

from factedit.editors.requests import QA

from ..rows import Row, type_name
from .base import Format, register_format

logger = logging.getLogger(__name__)


def _knowedit_probes(row: Row, section: str) -> tuple[QA, ...]:
    groups = row.mapping(section)
    if groups is None:
        return ()
    probes: list[QA] = []
    for kind, items in groups.items():
        if items is None:
            continue
        if not isinstance(items, list):
            raise row.error((section, kind), f"expected a list of {{prompt, ground_truth}} objects, got {type_name(items)}")
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


def _parse_knowedit(row: Row) -> dict[str, Any]:
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


def _matches(record: dict[str, Any]) -> bool:
    """Probes grouped by category (``locality``/``portability`` objects) or a list of true answers."""
    return {"prompt", "target_new"} <= set(record) and any(
        isinstance(record.get(key), kind) for key, kind in (("locality", dict), ("portability", dict), ("ground_truth", list))
    )


register_format(
    Format(
        name="knowedit",
        parse=_parse_knowedit,
        source_fields=MappingProxyType({"target_true": "ground_truth", "rephrase_prompts": "rephrase_prompt"}),
        matches=_matches,
        detect_rank=40,
        hint="knowedit (prompt, subject, target_new, ground_truth, rephrase_prompt, locality{...}, portability{...})",
    )
)
