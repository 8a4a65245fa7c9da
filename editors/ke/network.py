"""KE's hyper-network (De Cao, Aziz and Titov, 2021, "Editing Factual Knowledge in Language
Models", EMNLP, section 3: "Architecture").

The network g(x, a; phi) reads the edit, encodes it into a condition vector, and turns the
fine-tuning gradient of each edited weight W into an update:

* **Condition**: a bidirectional LSTM runs over the edited model's (frozen) input embeddings of the
  edit text, prompt followed by the new target ``a`` (the paper conditions on ``<x, y, a>``; the
  model's old prediction ``y`` is not part of an edit request here). The last states of both
  directions, through a one-layer FFNN with tanh, give the condition ``c``.
* **Update** (the paper's update equation): for W in R^{out x in}, a small FFNN head per weight maps
  c to alpha, beta in R^out, gamma, delta in R^in and eta in R, and

      dW = s * sigma(eta) * ( (sigma(alpha) gamma^T) ⊙ grad_W L(W; x, a)  +  sigma(beta) delta^T ).

  ``s`` (``step_size``) is a fixed scale, ``max_scale`` in the authors' code. The gradient comes as
  rank-one pieces, grad_W = sum_i d_i u_i^T (:func:`editors.learned.gradient_pieces`), so the
  Hadamard product stays low-rank: (a g^T) ⊙ (d u^T) = (a ⊙ d)(g ⊙ u)^T. An update is returned as
  factors ``left [out, n_tokens + 1] @ right [n_tokens + 1, in]`` and never built densely here.

**Standardised gradient** (a deviation): the pieces ``(u_i, d_i)`` are centred and divided by running
per-module statistics of training edits' factors before they enter the update equation, as MEND's
transform reads them (:class:`editors.mend.network.RunningStandardizer`; tokens without gradient
are left out). The paper's network reads the raw gradient, which on SmolLM2-135M is a poor edit
direction: with no network at all, single zsRE edits of the last three MLPs reached reliability
0.46 / locality 0.91 with a raw step of 0.01 and 0.61 / 0.36 with 0.1, but 0.98 / 0.95 with one
standardised step of 8e-4. Trained from the raw gradient, KE could only learn to shrink its step
(0.776 / 0.385 untrained at s = 0.1, 0.361 / 0.992 after 100 steps). Without statistics (nothing
observed yet) the standardisation is the identity. ``standardise: false`` restores the paper's input.

**Initialisation** (ours, not the paper's): every head's output layer starts with
zero weights and biases that put sigma(alpha) = sigma(beta) = sigma(eta) = 1/2 (the middle of the
gates' range, where they are most trainable and can still grow or close), gamma = -4 and
delta = 0. The untrained network therefore makes exactly the gradient-descent step
``W - s * grad_W``, whatever the edit: the baseline training has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from ..core.learned import GradientPieces, gradient_pieces
from ..mend.network import RunningStandardizer, has_gradient
from .config import KEConfig

GAMMA_INIT = -4.0  # with sigma(alpha) = sigma(eta) = 1/2: the untrained update is -s * grad


@dataclass
class LowRankUpdate:
    """``left @ right``: an update of an ``[out, in]`` weight of rank ``left.shape[1]``."""

    left: torch.Tensor  # [out, rank]
    right: torch.Tensor  # [rank, in]

    def dense(self) -> torch.Tensor:
        return self.left @ self.right

    def norm(self) -> torch.Tensor:
        """Frobenius norm of ``left @ right`` without forming it: trace((L^T L)(R R^T))."""
        return ((self.left.T @ self.left) * (self.right @ self.right.T)).sum().clamp_min(0).sqrt()


class ConditionEncoder(nn.Module):
    """c = tanh(FFNN([h_fwd; h_bwd])) over the edit text's input embeddings (KE, section 3).

    The embeddings are layer-normalised first: models differ widely in embedding scale.
    """

    def __init__(self, embed_dim: int, lstm_hidden: int, condition_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.lstm = nn.LSTM(embed_dim, lstm_hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * lstm_hidden, condition_dim)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``embeds [B, T, E]``, right-padded with ``mask [B, T]`` -> ``c [B, condition_dim]``."""
        lengths = mask.sum(1).cpu()
        packed = pack_padded_sequence(self.norm(embeds), lengths, batch_first=True, enforce_sorted=False)
        _, (last, _) = self.lstm(packed)  # [2, B, H]: forward state at the last token, backward at the first
        return torch.tanh(self.out(torch.cat([last[0], last[1]], dim=-1)))


