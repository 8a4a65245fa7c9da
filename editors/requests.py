"""What an edit asks for: :class:`EditRequest` (one fact and the probes that score its edit) and
:class:`QA` (a probe). Plain data, importable without torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QA:
    """A prompt with its expected answer (locality and portability probes).

    ``aliases`` holds every acceptable answer when the source lists several (KnowEdit);
    ``answer`` is the first of them and is the one scored by teacher forcing.
    ``kind`` names the source's category, e.g. ``Relation_Specificity`` or ``Reasoning``.
    """

    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()
    kind: str = ""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model, with the probes used to score the edit.

    ``prompt`` is the full prompt with the subject filled in, and ``subject`` occurs in it
    (locate-then-edit methods need the subject's position). ``target_true`` is the answer the
    unedited fact has; it may be unknown (``None``) for datasets of new facts. ``group`` names
    the edit case a request belongs to when one case asks for several edits at once (MQuAKE's
    multi-hop chains: every rewrite of a case shares the group, and the case's multi-hop probes
    sit on its last request); ``None`` for a request that stands alone.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[QA, ...] = ()
    portability: tuple[QA, ...] = ()
    # CounterFact's neighbourhood prompts: other subjects whose true answer is ``target_true``,
    # scored by the probability protocol (NS). Their token-protocol twin lives in ``locality``.
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    group: str | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            field_name, message = problems[0]
            raise ValueError(f"edit request {self.case_id!r}: field {field_name!r}: {message}")

    def problems(self) -> list[tuple[str, str]]:
        """Every way this request is malformed, as ``(field, message)`` pairs."""
        return self.check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def check_fields(cls, values: dict[str, Any]) -> list[tuple[str, str]]:
        """Problems of would-be request fields (missing ones take their defaults), without building it."""
        row = {f.name: values.get(f.name, f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cls)}
        found: list[tuple[str, str]] = []
        for name in ("prompt", "subject", "target_new"):
            value = row[name]
            if not isinstance(value, str):
                found.append((name, f"expected a string, got {type(value).__name__}"))
            elif not value.strip():
                found.append((name, "is empty"))
        if row["target_true"] is not None and not isinstance(row["target_true"], str):
            found.append(("target_true", f"expected a string, got {type(row['target_true']).__name__}"))
        elif isinstance(row["target_true"], str) and not row["target_true"].strip():
            found.append(("target_true", "is empty (an unknown true answer is null)"))
        group = row["group"]
        if group is not None and not isinstance(group, str):
            found.append(("group", f"expected a string or null, got {type(group).__name__}"))
        elif isinstance(group, str) and not group.strip():
            found.append(("group", "is empty (a request without a group has group null)"))
        prompt, subject = row["prompt"], row["subject"]
        if isinstance(prompt, str) and isinstance(subject, str) and subject.strip() and subject not in prompt:
            found.append(("subject", f"{subject!r} does not occur in prompt {prompt!r}"))
        for name in ("rephrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
            values_ = row[name]
            if not isinstance(values_, tuple) or not all(isinstance(v, str) for v in values_):
                found.append((name, "expected a list of strings"))
        for name in ("locality", "portability"):
            for item in row[name]:
                if not isinstance(item, QA) or not isinstance(item.prompt, str) or not isinstance(item.answer, str):
                    found.append((name, "expected prompt/answer strings"))
                elif not item.answer.strip():
                    found.append((name, f"empty answer for prompt {item.prompt!r}"))
        return found

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def texts(self) -> dict[str, str | None]:
        """What the request asks, as a saved edit records it: its id, prompt, subject and targets."""
        return {"case_id": self.case_id, "prompt": self.prompt, "subject": self.subject, "target_new": self.target_new, "target_true": self.target_true}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "EditRequest":
        qa = lambda items: tuple(QA(q["prompt"], q["answer"], tuple(q.get("aliases", ())), q.get("kind", "")) for q in items)
        return cls(
            case_id=str(row["case_id"]),
            prompt=row["prompt"],
            subject=row["subject"],
            target_new=row["target_new"],
            target_true=row.get("target_true"),
            rephrase_prompts=tuple(row.get("rephrase_prompts", ())),
            locality=qa(row.get("locality", ())),
            portability=qa(row.get("portability", ())),
            neighborhood_prompts=tuple(row.get("neighborhood_prompts", ())),
            attribute_prompts=tuple(row.get("attribute_prompts", ())),
            generation_prompts=tuple(row.get("generation_prompts", ())),
            group=row.get("group"),
        )
