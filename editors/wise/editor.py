"""WISE: a side memory beside one FFN value matrix, with activation routing; orthogonal writing or sharding and merging.

Wang, Li, Yao, Xi, Zhang, Chen, Zhang, Chen (2024), "WISE: Rethinking the Knowledge Memory for
Lifelong Model Editing of Large Language Models" (NeurIPS). The FFN value matrix ``W_v`` of one
block (its output projection, ``down_proj``/``c_proj``) is the *main memory*; edits go into a
*side memory* ``W_v' = W_v + D``, a copy of it that is trained while the model stays frozen.
Section 3 of the paper:

* **Routing (eq. 3-4).** The activation of an input under the side memory is
  ``Delta_act(x) = || A(x) (W_v' - W_v) ||_2 = || a D^T ||_2``, with ``a`` the FFN's hidden
  activation (the value matrix's input). An input whose activation exceeds the threshold
  ``eps`` is answered by the side memory, any other by the main memory.
* **Routing loss (eq. 5).** Besides the target's NLL, training asks the edit's activation to
  reach ``beta``, the activation of irrelevant inputs to stay below ``alpha``, and the first to
  exceed the second by ``gamma``: ``hinge(Delta_irr - alpha) + hinge(beta - Delta_edit) +
  hinge(Delta_irr - Delta_edit + gamma)``, each hinge the mean of its positive entries.
  ``eps`` is ``act_ratio`` times the smallest activation of the stored edits.
* **Knowledge sharding (section 3.2).** Edits are written into shards: each shard may change
  only a random subset (``mask_ratio``) of the side memory's entries, a fresh subset per shard,
  so different shards mostly touch different entries. A shard takes ``shard_size`` edits.
* **Knowledge merging.** The shards' deltas are merged into one side memory with TIES-merging
  (Yadav et al., 2023: trim each delta to its ``density`` largest-magnitude entries, elect each
  entry's sign by the sum, average the entries that agree with it).

**Orthogonal writing** (``writing: orthogonal``, the default here; ``writing: shards`` is the
paper's sharding and merging above). On this model the paper's scheme loses its edits before any
merge: within one shard every new edit's update ``g a^T`` also answers at the earlier edits'
positions, because the FFN activations of different prompts at block 25 share much of their
direction (d_ff is 1,536 here, 11,008 in LLaMA-2-7B). First 100 records of MEND's zsRE training
split, one edit per call, SGD rate 0.5, shards of 50 (token reliability / locality): 0.86 / 0.93
after 10 edits, 0.67 / 0.87 after 25, 0.58 / 0.83 after 50, 0.43 / 0.73 after 100 (two shards
merged); the merged memory fired on 93% of the locality probes' positions. Keeping earlier edits'
outputs by a penalty did not help (0.62 / 0.91 after 10). So each call's change is confined to
inputs orthogonal to (a) the answer inputs of every earlier edit in the memory (their side-memory
outputs stay exactly as trained) and (b) the main principal directions of the irrelevant inputs
(``irrelevant_energy`` of their energy, what is left after (a)): the gradient is projected on the
complement of that span every step (the null-space idea of AlphaEdit, Fang et al., 2025, applied
to the side memory). The change is stored as a low-rank product (SVD, ``rank_energy`` of its
energy; a few to a few tens of directions where the dense change is 885k numbers), which keeps it
exactly in that complement. Each edit is then its own shard, and merging is their sum.

Routing with orthogonal writing follows the paper's retrieval variant (WISE-Retrieve: several
memories, the one whose activation is largest and above its own threshold answers) at the
granularity of edits: a position is answered by the side memory when the activation of some
edit's own change, ``|| a D_e^T ||``, exceeds that edit's threshold, ``act_ratio`` times the
smallest activation of its answer positions, and it gets the changes of the edits that fire
there and no others (a mixture of experts, one per edit). Read off the stored factors
(``D_e = U diag(s) V`` with orthonormal ``U``: ``|| a D_e^T || = || s * (V a) ||``), this costs
two products with the ``[sum of ranks, d_ff]`` and ``[d_out, sum of ranks]`` factors per position. An edit's activation on unrelated
text does not grow with the number of edits, where the summed memory's does: after 25 orthogonal
edits of the same records with the same irrelevant inputs, one threshold on the summed memory let
27% of the locality probes' positions through (reliability 0.91, locality 0.87), the per-edit
thresholds 0.5% (reliability 0.98, locality 0.99). Answering with the changes of the firing edits
only, rather than the whole memory, trades reliability for locality as edits accumulate: after 100
sequential edits of the zsRE evaluation file (all scored on the final model), reliability 0.81
against 0.89, generalization 0.63 against 0.68, locality 0.94 against 0.86. Training fits the
call's change alone against the routing loss and its own threshold; earlier edits answer where
they fire, as at inference.

Other implementation choices (documented because they differ from the reference code or are left open):

* **Routing is decided per position**, each token by its own activation. The reference code
  takes the mean activation of a whole input and routes the whole input, which assumes one
  input per forward call and breaks under KV-cache generation (later calls see one token) and
  under batched, prefix-shared scoring. Per position, teacher-forced scoring, batched scoring and
  cached generation take the same decisions, and positions that do not fire keep the main
  memory's output bit for bit. Accordingly, the edit's activations (those that must reach
  ``beta`` and that set the threshold) are taken at the positions that predict the target (the
  prompt's last token and the target's teacher-forced positions), and training applies the side
  memory there and, as inference will, wherever its activation exceeds ``act_ratio`` times the
  smallest of them (recomputed every step).
* **Irrelevant inputs** are every position of generic sentences
  (:data:`factedit.editors.core.patch.GENERIC_TEXTS`), with ``fact_inputs`` the built-in fact
  prompts (:func:`factedit.editors.core.patch.fact_prompts`), ``stand_ins`` of the request's own
  prompts about other subjects per request (:func:`factedit.editors.core.facts.stand_in_prompts`:
  with ``retain_path``, facts of that file with the request's true answer or wording first, then
  built-in entities) and, with ``retain_path``, ``retain_texts`` of that file's locality probes
  drawn per call (the reference code's irrelevant input is a locality probe of the training
  data). Never a text a request is scored on.
* With shards, ``eps`` is recomputed from the stored edits' activations under the side memory as
  it is now (after later edits of the same shard and after merging), not frozen at training time.
* The side memory's output is ``W_v a + D a``: the main memory's output plus the delta's, so the
  main weights are never copied or changed. With shards, the norm constraint clamps each entry of
  ``D`` to ``[-norm_constraint, norm_constraint]`` (the reference code's 1.0); with orthogonal
  writing it is refused, since it would move earlier edits' outputs. SGD with weight decay trains
  the current shard only (other shards are not active), or the call's change only.
* All shards, the one still filling included, are merged into the side memory the model uses;
  with a single shard the side memory is that shard.

Edits are reversible and ordered like GRACE's codebook: the model's side memory at a module is
the list of applied :class:`WISEEdit` s, each holding the change it made (its factors, or its
values on the shard's mask, which is regenerated from the edit's seed and shard index). The
memory, the merge, the routing factors and the thresholds are recomputed from that list, so reverting an
edit gives exactly the memory the remaining edits give, and the hook is removed with the last edit.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from factedit.batches import pad_id
from factedit.models import frozen

from ..base import Edit, EditError, Editor, EditRequest, check_finite, register_editor
from ..core.facts import KnownFactsFile, stand_in_prompts
from ..core.patch import memory_texts, module_input
from ..core.hooks import ModuleMemory, first_tensor, replace_first, inputs_at_every_token, trace
from ..core.lm import collate_pairs, encode_pair, hinge, model_device, target_nll
from ..core.prefix import frozen_below
from ..core.targets import get_module, get_targets, resolve_layer
from .config import WISEConfig

logger = logging.getLogger(__name__)

MEMORY_ATTRIBUTE = "wise_memories"  # where a model keeps its side memories (module name -> SideMemory)


# --------------------------------------------------------------------------------------------
# Shards and merging
# --------------------------------------------------------------------------------------------


def shard_mask(shape: Sequence[int], ratio: float, seed: int, shard: int) -> torch.Tensor:
    """The entries (bool, ``shape``) shard ``shard`` may change: a fixed random ``ratio`` of them."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(shard))
    return torch.rand(tuple(shape), generator=generator) < ratio


