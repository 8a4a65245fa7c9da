"""WISE: a side memory beside one FFN value matrix, with activation routing, sharding and merging.

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

Implementation choices (documented because they differ from the reference code or are left open):

* **Routing is decided per position**, each token by its own activation. The reference code
  takes the mean activation of a whole input and routes the whole input, which assumes one
  input per forward call and breaks under KV-cache generation (later calls see one token) and
  under batched, prefix-shared scoring. Per position, teacher-forced scoring, batched scoring and
  cached generation take the same decisions, and positions that do not fire keep the main
  memory's output bit for bit. Accordingly, the edit's activations (those that must reach
  ``beta`` and that set ``eps``) are taken at the positions that predict the target (the
  prompt's last token and the target's teacher-forced positions), and training applies the side
  memory there and, as inference will, wherever its activation exceeds ``act_ratio`` times the
  smallest of them (recomputed every step).
  Irrelevant inputs are every position of a fixed set of generic sentences
  (:data:`factedit.editors.core.patch.GENERIC_TEXTS`) and, with ``fact_inputs``, of the built-in fact
  prompts (:func:`factedit.editors.core.patch.fact_prompts`: factual questions about other subjects, which
  teach the routing to tell subjects apart), never the requests' locality probes (they are what
  locality is scored on).
* ``eps`` is recomputed from the stored edits' activations under the side memory as it is now
  (after later edits of the same shard and after merging), not frozen at training time.
* The side memory's output is ``W_v a + D a``: the main memory's output plus the delta's, so the
  main weights are never copied or changed. The norm constraint clamps each entry of ``D`` to
  ``[-norm_constraint, norm_constraint]`` (``W_v'`` stays within that of ``W_v``), as in the
  reference code. Training uses SGD with weight decay on the current shard only; other shards
  are not active while a shard trains.
* All shards, the one still filling included, are merged into the side memory the model uses;
  with a single shard the side memory is that shard.

Edits are reversible and ordered like GRACE's codebook: the model's side memory at a module is
the list of applied :class:`WISEEdit` s, each holding the change it made to its shard (its
values on the shard's mask, which is regenerated from the edit's seed and shard index). The
shards, the merge and the threshold are recomputed from that list, so reverting an edit gives
exactly the memory the remaining edits give, and the hook is removed with the last edit.
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


# --------------------------------------------------------------------------------------------
# The side memory of one module (a forward hook)
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryState:
    delta: torch.Tensor  # [d_out, d_ff] float32: the merged side memory minus the main memory
    eps: float  # routing threshold
    shards: int


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
            delta[edit.mask()] += edit.values
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
            self._state = MemoryState(delta.to(model_device(self.model)), ratio * lowest, len(shards))
        return self._state

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.enabled:
            return output
        state = self.state
        x = module_input(args, kwargs)
        out = first_tensor(output)
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

    ``param_names`` is empty: no weight changes. Saved tensors: ``values`` (the change on the
    mask, in the mask's row-major order) and ``answer_inputs`` (the FFN activations at the
    positions that predict the targets, which set the routing threshold); ``edit.json``'s
    ``info`` holds the module, ``uid``, ``shard``, ``seed``, ``shape``, ``mask_ratio``,
    ``density`` and ``act_ratio``.
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
    ) -> None:
        super().__init__(editor, None, case_ids, config, info)
        self.module = module
        self.uid = uid or uuid.uuid4().hex
        self.values = values.detach().to("cpu", torch.float32).reshape(-1)
        self.answer_inputs = answer_inputs.detach().to("cpu", torch.float32)
        self.shape = tuple(int(s) for s in shape)
        self.shard, self.seed = int(shard), int(seed)
        self.mask_ratio, self.density, self.act_ratio = float(mask_ratio), float(density), float(act_ratio)
        if len(self.shape) != 2 or self.answer_inputs.dim() != 2 or self.answer_inputs.shape[1] != self.shape[1]:
            raise EditError(f"WISE edit: side memory shape {self.shape} and answer inputs {tuple(self.answer_inputs.shape)} disagree")
        self._mask: torch.Tensor | None = None

    def mask(self) -> torch.Tensor:
        if self._mask is None:
            self._mask = shard_mask(self.shape, self.mask_ratio, self.seed, self.shard)
            if int(self._mask.sum()) != self.values.numel():
                raise EditError(f"WISE edit: {self.values.numel()} values but the mask of shard {self.shard} (seed {self.seed}) has {int(self._mask.sum())} entries")
        return self._mask

    def num_stored_values(self) -> int:
        return self.values.numel() + self.answer_inputs.numel()

    def _apply(self, model: nn.Module) -> None:
        check_finite("WISE edit", self._state_tensors())
        self.mask()
        module = get_module(model, self.module)  # a clear error if the model lacks it
        weight = getattr(module, "weight", None)
        if weight is not None and sorted(weight.shape) != sorted(self.shape):
            raise EditError(f"WISE edit of {self.module}: side memory {self.shape} does not fit its weight {tuple(weight.shape)}")
        SideMemory.attach(model, self.module, self)

    def _revert(self, model: nn.Module) -> None:
        SideMemory.detach(model, self.module, self)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.contiguous(), "answer_inputs": self.answer_inputs.contiguous()}

    def save(self, directory):
        self.info.update(
            module=self.module, uid=self.uid, shard=self.shard, seed=self.seed, shape=list(self.shape),
            mask_ratio=self.mask_ratio, density=self.density, act_ratio=self.act_ratio,
        )
        return super().save(directory)

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "WISEEdit":
        info = dict(meta.get("info") or {})
        fields = ("module", "uid", "shard", "seed", "shape", "mask_ratio", "density", "act_ratio")
        missing = [n for n in ("values", "answer_inputs") if n not in tensors] + [n for n in fields if n not in info]
        if missing:
            raise EditError(f"WISE edit: missing {missing} (tensors {sorted(tensors)}, info fields {sorted(info)})")
        return cls(
            meta["editor"], info["module"], tensors["values"], tensors["answer_inputs"], info["shape"], info["shard"], info["seed"],
            info["mask_ratio"], info["density"], info["act_ratio"], info["uid"], meta.get("case_ids", ()), meta.get("config"), info,
        )


# --------------------------------------------------------------------------------------------
# The editor
# --------------------------------------------------------------------------------------------


@register_editor("wise", WISEConfig)
class WISE(Editor):
    """WISE (Wang et al., 2024): edits trained into a sharded side memory of one FFN value matrix.

    Several requests in one call are trained together into the current shard; sequential calls
    fill the shard, then the next one, and all shards are TIES-merged into the side memory.
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
        shard = (memory.requests() if memory is not None else 0) // config.shard_size

        batch = collate_pairs([encode_pair(tokenizer, r.prompt, r.target_new) for r in requests], pad_id(tokenizer), device)
        if memory is not None:
            memory.enabled = False  # train the shard alone, as the paper does
        try:
            with torch.no_grad(), trace(model, [module_name], inputs=True, outputs=True) as traced:
                model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            d_ff, d_out = traced[module_name].input.shape[-1], traced[module_name].output.shape[-1]
            answer_inputs = traced[module_name].input[batch.rows, batch.cols].float()  # [n_answer, d_ff]
            irrelevant = inputs_at_every_token(model, tokenizer, module_name, memory_texts(requests, True, False, config.fact_inputs))
            mask = shard_mask((d_out, d_ff), config.mask_ratio, config.seed, shard).to(device)
            start = memory.shard_delta(shard) if memory is not None else None
            start = (start if start is not None else torch.zeros(d_out, d_ff)).to(device)
            delta, steps, losses = self._train(model, targets, layer, module, batch, answer_inputs, irrelevant, mask, start, config)
        finally:
            if memory is not None:
                memory.enabled = True

        values = (delta - start)[mask].cpu()
        edit = WISEEdit(
            self.name, module_name, values, answer_inputs, (d_out, d_ff), shard, config.seed, config.mask_ratio, config.density, config.act_ratio,
            None, [r.case_id for r in requests], config.to_dict(),
            {"layer": layer, "steps": steps, "final_losses": losses, "irrelevant_positions": len(irrelevant), "activation": float(activations(answer_inputs, delta).min())},
        )
        logger.debug("WISE at %s, shard %d: %d steps, losses %s", module_name, shard, steps, losses)
        return edit.apply(model)

    def _train(self, model, targets, layer, module, batch, answer_inputs, irrelevant, mask, start, config: WISEConfig):
        """The shard's delta after SGD on the target NLL plus the routing loss (eq. 5)."""
        delta = start.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([delta], lr=config.lr, weight_decay=config.weight_decay)
        # The side memory acts where the targets are predicted and, as at inference, wherever its
        # activation exceeds the threshold the edit's activations give (recomputed every step).
        at = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=delta.device)
        at[batch.rows, batch.cols] = True
        eps = torch.zeros(())

        def side(module_: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            x = module_input(args, kwargs)
            out = first_tensor(output)
            extra = x @ delta.to(x.dtype).T
            fire = at | (extra.detach().float().norm(dim=-1) > eps)
            return replace_first(output, out + extra * fire[..., None].to(out.dtype))

        handle = module.register_forward_hook(side, with_kwargs=True)
        steps, losses = 0, {}
        try:
            with frozen(model), frozen_below(model, targets, layer, batch.input_ids, batch.attention_mask):
                for steps in range(1, config.steps + 1):
                    edit_act = activations(answer_inputs, delta)
                    eps = config.act_ratio * edit_act.detach().min()
                    nll = target_nll(model, batch).mean()
                    irrelevant_act = activations(irrelevant, delta)
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
                    delta.grad *= mask  # knowledge sharding: only the shard's entries move
                    optimizer.step()
                    if config.norm_constraint is not None:
                        with torch.no_grad():
                            delta.clamp_(-config.norm_constraint, config.norm_constraint)
        finally:
            handle.remove()
        return delta.detach(), steps, losses
