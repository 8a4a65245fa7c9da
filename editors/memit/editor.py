"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., 2023, ICLR).

Thousands of facts are written in one call, spread over the MLP output projections of several
consecutive blocks (Algorithm 1):

1. For every request, a target z_i for the residual stream at the last edited block L is found
   by optimising a vector added there (the value optimisation of ROME, eq. 4, run for all
   requests in batches by :func:`editors.rome.values.optimise_values`): z_i = h_L(i) + delta_i.
2. For each edited layer l in turn, from the lowest: read the keys K (inputs of the layer's
   output projection at each subject's last token, averaged over prefixes) and the current
   residual h_L on the model as updated so far; the residual still missing, R = (z - h_L),
   is shared equally by the layers that remain, and the layer takes its part (eq. 14):

       Delta_l = R_l K^T (lambda C_l + K K^T)^-1

   where C_l = E[k k^T] are the key statistics of text the model should keep representing.

The update of each layer has rank at most the number of requests, and is stored as its factors
when that is smaller than the dense matrix.

Subclasses change one step: PMET which vector is optimised and spread, AlphaEdit how a layer's
update is solved (:meth:`MEMIT.solve`).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..base import Edit, EditRequest, ParamDelta, register_editor
from ..rome.editor import LocateEditor
from ..rome.keys import subject_reads
from ..rome.values import optimise_values
from ..core.targets import ModelTargets, factors_in_param_layout, get_module, get_parameter_name, get_targets, is_transposed
from .config import MEMITConfig

logger = logging.getLogger(__name__)


def layer_delta(module, left: torch.Tensor, right: torch.Tensor) -> ParamDelta:
    """``left @ right`` ([out, n] @ [n, in]) as factors, or dense when that is smaller."""
    out_features, n = left.shape
    in_features = right.shape[1]
    if n * (out_features + in_features) < out_features * in_features:
        return factors_in_param_layout(module, left, right)
    dense = left @ right
    return ParamDelta(delta=(dense.T if is_transposed(module) else dense).contiguous())


@register_editor("memit", MEMITConfig)
class MEMIT(LocateEditor):
    """Batch edit spread over several MLP output projections."""

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], config: MEMITConfig) -> Edit:
        self.check_requests(requests)
        targets = get_targets(model, config.targets)
        prefixes = self.prefixes(model, tokenizer, config)
        names = [targets.layer("mlp_out", l) for l in config.layers]
        moments = self.moments(model, tokenizer, names, config.layers, config) if config.mom2_adjustment else {}
        goals, read_at, info = self.goals(model, tokenizer, requests, prefixes, targets, config)

        dtype = next(model.parameters()).dtype
        deltas: dict[str, ParamDelta] = {}
        layer_keys: dict[str, torch.Tensor] = {}
        staged: list[Edit] = []
        try:
            for index, (layer, name) in enumerate(zip(config.layers, names)):
                reads = subject_reads(model, tokenizer, requests, prefixes, inputs_of=[name], outputs_of=[read_at])
                keys = reads[("input", name)].double()  # [n, d_in]
                layer_keys[name] = keys
                residual = self.share(goals - reads[("output", read_at)].double(), len(config.layers) - index)  # [n, d_out]
                moment = moments.get(name)
                left, right = self.solve(model, name, keys, residual, moment, config)  # [d_out, n], [n, d_in]
                module = get_module(model, name)
                delta = layer_delta(module, left.to(dtype), right.to(dtype))
                param = get_parameter_name(model, name)
                deltas[param] = delta
                staged.append(Edit(self.name, {param: delta}).apply(model))
                info.setdefault("residual_norm", []).append(float(residual.norm(dim=1).mean()))
        finally:
            for edit in reversed(staged):
                edit.revert(model)
        edit = Edit(self.name, deltas, [r.case_id for r in requests], config.to_dict(), info)
        self.remember(model, edit, layer_keys)
        return edit.apply(model)

    # -- the steps subclasses change ---------------------------------------------------------
    def goals(self, model, tokenizer, requests, prefixes, targets: ModelTargets, config: MEMITConfig):
        """Target vectors z [n, d] and the module whose output they are goals for."""
        last = config.layers[-1]
        block = f"{targets.layers}.{last}"
        edited = targets.layer("mlp_out", last)
        values = optimise_values(model, tokenizer, requests, prefixes, targets, last, config, record_outputs=[block], norm_reference={edited: block})
        goals = (values.outputs[block] + values.deltas[edited]).double()
        info = {"layers": list(config.layers), "v_steps": values.steps, "v_loss": values.losses}
        return goals, block, info

    def share(self, residual: torch.Tensor, layers_left: int) -> torch.Tensor:
        """The part of the missing residual this layer takes: an equal share (MEMIT)."""
        return residual / layers_left

    def solve(self, model, name: str, keys: torch.Tensor, residual: torch.Tensor, moment: torch.Tensor | None, config: MEMITConfig):
        """Factors of Delta = R^T K (lambda C + K^T K)^-1 with keys and residuals as rows (eq. 14)."""
        gram = keys.T @ keys  # K K^T in the paper's column notation, [d_in, d_in]
        if moment is None:  # no statistics: preserved keys are taken as isotropic
            moment = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        system = config.mom2_update_weight * moment + gram
        adjusted = torch.linalg.solve(system, keys.T)  # [d_in, n]
        return residual.T, adjusted.T

    def remember(self, model, edit: Edit, layer_keys: dict[str, torch.Tensor]) -> None:
        """Hook for methods that keep state across calls (AlphaEdit); MEMIT keeps none."""
