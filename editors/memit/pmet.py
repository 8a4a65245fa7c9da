"""PMET: Precise Model Editing in a Transformer (Li et al., 2024, AAAI).

PMET observes that the residual-stream target MEMIT spreads over MLP weights also contains what
attention contributes, so the MLPs are asked to carry more than their share. It optimises, for
each request, two vectors at the last edited block at once: one added to the attention output
and one to the MLP output (the same loss as ROME's and MEMIT's, with the norm penalty of each
vector taken relative to its own module's output). Only the MLP's optimised output is used as
the target, and only MLP weights are updated: for each layer l in turn,

    R_l = (z_mlp - m_L) / sqrt(number of layers left),    Delta_l = R_l K^T (lambda C_l + K K^T)^-1

where m_L is the current MLP output of the last edited block. The square root (instead of
MEMIT's plain division) follows the reference implementation of the paper.
"""

from __future__ import annotations

import math

from ..base import register_editor
from ..rome.values import optimise_values
from .config import PMETConfig
from .editor import MEMIT


@register_editor("pmet", PMETConfig)
class PMET(MEMIT):
    """MEMIT with attention and MLP targets optimised jointly; MLP weights updated with the MLP's."""

    def goals(self, model, tokenizer, requests, prefixes, targets, config: PMETConfig):
        last = config.layers[-1]
        mlp, attn = targets.layer("mlp_out", last), targets.layer("attn_out", last)
        values = optimise_values(model, tokenizer, requests, prefixes, targets, last, config, edited=[attn, mlp], decay_power=1)
        goals = (values.outputs[mlp] + values.deltas[mlp]).double()
        info = {"layers": list(config.layers), "v_steps": values.steps, "v_loss": values.losses}
        return goals, mlp, info

    def share(self, residual, layers_left: int):
        return residual / math.sqrt(layers_left)
