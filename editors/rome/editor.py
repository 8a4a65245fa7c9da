"""ROME: Rank-One Model Editing (Meng et al., 2022, "Locating and Editing Factual Associations in
GPT", NeurIPS), with the consistency fix of Gupta et al. (2024, "Rebuilding ROME: Resolving Model
Collapse during Sequential Model Editing").

The MLP output projection W of one block is treated as a linear associative memory: keys k (its
inputs) map to values W k. ROME writes one new association (k*, v*):

* k* is the key at the subject's last token, averaged over prompts with sampled prefixes
  (section 3.1, "Step 1");
* v* = W k* + delta, with delta optimised so that the new target is predicted
  (:mod:`editors.rome.values`, "Step 2", eq. 4);
* the update is rank one (eq. 2): W' = W + (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*), with C the
  uncentred covariance of keys (:mod:`editors.stats`), so that W' k* = v* exactly while keys
  that are typical of text move as little as possible.

The original implementation computes the residual v* - W k from the key of the bare prompt but
the direction from the prefix-averaged key; Rebuilding ROME shows that this mismatch makes
sequential edits collapse the model and uses the same key for both. Here the same averaged key
k* is used throughout, and the residual is exactly the optimised delta.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..base import Edit, Editor, EditRequest, register_editor
from factedit.models import model_fingerprint
from ..core.targets import factors_in_param_layout, get_module, get_parameter_name, get_targets, weight_as_out_in
from .config import LocateConfig, ROMEConfig
from .context import sample_prefixes
from .covariance import key_moments
from .values import optimise_values

logger = logging.getLogger(__name__)


class LocateEditor(Editor):
    """What ROME-family editors share: sampled prefixes and key statistics, each computed once.

    Both depend only on the unedited model, so they are kept on the editor object for the
    model it first saw (keyed by the model object): during sequential editing the model
    changes, its statistics must not.
    """

    writes_at_subject = True

    def __init__(self) -> None:
        self._fingerprints: dict[int, str] = {}
        self._prefixes: dict[tuple, list[str]] = {}
        self._moments: dict[tuple, torch.Tensor] = {}

    def prepare(self, model, tokenizer, config: LocateConfig) -> None:
        targets = get_targets(model, config.targets)
        layers = list(getattr(config, "layers", None) or [config.layer])
        self.prefixes(model, tokenizer, config)
        if config.mom2_adjustment:
            self.moments(model, tokenizer, [targets.layer("mlp_out", l) for l in layers], layers, config)

    def base_fingerprint(self, model) -> str:
        if id(model) not in self._fingerprints:
            self._fingerprints[id(model)] = model_fingerprint(model)
        return self._fingerprints[id(model)]

    def prefixes(self, model, tokenizer, config: LocateConfig) -> list[str]:
        key = (self.base_fingerprint(model), config.context_count, config.context_length, config.seed)
        if key not in self._prefixes:
            self._prefixes[key] = [""] + sample_prefixes(model, tokenizer, config.context_count, config.context_length, config.seed)
        return self._prefixes[key]

    def moments(self, model, tokenizer, module_names: Sequence[str], layers: Sequence[int], config: LocateConfig) -> dict[str, torch.Tensor]:
        """C = E[k k^T] per module (float64, on the model's device), or None when adjustment is off."""
        model_id = self.base_fingerprint(model)
        spec = (model_id, config.stats_corpus, config.stats_samples, config.stats_max_length, str(config.stats_npz))
        missing = [(n, l) for n, l in zip(module_names, layers) if (spec, n) not in self._moments]
        if missing:
            computed = key_moments(model, tokenizer, [n for n, _ in missing], [l for _, l in missing], config, model_id)
            for name, moment in computed.items():
                self._moments[(spec, name)] = moment
        device = next(model.parameters()).device
        return {n: self._moments[(spec, n)].to(device) for n in module_names}


@register_editor("rome", ROMEConfig)
class ROME(LocateEditor):
    """Rank-one edit of one MLP output projection per request (one request per call)."""

    supports_batch = False

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], config: ROMEConfig) -> Edit:
        self.check_requests(requests)
        targets = get_targets(model, config.targets)
        module_name = targets.layer("mlp_out", config.layer)
        module = get_module(model, module_name)
        prefixes = self.prefixes(model, tokenizer, config)
        values = optimise_values(model, tokenizer, requests, prefixes, targets, config.layer, config)
        key = values.keys[module_name][0].double()  # k*, averaged over the prefixed prompts
        if config.mom2_adjustment:
            moment = self.moments(model, tokenizer, [module_name], [config.layer], config)[module_name]
            direction = torch.linalg.solve(moment, key)  # C^-1 k*
        else:
            direction = key
        right = direction / (direction @ key)  # (C^-1 k*)^T / (k*^T C^-1 k*)
        left = values.deltas[module_name][0].double()  # v* - W k*: the optimised delta (Rebuilding ROME)
        weight = weight_as_out_in(module)
        delta = factors_in_param_layout(module, left[:, None].to(weight.dtype), right[None, :].to(weight.dtype))
        info = {"layer": config.layer, "v_steps": values.steps[0], "v_loss": values.losses[0], "delta_norm": float(left.norm()), "prefixes": prefixes}
        edit = Edit(self.name, {get_parameter_name(model, module_name): delta}, [r.case_id for r in requests], config.to_dict(), info)
        return edit.apply(model)
