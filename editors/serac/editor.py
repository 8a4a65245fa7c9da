"""SERAC as an editor: edits go into an explicit memory; the model's weights are never changed.

Mitchell, Lin, Bosselut, Manning, Finn (2022), "Memory-Based Model Editing at Scale" (ICML).
``apply`` stores each request's text (prompt + new target) in the model's :class:`EditMemory`;
from then on the model's forward passes are routed by the scope classifier to the counterfactual
model where an input is in an edit's scope (:mod:`editors.serac.memory`). The returned
:class:`SERACEdit` holds the edits' token ids and the editor's settings, so that a saved edit can
be loaded and applied to a fresh copy of the model: the network is rebuilt from the same seed and
the model's weights, or read from the same checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from factedit.editors.base import Edit, EditError, Editor, EditRequest, register_editor
from factedit.editors.core.learned import LearnedEditorMixin, edited_modules, model_signature
from factedit.editors.core.lm import encode_pair
from factedit.editors.core.targets import get_targets, num_layers

from .config import SERACConfig
from .memory import EditMemory
from .network import SERACNetwork


def separator_ids(tokenizer: Any, separator: str) -> list[int]:
    return list(tokenizer(separator, add_special_tokens=False)["input_ids"]) if separator else []


# What a SERAC edit is bound to: its token ids index the vocabulary, and its memory's keys are
# features of the model's hidden states.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "vocab_size")


def architecture_of(model: nn.Module) -> dict[str, Any]:
    signature = model_signature(model, [])
    return {key: signature[key] for key in ARCHITECTURE_KEYS}


class SERACEdit(Edit):
    """Edits held in a model's SERAC memory: applying stores them, reverting removes exactly them.

    ``param_names`` is empty: no weight changes. The saved state is each edit's token ids
    (``text.<i>``, prompt + new target), the number of target tokens of each and the separator's
    ids, plus the editor's settings and the model's architecture (``info["architecture"]``) in
    ``edit.json``.
    """

    kind = "serac_memory"

    def __init__(
        self,
        editor: str,
        texts: Sequence[torch.Tensor],
        target_lengths: Sequence[int],
        separator: torch.Tensor,
        case_ids: Sequence[str] = (),
        config: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        network: tuple[int, SERACNetwork] | None = None,
    ) -> None:
        super().__init__(editor, None, case_ids, config, info)
        if len(texts) != len(target_lengths) or not texts:
            raise EditError("a SERAC edit needs token ids and a target length for each of at least one edit")
        self.texts = [t.detach().to("cpu", torch.long) for t in texts]
        self.target_lengths = [int(n) for n in target_lengths]
        self.separator = separator.detach().to("cpu", torch.long)
        self._network = network  # (id of the model, network) when the editor already built it
        self._owner: object | None = None

    def num_stored_values(self) -> int:
        return sum(t.numel() for t in self.texts) + len(self.target_lengths) + self.separator.numel()

    def _apply(self, model: nn.Module) -> None:
        self._check_architecture(model)
        key = json.dumps(self.config, sort_keys=True, default=str)
        memory = EditMemory.of(model)
        if memory is not None and memory.key != key:
            raise EditError("this model's SERAC memory serves a network with other settings or checkpoint; revert those edits first")
        created = memory is None
        if created:
            if self._network is not None and self._network[0] == id(model):
                network = self._network[1]
            else:
                try:
                    config = SERACConfig(**self.config)
                except TypeError as err:
                    raise EditError(f"SERAC edit: field 'config' does not hold SERAC settings ({err})") from err
                network = SERAC().network(model, None, config)
            memory = EditMemory(model, network, key)
        owner = object()
        try:
            memory.add(owner, self.texts, self.target_lengths, self.separator)
        except Exception:
            memory.remove(owner)  # closes a memory this call created
            raise
        self._owner = owner

    def _check_architecture(self, model: nn.Module) -> None:
        """Refuse a model of another architecture, even when forced: the stored token ids would be
        read in another vocabulary. (Edits saved before ``info["architecture"]`` was recorded are
        not checked.)"""
        made_for = self.info.get("architecture")
        if not isinstance(made_for, dict):
            return
        here = architecture_of(model)
        differ = [f"{key} {here[key]!r} (the edit was made for {made_for[key]!r})" for key in ARCHITECTURE_KEYS if key in made_for and made_for[key] != here[key]]
        if differ:
            raise EditError(
                f"SERAC edit was made for another architecture: this model has {', '.join(differ)}; its token ids and "
                "memory keys belong to that model, so make the edit again on this one"
            )

    def _revert(self, model: nn.Module) -> None:
        memory = EditMemory.of(model)
        if memory is None or not any(e.owner is self._owner for e in memory.entries):
            raise EditError("SERAC edit: the model's memory no longer holds this edit")
        memory.remove(self._owner)
        self._owner = None

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"text.{i}": t.contiguous() for i, t in enumerate(self.texts)}
        out["target_lengths"] = torch.tensor(self.target_lengths, dtype=torch.long)
        out["separator"] = self.separator.contiguous()
        return out

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SERACEdit":
        for name in ("target_lengths", "separator"):
            if name not in tensors:
                raise EditError(f"SERAC edit: tensor {name!r} is missing")
        count = len(tensors["target_lengths"])
        missing = [f"text.{i}" for i in range(count) if f"text.{i}" not in tensors]
        if missing or len(tensors) != count + 2:
            raise EditError(f"SERAC edit: expected tensors text.0..text.{count - 1}, target_lengths, separator; got {sorted(tensors)}")
        texts = [tensors[f"text.{i}"] for i in range(count)]
        return cls(meta["editor"], texts, tensors["target_lengths"].tolist(), tensors["separator"], meta.get("case_ids", ()), meta.get("config"), meta.get("info"))


@register_editor("serac", SERACConfig)
class SERAC(LearnedEditorMixin, Editor):
    """Memory-based editing with a scope classifier and a counterfactual model.

    Untrained (no checkpoint), the classifier routes only near-copies of a stored edit's prompt
    and the counterfactual model is the frozen model reading the edit in context: the baseline
    that training (:class:`lit_modules.serac.SERACModule`) has to beat. Any number of edits can
    be in memory at once (one call with many requests, or edits applied one after another); each
    input position goes to the nearest in-scope edit.
    """

    needs_trained_network = True

    def __init__(self) -> None:
        LearnedEditorMixin.__init__(self)

    def network_modules(self, model: nn.Module, config: SERACConfig) -> list[str]:
        # The copied blocks' MLP output projections: their shapes pin the checkpoint to the model's widths.
        depth = num_layers(model, get_targets(model, config.targets))
        return edited_modules(model, ["mlp_out"], list(range(depth - config.cf_layers, depth)), config.targets)

    def build_network(self, model: nn.Module, tokenizer: Any, config: SERACConfig) -> SERACNetwork:
        return SERACNetwork(
            model, get_targets(model, config.targets), config.classifier_layer, config.embedding_dim, config.cf_layers, config.init_scale, config.init_threshold,
            config.classifier_pooling,
        )

    def apply(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: SERACConfig) -> Edit:
        self.check_requests(requests)
        network = self.network(model, tokenizer, config)
        encoded = [encode_pair(tokenizer, r.prompt, r.target_new) for r in requests]
        settings = config.to_dict()
        if config.checkpoint:  # an edit loaded elsewhere must find the same file
            settings["checkpoint"] = str(Path(config.checkpoint).expanduser().resolve())
        edit = SERACEdit(
            self.name,
            [torch.tensor(p + t) for p, t in encoded],
            [len(t) for _, t in encoded],
            torch.tensor(separator_ids(tokenizer, config.separator), dtype=torch.long),
            [r.case_id for r in requests],
            settings,
            {"tokens": sum(len(p) + len(t) for p, t in encoded), "architecture": architecture_of(model)},
            network=(id(model), network),
        )
        return edit.apply(model)