def ties_merge(deltas: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023) of task deltas: trim, elect sign, disjoint mean.

    Each delta keeps its ``density`` share (of all entries) of largest magnitudes; each entry's
    sign is the sign of the trimmed deltas' sum; the merged entry is the mean of the trimmed
    values that are non-zero and agree with that sign (zero where none does).
    """
    if len(deltas) == 1:
        return deltas[0].clone()
    trimmed = []
    for delta in deltas:
        keep = max(1, int(round(density * delta.numel())))
        if keep >= delta.numel():
            trimmed.append(delta)
            continue
        threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
        trimmed.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0)
    total = torch.where(agree, stacked, torch.zeros_like(stacked)).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def activations(inputs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``Delta_act = || a D^T ||_2`` for FFN activations ``inputs [..., d_ff]`` and ``delta [d_out, d_ff]``."""
    return (inputs.float() @ delta.T).norm(dim=-1)


def protected_basis(earlier: torch.Tensor | None, irrelevant: torch.Tensor, energy: float) -> torch.Tensor | None:
    """An orthonormal basis ``[d_ff, k]`` of the inputs orthogonal writing leaves alone: the span of
    ``earlier`` (earlier edits' answer inputs, every direction with a singular value above 1e-4
    of the largest) and the top principal directions of ``irrelevant`` (what remains of them
    outside that span) that hold an ``energy`` share of their energy. None when there is none."""
    parts = []
    if earlier is not None and earlier.numel():
        _, values, vectors = torch.linalg.svd(earlier.float(), full_matrices=False)
        parts.append(vectors[values > values[0] * 1e-4].T)
    if energy > 0 and irrelevant.numel():
        rest = irrelevant.float()
        if parts:
            rest = rest - (rest @ parts[0]) @ parts[0].T
        _, values, vectors = torch.linalg.svd(rest, full_matrices=False)
        share = (values**2).cumsum(0) / (values**2).sum().clamp_min(1e-30)
        parts.append(vectors[: int((share < energy).sum()) + 1].T)
    if not parts:
        return None
    return torch.linalg.qr(torch.cat(parts, 1)).Q if len(parts) > 1 else parts[0]


