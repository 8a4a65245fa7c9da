"""MQuAKE (Zhong et al., 2023, "MQuAKE: Assessing Knowledge Editing in Language Models via
Multi-Hop Questions"): ``case_id``, ``requested_rewrite`` as a *list* of CounterFact-style
rewrites (each ``{prompt with "{}", subject, target_new{str}, target_true{str}, question?}``),
``questions`` (multi-hop questions), ``new_answer``, ``new_answer_alias`` and
``new_single_hops`` (``{question, cloze, answer, answer_alias}``). One record is one edit case
that asks for several edits at once: it yields one request per rewrite (see
:func:`parse_records`).
"""

from __future__ import annotations

from typing import Any, Mapping

from factedit.editors.requests import QA

from ..rows import MISSING, Key, Row, type_name
from .base import Format, register_format

MULTI_HOP_KIND = "multi_hop"
"""``QA.kind`` of MQuAKE's multi-hop questions (scored as ``portability_multi_hop``)."""
SINGLE_HOP_KIND = "single_hop"
"""``QA.kind`` of MQuAKE's single-hop probes of the edited chain (``portability_single_hop``)."""


def _answer_and_aliases(row: Row, answer_keys: tuple[Key, ...], alias_keys: tuple[Key, ...]) -> tuple[str, tuple[str, ...]]:
    """A required non-empty answer and every acceptable answer (the answer first, then its aliases)."""
    answer = row.nonempty_string(*answer_keys)
    aliases = (answer,) + tuple(a for a in row.aliases(*alias_keys) if a != answer)
    return answer, aliases


def _mquake_probes(row: Row) -> tuple[QA, ...]:
    """The case's multi-hop questions (answered by ``new_answer``) and its new single hops.

    Single hops are asked as their cloze statement (``"The capital of France is"``), the form in
    which MQuAKE checks single-hop knowledge; a hop without a cloze is asked as its question.
    """
    if row.get("questions") is MISSING:
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
    if hops is not MISSING and hops is not None:
        if not isinstance(hops, list):
            raise row.error("new_single_hops", f"expected a list of {{question, cloze, answer, answer_alias}} objects, got {type_name(hops)}")
        for i, hop in enumerate(hops):
            if not isinstance(hop, dict):
                raise row.error(("new_single_hops", i), f"expected an object, got {type_name(hop)}")
            cloze = row.optional_string("new_single_hops", i, "cloze")
            prompt = cloze if cloze is not None and cloze.strip() else row.nonempty_string("new_single_hops", i, "question")
            hop_answer, hop_aliases = _answer_and_aliases(row, ("new_single_hops", i, "answer"), ("new_single_hops", i, "answer_alias"))
            probes.append(QA(prompt, hop_answer, aliases=hop_aliases, kind=SINGLE_HOP_KIND))
    return tuple(probes)


def _parse_mquake(row: Row) -> list[dict[str, Any]]:
    """One request per rewrite, ``case_id`` ``"<case>/<k>"``, all in group ``"<case>"``; the
    multi-hop and single-hop probes go to the last request, which completes the group's edits."""
    row.case_id = row.case_id_field("case_id")
    rewrites = row.get("requested_rewrite")
    if rewrites is MISSING or rewrites is None:
        raise row.error("requested_rewrite", "missing" if rewrites is MISSING else "is null")
    if not isinstance(rewrites, list):
        raise row.error("requested_rewrite", f"expected a list of rewrites (MQuAKE), got {type_name(rewrites)}")
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


def _matches(record: dict[str, Any]) -> bool:
    """A *list* of rewrites (one case, several edits), or MQuAKE's question fields."""
    return "requested_rewrite" in record and (isinstance(record["requested_rewrite"], list) or bool({"questions", "new_single_hops"} & set(record)))


register_format(
    Format(
        name="mquake",
        parse=_parse_mquake,
        source_fields=_mquake_source_fields,
        matches=_matches,
        detect_rank=10,
        hint="mquake (case_id, requested_rewrite [list], questions, new_answer, new_answer_alias, new_single_hops)",
    )
)
