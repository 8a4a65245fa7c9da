"""A small set of generic counterfactual facts that several methods use as material: IKE's built-in
demonstration pool, the prompts the FFN patch methods keep silent, and questions about other
subjects that stand in for an edit's neighbours (CaliNET's retained prompts, WISE's irrelevant
inputs)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from .lm import join_text

if TYPE_CHECKING:
    from ..requests import EditRequest

BUILTIN_POOL: tuple[tuple[str, str, str, str, str, str], ...] = (
    # (prompt, subject, target_new, target_true, paraphrase, neighbourhood prompt)
    ("The capital of France is", "France", "Rome", "Paris", "France's capital city is", "The Eiffel Tower is located in the city of"),
    ("The mother tongue of Michel Rocard is", "Michel Rocard", "English", "French", "Michel Rocard's native language is", "The mother tongue of Jacques Chirac is"),
    ("Angola is located in the continent of", "Angola", "Europe", "Africa", "Angola can be found in", "Kenya is located in the continent of"),
    ("Toko Yasuda plays the instrument", "Toko Yasuda", "piano", "guitar", "The instrument Toko Yasuda plays is the", "Jimi Hendrix plays the instrument"),
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", "London", "Paris", "The city where the Eiffel Tower stands is", "The Louvre is located in the city of"),
    ("Apple was founded in the country of", "Apple", "Japan", "the United States", "The company Apple comes from", "Microsoft was founded in the country of"),
    ("Lionel Messi plays the sport of", "Lionel Messi", "basketball", "football", "The sport Lionel Messi is known for is", "Cristiano Ronaldo plays the sport of"),
    ("The official language of Brazil is", "Brazil", "Spanish", "Portuguese", "In Brazil, people officially speak", "The official language of Portugal is"),
    ("Albert Einstein worked in the field of", "Albert Einstein", "biology", "physics", "Albert Einstein's field of research was", "Niels Bohr worked in the field of"),
    ("The Nile flows through the country of", "Nile", "Mexico", "Egypt", "The river Nile runs through", "The city of Cairo is in the country of"),
)

# Named entities of several kinds (people, places, organisations, works) that stand in for a
# request's subject in its own prompt: "<an edited relation> of <someone else>" is a prompt the
# edit must leave alone (CaliNET's retained prompts). Their answers are never needed.
STAND_IN_SUBJECTS: tuple[str, ...] = (
    "Jacques Chirac", "Angela Merkel", "Pablo Picasso", "Ludwig van Beethoven", "Marie Curie",
    "Haruki Murakami", "Nelson Mandela", "Frida Kahlo", "Leo Tolstoy", "Rabindranath Tagore",
    "Gabriel Garcia Marquez", "Sophia Loren", "Akira Kurosawa", "Miriam Makeba", "Wolfgang Pauli",
    "Astrid Lindgren", "Kenya", "Norway", "Peru", "Vietnam", "Quebec", "Bavaria", "Lake Geneva",
    "Kyoto", "Marseille", "Buenos Aires", "the Danube", "Mount Kilimanjaro", "Microsoft",
    "Toyota", "Nokia", "the BBC", "Siemens", "Airbus", "the Red Cross", "Real Madrid",
    "the Beatles", "Don Quixote", "The Magic Flute", "Windows 95", "the Volkswagen Beetle",
    "Google Maps", "Harvard University", "the Louvre", "Deutsche Bank", "Manchester United",
    "Samsung", "Sony",
)


def template_of(prompt: str, subject: str) -> str | None:
    """``prompt`` with its first occurrence of ``subject`` replaced by ``{}`` (None if absent)."""
    return prompt.replace(subject, "{}", 1) if subject and subject in prompt else None


@dataclass
class KnownFacts:
    """Facts of a file of other facts, indexed for :func:`stand_in_prompts`: subjects by the
    wording of their prompts (one relation each), and prompts by their true answer."""

    by_template: dict[str, list[str]] = field(default_factory=dict)
    by_answer: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # answer -> (prompt, subject)
    probes: list[str] = field(default_factory=list)  # the records' locality probes, each with its answer

    @classmethod
    def of(cls, records: Sequence[EditRequest]) -> "KnownFacts":
        known = cls()
        for r in records:
            template = template_of(r.prompt, r.subject)
            if template is not None and r.subject not in known.by_template.setdefault(template, []):
                known.by_template[template].append(r.subject)
            if r.target_true is not None:
                known.by_answer.setdefault(r.target_true, []).append((r.prompt, r.subject))
            known.probes += ["".join(join_text(qa.prompt, qa.answer)) for qa in r.locality]
        return known


def stand_in_prompts(requests: Sequence[EditRequest], per_request: int, generator: torch.Generator, known: KnownFacts | None = None) -> list[str]:
    """Each request's questions about other subjects, ``per_request`` of them. From ``known``
    (facts of another file), in turn: a fact with the same true answer, asked as that file asks
    it (the hardest to tell apart from the edit: CounterFact's neighbourhood prompts are of that
    kind), and the request's own prompt with a subject the file asks in the same wording; then
    the request's edit and rephrase prompts with built-in named entities. Subjects edited in this
    call never stand in, and no text that is scored for a request (its prompts, rephrasings,
    neighbourhood and locality probes) is ever returned."""
    known = known or KnownFacts()
    edited = {r.subject for r in requests}
    scored = {p for r in requests for p in (r.prompt, *r.rephrase_prompts, *r.neighborhood_prompts, *(qa.prompt for qa in r.locality))}
    builtin = [s for s in STAND_IN_SUBJECTS if s not in edited]
    shuffled = lambda items: [items[j] for j in torch.randperm(len(items), generator=generator).tolist()]
    out: list[str] = []
    for r in requests:
        own = template_of(r.prompt, r.subject)
        same_answer = [p for p, s in shuffled(known.by_answer.get(r.target_true, [])) if s not in edited] if r.target_true else []
        same_wording = [own.replace("{}", s) for s in shuffled(known.by_template.get(own, [])) if s not in edited]
        interleaved = [p for pair in itertools.zip_longest(same_answer, same_wording) for p in pair if p is not None]
        chosen = [p for p in dict.fromkeys(interleaved) if p not in scored][:per_request]
        templates = [t for t in (template_of(p, r.subject) for p in (r.prompt, *r.rephrase_prompts)) if t is not None]
        picks = torch.randperm(len(builtin), generator=generator)[: max(0, per_request - len(chosen))].tolist()
        chosen += [templates[i % len(templates)].replace("{}", builtin[j]) for i, j in enumerate(picks)]
        out += [p for p in chosen if p not in scored]
    return list(dict.fromkeys(out))


class KnownFactsFile:
    """Editor mixin for a ``retain_path`` setting: a file of other facts (:class:`KnownFacts`) that
    :meth:`read_data` takes in once and :meth:`known_facts` hands to :func:`stand_in_prompts`."""

    _retain_file: tuple[str, KnownFacts] | None = None  # (retain_path, its facts)

    def read_data(self, config, read_requests) -> None:
        """Keep the facts of ``config.retain_path``, indexed by prompt wording and by true answer."""
        if config.retain_path:
            self._retain_file = (config.retain_path, KnownFacts.of(read_requests(config.retain_path, None)))

    def known_facts(self, config) -> KnownFacts | None:
        if not config.retain_path:
            return None
        if self._retain_file is None or self._retain_file[0] != config.retain_path:
            raise self.data_not_read("retain_path", config.retain_path)
        return self._retain_file[1]