class WeightHead(nn.Module):
    """The FFNN of one edited weight: c -> (alpha, beta, gamma, delta, eta), and the update equation."""

    def __init__(self, condition_dim: int, hidden: int, out_features: int, in_features: int) -> None:
        super().__init__()
        self.sizes = [out_features, out_features, in_features, in_features, 1]
        self.hidden = nn.Linear(condition_dim, hidden)
        self.out = nn.Linear(hidden, sum(self.sizes))
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()  # alpha = beta = eta = 0 (gates at 1/2), delta = 0
            self.out.bias[2 * out_features : 2 * out_features + in_features] = GAMMA_INIT

    def coefficients(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``alpha [B, out], beta [B, out], gamma [B, in], delta [B, in], eta [B, 1]``."""
        return self.out(torch.tanh(self.hidden(c))).split(self.sizes, dim=-1)

    def forward(self, c: torch.Tensor, pieces: GradientPieces, rows: torch.Tensor, step_size: float) -> LowRankUpdate:
        """The summed update of ``B`` edits: edit ``b`` has condition ``c[b]`` and the gradient pieces
        ``i`` with ``rows[i] == b``; its update is rank ``n_b + 1`` (the paper's update equation)."""
        alpha, beta, gamma, delta, eta = self.coefficients(c)
        scale = step_size * torch.sigmoid(eta)  # [B, 1]
        left = torch.cat([(scale * torch.sigmoid(alpha))[rows] * pieces.grads, scale * torch.sigmoid(beta)])  # [N + B, out]
        right = torch.cat([gamma[rows] * pieces.inputs, delta])  # [N + B, in]
        return LowRankUpdate(left.T, right)


class KENetwork(nn.Module):
    """The condition encoder and one head per edited module (``module_shapes``: name -> (out, in))."""

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], embed_dim: int, config: KEConfig) -> None:
        super().__init__()
        self.module_names = list(module_shapes)
        self.step_size = config.step_size
        self.encoder = ConditionEncoder(embed_dim, config.lstm_hidden, config.condition_dim)
        self.heads = nn.ModuleDict(
            {_key(name): WeightHead(config.condition_dim, config.head_hidden, out, inp) for name, (out, inp) in module_shapes.items()}
        )
        self.standardise = config.standardise
        if self.standardise:
            self.u_stats = nn.ModuleList(RunningStandardizer(module_shapes[name][1]) for name in self.module_names)
            self.grad_stats = nn.ModuleList(RunningStandardizer(module_shapes[name][0]) for name in self.module_names)

    @torch.no_grad()
    def observe(self, pieces: Mapping[str, GradientPieces]) -> None:
        """Add the factors of some edits' tokens that carry a gradient to each module's statistics."""
        if not self.standardise:
            return
        for index, name in enumerate(self.module_names):
            keep = has_gradient(pieces[name])
            self.u_stats[index].update(pieces[name].inputs[keep])
            self.grad_stats[index].update(pieces[name].grads[keep])

    def observed(self) -> int:
        """The fewest tokens any module's statistics have seen (0: none gathered, or not standardising)."""
        return int(min(stats.count.item() for stats in self.u_stats)) if self.standardise else 0

    def standardised(self, pieces: Mapping[str, GradientPieces]) -> dict[str, GradientPieces]:
        """The pieces centred and whitened by each module's statistics (updated first in training
        mode), with the tokens that carry no gradient set to zero so that they add nothing."""
        if not self.standardise:
            return dict(pieces)
        if self.training:
            self.observe(pieces)
        out = {}
        for index, name in enumerate(self.module_names):
            piece = pieces[name]
            keep = has_gradient(piece).unsqueeze(-1).to(piece.inputs.dtype)
            u_mean, u_std = self.u_stats[index].moments(piece.inputs.dtype)
            g_mean, g_std = self.grad_stats[index].moments(piece.grads.dtype)
            out[name] = GradientPieces(inputs=keep * (piece.inputs - u_mean) / u_std, grads=keep * (piece.grads - g_mean) / g_std)
        return out

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, pieces: Mapping[str, GradientPieces], rows: torch.Tensor) -> dict[str, LowRankUpdate]:
        c = self.encoder(embeds, mask)
        pieces = self.standardised(pieces)
        return {name: self.heads[_key(name)](c, pieces[name], rows, self.step_size) for name in self.module_names}



def _key(module_name: str) -> str:
    return module_name.replace(".", "__")  # ModuleDict keys cannot hold dots


def predict_updates(net: KENetwork, model: nn.Module, edit: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, LowRankUpdate]]:
    """The edit loss before editing and ``{module: update}`` for a batch of edits (summed over them).

    ``edit`` is a teacher-forced, right-padded batch (prompt + new target, labels ``-100``
    elsewhere), one row per edit. This is the one computation behind both :meth:`KE.apply` and
    training (:class:`lit_modules.ke.KEModule`); it is differentiable in the network's
    parameters, and the model is only read.
    """
    mask = edit["attention_mask"].bool()
    loss, pieces = gradient_pieces(model, edit, net.module_names)
    pieces = {name: GradientPieces(inputs=p.inputs.float(), grads=p.grads.float()) for name, p in pieces.items()}  # each edit's own gradient
    rows = mask.nonzero(as_tuple=True)[0]  # the edit each piece belongs to (same order as the pieces)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(edit["input_ids"]).float()
    return loss, net(embeds, mask, pieces, rows)