def low_rank(change: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``change ≈ left @ right`` by its top singular directions holding an ``energy`` share of its
    energy. The rows of ``right`` lie in the row space of ``change``, so a change orthogonal to
    some inputs stays exactly orthogonal to them."""
    u, values, vh = torch.linalg.svd(change.float(), full_matrices=False)
    share = (values**2).cumsum(0) / (values**2).sum().clamp_min(1e-30)
    rank = min(int((share < energy).sum()) + 1, values.numel())
    return u[:, :rank] * values[:rank], vh[:rank]


# --------------------------------------------------------------------------------------------
# The side memory of one module (a forward hook)
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryState:
    delta: torch.Tensor  # [d_out, d_ff] float32: the merged side memory minus the main memory
    eps: float  # routing threshold (shards)
    shards: int
    # Orthogonal writing: edit e's change is U_e diag(s_e) V_e (orthonormal U_e), so its own
    # activation is ||D_e a|| = ||s_e * (V_e a)||. The edits' factors side by side: ``right`` (the
    # V rows), ``scale`` (the s), ``left`` (the U diag(s) columns), ``groups`` ([rows, edits],
    # one-hot: whose row), and each edit's threshold.
    right: torch.Tensor | None = None  # [sum of ranks, d_ff]
    scale: torch.Tensor | None = None  # [sum of ranks]
    left: torch.Tensor | None = None  # [d_out, sum of ranks]
    groups: torch.Tensor | None = None  # [sum of ranks, edits]
    thresholds: torch.Tensor | None = None  # [edits]

    def edit_activations(self, inputs: torch.Tensor) -> torch.Tensor:
        """Each orthogonal edit's own activation at ``inputs [..., d_ff]``: ``[..., edits]``."""
        return self._activations(inputs.float() @ self.right.T)

    def _activations(self, coordinates: torch.Tensor) -> torch.Tensor:
        return (((coordinates.float() * self.scale) ** 2) @ self.groups).sqrt()

    def gated(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthogonal writing: at each position of ``inputs [..., d_ff]``, the sum of the changes
        of the edits whose own activation exceeds their threshold, and where any does."""
        coordinates = inputs @ self.right.T.to(inputs.dtype)
        gate = self._activations(coordinates) > self.thresholds
        rows = gate.to(coordinates.dtype) @ self.groups.T.to(coordinates.dtype)
        return (coordinates * rows) @ self.left.T.to(coordinates.dtype), gate.any(-1)

    def fires(self, inputs: torch.Tensor) -> torch.Tensor:
        """Where the side memory answers (eq. 4): with orthogonal writing, where some edit's own
        activation exceeds its threshold; with shards, where the merged memory's exceeds ``eps``."""
        if self.right is None:
            return activations(inputs, self.delta) > self.eps
        return (self.edit_activations(inputs) > self.thresholds).any(-1)


class SideMemory(ModuleMemory):
    """The WISE side memory of one FFN value matrix: the applied edits, in order, and the hook."""

    attribute, label, with_kwargs = MEMORY_ATTRIBUTE, "side memory", True

    def __init__(self, model: nn.Module, module_name: str) -> None:
        self.enabled = True
        self._state: MemoryState | None = None
        super().__init__(model, module_name)

    def changed(self) -> None:
        self._state = None

    def requests(self) -> int:
        return sum(len(e.case_ids) or 1 for e in self.edits)

    def shard_delta(self, shard: int) -> torch.Tensor | None:
        """The delta of one shard: its edits' values scattered onto its mask, summed in order."""
        edits = [e for e in self.edits if e.shard == shard]
        if not edits:
            return None
        delta = torch.zeros(edits[0].shape)
        for edit in edits:
            edit.add_to(delta)
        return delta

    @property
    def state(self) -> MemoryState:
        if self._state is None:
            shards = sorted({e.shard for e in self.edits})
            deltas = [self.shard_delta(s) for s in shards]
            density = self.edits[-1].density
            delta = ties_merge(deltas, density)
            inputs = [e.answer_inputs for e in self.edits if e.answer_inputs.numel()]
            lowest = float(activations(torch.cat(inputs), delta).min()) if inputs else float("inf")
            ratio = self.edits[-1].act_ratio
            device = model_device(self.model)
            state = MemoryState(delta.to(device), ratio * lowest, len(shards))
            if self.edits[0].factors is not None:
                lefts = [e.factors[0] for e in self.edits]
                state.right = torch.cat([e.factors[1] for e in self.edits]).to(device)
                state.scale = torch.cat([left.norm(dim=0) for left in lefts]).to(device)
                state.left = torch.cat(lefts, 1).to(device)
                ranks = torch.tensor([left.shape[1] for left in lefts])
                state.groups = torch.nn.functional.one_hot(torch.arange(len(lefts)).repeat_interleave(ranks), len(lefts)).float().to(device)
                lowest_own = [
                    float(activations(e.answer_inputs, e.factors[0] @ e.factors[1]).min()) if e.answer_inputs.numel() else float("inf")
                    for e in self.edits
                ]
                state.thresholds = (ratio * torch.tensor(lowest_own)).to(device)
            self._state = state
        return self._state

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.enabled:
            return output
        state = self.state
        x = module_input(args, kwargs)
        out = first_tensor(output)
        if state.right is not None:
            extra, fire = state.gated(x)
        else:
            extra = x @ state.delta.to(x.dtype).T
            fire = extra.float().norm(dim=-1) > state.eps  # eq. 4, per position
        if not bool(fire.any()):
            return output
        return replace_first(output, torch.where(fire[..., None], out + extra.to(out.dtype), out))


# --------------------------------------------------------------------------------------------
# The edit
# --------------------------------------------------------------------------------------------


class WISEEdit(Edit):
    """One call's change to a WISE shard: its values on the shard's mask, and its activations.

    ``param_names`` is empty: no weight changes. Saved tensors: the change, as ``left`` and
    ``right`` factors (orthogonal writing; ``left`` has orthogonal columns) or as ``values`` on the
    shard's mask (in the mask's row-major order), and ``answer_inputs`` (the FFN activations at the
    positions that predict the targets, which set the routing threshold); ``edit.json``'s
    ``info`` holds the module, ``uid``, ``writing``, ``shard``, ``seed``, ``shape``,
    ``mask_ratio``, ``density`` and ``act_ratio``.
    """

    kind = "wise_side_memory"

    def __init__(
        self,
        editor: str,
        module: str,
        values: torch.Tensor,
        answer_inputs: torch.Tensor,
        shape: Sequence[int],
        shard: int,
        seed: int,
        mask_ratio: float,
        density: float,
        act_ratio: float,
        uid: str | None = None,
        case_ids: Sequence[str] = (),
        config: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(editor, None, case_ids, config, info)
        self.module = module
        self.uid = uid or uuid.uuid4().hex
        self.values = values.detach().to("cpu", torch.float32).reshape(-1)
        # Orthogonal writing: the change is left @ right ([d_out, r] @ [r, d_ff]) and values is empty.
        self.factors = None if factors is None else tuple(f.detach().to("cpu", torch.float32) for f in factors)
        self.answer_inputs = answer_inputs.detach().to("cpu", torch.float32)
        self.shape = tuple(int(s) for s in shape)
        self.shard, self.seed = int(shard), int(seed)
        self.mask_ratio, self.density, self.act_ratio = float(mask_ratio), float(density), float(act_ratio)
        if len(self.shape) != 2 or self.answer_inputs.dim() != 2 or self.answer_inputs.shape[1] != self.shape[1]:
            raise EditError(f"WISE edit: side memory shape {self.shape} and answer inputs {tuple(self.answer_inputs.shape)} disagree")
        if self.factors is not None:
            left, right = self.factors
            if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0] or (left.shape[0], right.shape[1]) != self.shape:
                raise EditError(f"WISE edit: factors {tuple(left.shape)} @ {tuple(right.shape)} do not make the side memory shape {self.shape}")
        self._mask: torch.Tensor | None = None

    @property
    def writing(self) -> str:
        return "orthogonal" if self.factors is not None else "shards"

    def add_to(self, delta: torch.Tensor) -> None:
        """Add this edit's change to a side-memory delta ``[d_out, d_ff]`` (in place)."""
        if self.factors is not None:
            delta += self.factors[0] @ self.factors[1]
        else:
            delta[self.mask()] += self.values

    def mask(self) -> torch.Tensor:
        if self._mask is None:
            self._mask = shard_mask(self.shape, self.mask_ratio, self.seed, self.shard)
            if int(self._mask.sum()) != self.values.numel():
                raise EditError(f"WISE edit: {self.values.numel()} values but the mask of shard {self.shard} (seed {self.seed}) has {int(self._mask.sum())} entries")
        return self._mask

    def num_stored_values(self) -> int:
        return sum(t.numel() for t in self._state_tensors().values())

    def _apply(self, model: nn.Module) -> None:
        check_finite("WISE edit", self._state_tensors())
        if self.factors is None:
            self.mask()
        module = get_module(model, self.module)  # a clear error if the model lacks it
        weight = getattr(module, "weight", None)
        if weight is not None and sorted(weight.shape) != sorted(self.shape):
            raise EditError(f"WISE edit of {self.module}: side memory {self.shape} does not fit its weight {tuple(weight.shape)}")
        SideMemory.attach(model, self.module, self)

    def _revert(self, model: nn.Module) -> None:
        SideMemory.detach(model, self.module, self)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        if self.factors is not None:
            return {"left": self.factors[0].contiguous(), "right": self.factors[1].contiguous(), "answer_inputs": self.answer_inputs.contiguous()}
        return {"values": self.values.contiguous(), "answer_inputs": self.answer_inputs.contiguous()}

    def save(self, directory):
        self.info.update(
            module=self.module, uid=self.uid, shard=self.shard, seed=self.seed, shape=list(self.shape),
            mask_ratio=self.mask_ratio, density=self.density, act_ratio=self.act_ratio, writing=self.writing,
        )
        return super().save(directory)

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "WISEEdit":
        info = dict(meta.get("info") or {})
        fields = ("module", "uid", "shard", "seed", "shape", "mask_ratio", "density", "act_ratio")
        orthogonal = info.get("writing") == "orthogonal"
        needed = ("left", "right", "answer_inputs") if orthogonal else ("values", "answer_inputs")
        missing = [n for n in needed if n not in tensors] + [n for n in fields if n not in info]
        if missing:
            raise EditError(f"WISE edit: missing {missing} (tensors {sorted(tensors)}, info fields {sorted(info)})")
        return cls(
            meta["editor"], info["module"], tensors.get("values", torch.zeros(0)), tensors["answer_inputs"], info["shape"], info["shard"], info["seed"],
            info["mask_ratio"], info["density"], info["act_ratio"], info["uid"], meta.get("case_ids", ()), meta.get("config"), info,
            (tensors["left"], tensors["right"]) if orthogonal else None,
        )


# --------------------------------------------------------------------------------------------
# The editor
# --------------------------------------------------------------------------------------------


@register_editor("wise", WISEConfig)
class WISE(KnownFactsFile, Editor):
    """WISE (Wang et al., 2024): edits trained into a side memory of one FFN value matrix.

    Several requests in one call are trained together. With orthogonal writing each call's change
    leaves earlier edits' answer inputs alone and routes by its own activation; with shards,
    sequential calls fill a shard, then the next one, and all shards are TIES-merged.
    """

    supports_batch = True

    def apply(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: WISEConfig) -> Edit:
        self.check_requests(requests)
        targets = get_targets(model, config.targets)
        layer = resolve_layer(model, targets, config.layer, "WISE layer")
        module_name = targets.layer("mlp_out", layer)
        module = get_module(model, module_name)
        device = model_device(model)
        memory = SideMemory.of(model, module_name)
        written = memory.requests() if memory is not None else 0
        if memory is not None and any(e.writing != config.writing for e in memory.edits):
            raise EditError(f"WISE at {module_name}: the side memory holds edits written by another mode than writing={config.writing!r}; revert them first")
        orthogonal = config.writing == "orthogonal"
        shard = 0 if orthogonal else written // config.shard_size

        batch = collate_pairs([encode_pair(tokenizer, r.prompt, r.target_new) for r in requests], pad_id(tokenizer), device)
        if memory is not None and not orthogonal:
            memory.enabled = False  # train the shard alone, as the paper does
        try:
            with torch.no_grad(), trace(model, [module_name], inputs=True, outputs=True) as traced:
                model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            d_ff, d_out = traced[module_name].input.shape[-1], traced[module_name].output.shape[-1]
            answer_inputs = traced[module_name].input[batch.rows, batch.cols].float()  # [n_answer, d_ff]
            irrelevant = inputs_at_every_token(model, tokenizer, module_name, self._irrelevant_texts(requests, config, written))
            start = memory.shard_delta(shard) if memory is not None else None
            start = (start if start is not None else torch.zeros(d_out, d_ff)).to(device)
            if orthogonal:
                earlier = torch.cat([e.answer_inputs for e in memory.edits]).to(device) if memory is not None else None
                basis, mask = protected_basis(earlier, irrelevant, config.irrelevant_energy), None
            else:
                basis, mask = None, shard_mask((d_out, d_ff), config.mask_ratio, config.seed, shard).to(device)
            earlier = memory.state.gated if memory is not None and orthogonal else None
            delta, steps, losses = self._train(model, targets, layer, module, batch, answer_inputs, irrelevant, mask, basis, start, config, earlier)
        finally:
            if memory is not None:
                memory.enabled = True

        info = {"layer": layer, "steps": steps, "final_losses": losses, "irrelevant_positions": len(irrelevant)}
        if orthogonal:
            factors = low_rank(delta - start, config.rank_energy)
            values = torch.zeros(0)
            delta = start + factors[0] @ factors[1]
            info.update(rank=int(factors[0].shape[1]), protected_dims=0 if basis is None else int(basis.shape[1]))
        else:
            factors, values = None, (delta - start)[mask].cpu()
        info["activation"] = float(activations(answer_inputs, delta - start if orthogonal else delta).min())
        edit = WISEEdit(
            self.name, module_name, values, answer_inputs, (d_out, d_ff), shard, config.seed, config.mask_ratio, config.density, config.act_ratio,
            None, [r.case_id for r in requests], config.to_dict(), info, factors,
        )
        logger.debug("WISE at %s, shard %d: %d steps, losses %s", module_name, shard, steps, losses)
        return edit.apply(model)

    def _irrelevant_texts(self, requests: Sequence[EditRequest], config: WISEConfig, written: int) -> list[str]:
        """Texts on which the side memory must stay silent: generic sentences, with ``fact_inputs``
        the built-in fact prompts, ``stand_ins`` questions about other subjects per request and,
        with ``retain_path``, ``retain_texts`` of that file's locality probes (the reference code's
        irrelevant inputs are such probes of the training data). No text a request is scored on."""
        scored = [p for r in requests for p in (r.prompt, *r.rephrase_prompts, *r.neighborhood_prompts, *(qa.prompt for qa in r.locality))]
        unscored = lambda items: [t for t in items if not any(t.startswith(p) for p in scored)]
        texts = memory_texts(requests, True, False, config.fact_inputs)
        seed = config.seed * 1_000_003 + 2 * written
        known = self.known_facts(config)
        if config.stand_ins:
            texts += stand_in_prompts(requests, config.stand_ins, torch.Generator().manual_seed(seed), known)
        if config.retain_texts and known is not None and known.probes:
            order = torch.randperm(len(known.probes), generator=torch.Generator().manual_seed(seed + 1)).tolist()
            texts += unscored(known.probes[j] for j in order)[: config.retain_texts]
        return unscored(dict.fromkeys(texts))

    def _train(self, model, targets, layer, module, batch, answer_inputs, irrelevant, mask, basis, start, config: WISEConfig, earlier=None):
        """The side memory's delta after SGD on the target NLL plus the routing loss (eq. 5): only
        the shard's entries move (``mask``), or (orthogonal writing, ``basis``) only directions
        orthogonal to ``basis``; then the routing loss and threshold concern this call's change
        alone, and the earlier edits add their changes where they fire (``earlier``: :meth:`MemoryState.gated`)."""
        delta = start.clone().requires_grad_(True)
        # With orthogonal writing the decay acts on this call's change only (below), not on earlier edits.
        optimizer = torch.optim.SGD([delta], lr=config.lr, weight_decay=config.weight_decay if basis is None else 0.0)
        # The side memory acts where the targets are predicted and, as at inference, wherever its
        # activation exceeds the threshold the edit's activations give (recomputed every step).
        at = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=delta.device)
        at[batch.rows, batch.cols] = True
        eps = torch.zeros(())

        own = (lambda: delta - start) if basis is not None else (lambda: delta)

        def side(module_: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            x = module_input(args, kwargs)
            out = first_tensor(output)
            if basis is None:
                extra = x @ delta.to(x.dtype).T
                fire = at | (activations(x.detach(), delta.detach()) > eps)
                return replace_first(output, out + extra * fire[..., None].to(out.dtype))
            change = own()
            extra = (x @ change.to(x.dtype).T) * (at | (activations(x.detach(), change.detach()) > eps))[..., None].to(out.dtype)
            if earlier is not None:  # zero wherever no earlier edit fires
                extra = extra + earlier(x.detach())[0]
            return replace_first(output, out + extra)

        handle = module.register_forward_hook(side, with_kwargs=True)
        steps, losses = 0, {}
        try:
            with frozen(model), frozen_below(model, targets, layer, batch.input_ids, batch.attention_mask):
                for steps in range(1, config.steps + 1):
                    change = own()
                    edit_act = activations(answer_inputs, change)
                    eps = config.act_ratio * edit_act.detach().min()
                    nll = target_nll(model, batch).mean()
                    irrelevant_act = activations(irrelevant, change)
                    routing = (
                        hinge(irrelevant_act - config.alpha)
                        + hinge(config.beta - edit_act)
                        + hinge(irrelevant_act[:, None] - edit_act[None, :] + config.gamma)
                    )
                    losses = {"nll": nll.item(), "routing": routing.item()}
                    if losses["nll"] < config.stop_loss and losses["routing"] == 0:
                        steps -= 1
                        break
                    optimizer.zero_grad(set_to_none=True)
                    (nll + routing).backward()
                    if mask is not None:
                        delta.grad *= mask  # knowledge sharding: only the shard's entries move
                    if basis is not None:
                        delta.grad -= (delta.grad @ basis) @ basis.T  # orthogonal writing
                    with torch.no_grad():
                        if basis is not None and config.weight_decay:
                            # decay only this call's change: earlier edits' outputs stay as they are
                            delta.grad += config.weight_decay * (delta - start)
                    optimizer.step()
                    if config.norm_constraint is not None:
                        with torch.no_grad():
                            delta.clamp_(-config.norm_constraint, config.norm_constraint)
        finally:
            handle.remove()
        return delta.detach(), steps, losses
