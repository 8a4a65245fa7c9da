"""GRACE: a discrete key-value codebook at one layer; the model's weights are never changed.

Hartvigsen, Sankaranarayanan, Palangi, Kim, Ghassemi (2023), "Aging with GRACE: Lifelong Model
Editing with Discrete Key-Value Adaptors" (NeurIPS). A GRACE adaptor wraps one layer ``f_l`` of the
frozen model with a codebook ``C = {(K_i, V_i, eps_i, y_i)}`` of keys, values, deferral radii and
the labels (targets) the values were trained for. Section 3 of the paper:

* **Inference (eq. 1-2).** For a query ``h^{l-1}`` (what flows into the layer), the nearest key
  ``i* = argmin_i d(h^{l-1}, K_i)`` with Euclidean ``d``; if ``d(h^{l-1}, K_i*) <= eps_i*`` the
  layer's output is replaced by ``V_i*``, otherwise the layer runs unchanged.
* **Codebook maintenance (Algorithm 1).** A new edit's key ``h`` with label ``y``:
  - no entry, or ``d(h, K_i*) > eps_i* + eps_init``: **add** ``(h, V, eps_init, y)``;
  - within that distance and ``y_i* == y``: **expand** ``eps_i*`` to cover ``h`` (``eps_i* = d``);
  - within it and ``y_i* != y``: **split**, both radii become ``d / 2`` and ``(h, V, d / 2, y)``
    is added, so the two balls no longer overlap.
* **Values** are trained by gradient descent (here Adam) on the target's teacher-forced NLL with
  the new value in place at the key's position and every weight frozen, stopped early once the
  loss falls below ``stop_loss`` (the paper's early-stopping regulariser).

Implementation choices (documented because the paper leaves them open or the reference code has
several):

* The wrapped layer is the **MLP of block** ``layer``: the query is the MLP's input (the normed
  residual stream, width ``hidden``) and its output (width ``hidden``) is what gets replaced.
* The key is the query at the **last token of the edit prompt**, as in the paper. At inference the
  codebook is consulted **at every position** independently (the reference code's per-token
  option): teacher-forced scoring (prompt + target in one pass) and KV-cache generation (one token
  at a time) therefore take the same decisions, and positions far from every key keep the layer's
  output bit for bit. A pass in which no position is in range returns the layer's output object
  unchanged.
* Values start from the layer's own output at the key ("warm" start) rather than at random.
* Expanding never shrinks a radius (``eps = max(eps, d)``) and splitting never grows one
  (``min(eps, d / 2)``); an expanded request trains no value (the entry's value already answers
  its label), as in Algorithm 1.

Edits are reversible. Each :class:`GRACEEdit` holds its own entries and the radii it changed in
entries of edits applied before it (``overrides``, by that edit's ``uid`` and entry index). The
model's codebook at a layer is the ordered list of applied edits: every edit contributes its
entries, and the overrides of later edits are laid over earlier radii in application order (an
override whose entry is not applied is ignored). Reverting an edit removes its entries and its
overrides, so the codebook is exactly what applying the remaining edits in the same order gives;
the hook is removed when the last edit goes.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from factedit.batches import pad_id

from ..base import Edit, EditError, Editor, EditRequest, check_finite, register_editor
from ..core.hooks import ModuleMemory, first_tensor, replace_first, trace
from ..core.lm import collate_pairs, encode_pair, model_device, sequence_nll, unembed
from ..core.prefix import FrozenPrefix
from ..core.targets import get_module, get_targets, resolve_layer
from .config import GRACEConfig

logger = logging.getLogger(__name__)

CODEBOOK_ATTRIBUTE = "grace_codebooks"  # where a model keeps its codebooks (module name -> Codebook)


# --------------------------------------------------------------------------------------------
# The codebook (a forward hook on the wrapped module)
# --------------------------------------------------------------------------------------------


@dataclass
class Entries:
    """The effective codebook: one row per entry of every applied edit, in application order."""

    keys: torch.Tensor  # [n, hidden] float32
    values: torch.Tensor  # [n, hidden] float32
    radii: torch.Tensor  # [n] float32, overrides applied
    labels: list[str]
    refs: list[tuple[str, int]]  # (edit uid, index within that edit) of each row


def nearest(keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance to the nearest key and its index, for ``queries [m, hidden]`` (eq. 1)."""
    dist = torch.cdist(queries.float(), keys, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.min(-1)


class Codebook(ModuleMemory):
    """The GRACE adaptor of one module: the applied edits, in order, and the hook that reads them."""

    attribute, label = CODEBOOK_ATTRIBUTE, "codebook"

    def __init__(self, model: nn.Module, module_name: str) -> None:
        self._entries: Entries | None = None
        super().__init__(model, module_name)

    def changed(self) -> None:
        self._entries = None

    @property
    def entries(self) -> Entries:
        if self._entries is None:
            device = model_device(self.model)
            rows: dict[tuple[str, int], int] = {}
            refs: list[tuple[str, int]] = []
            for edit in self.edits:
                for i in range(len(edit.labels)):
                    rows[edit.uid, i] = len(refs)
                    refs.append((edit.uid, i))
            radii = torch.cat([e.radii for e in self.edits]).clone()
            for edit in self.edits:  # later edits' overrides win (application order)
                for (uid, index), radius in zip(edit.override_refs, edit.override_radii.tolist()):
                    if (uid, index) in rows:
                        radii[rows[uid, index]] = radius
            self._entries = Entries(
                torch.cat([e.keys for e in self.edits]).to(device),
                torch.cat([e.values for e in self.edits]).to(device),
                radii.to(device),
                [label for e in self.edits for label in e.labels],
                refs,
            )
        return self._entries

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        entries = self.entries
        query = first_tensor(args)
        out = first_tensor(output)
        flat = query.reshape(-1, query.shape[-1])
        best, index = nearest(entries.keys, flat)
        hit = best <= entries.radii[index]  # eq. 2: replace only within the deferral radius
        if not bool(hit.any()):
            return output
        replaced = out.reshape(-1, out.shape[-1]).clone()
        replaced[hit] = entries.values[index[hit]].to(replaced.dtype)
        return replace_first(output, replaced.view_as(out))


# --------------------------------------------------------------------------------------------
# The edit
# --------------------------------------------------------------------------------------------


class GRACEEdit(Edit):
    """GRACE codebook entries (keys, values, radii, labels) and the radii they changed elsewhere.

    ``param_names`` is empty: no weight changes. Saved tensors: ``keys``, ``values``, ``radii`` and
    ``override_radii``; ``edit.json``'s ``info`` holds the module, the edit's ``uid``, the labels
    and the ``override_refs`` (uid and index of each entry whose radius this edit sets).
    """

    kind = "grace_codebook"

    def __init__(
        self,
        editor: str,
        module: str,
        keys: torch.Tensor,
        values: torch.Tensor,
        radii: torch.Tensor,
        labels: Sequence[str],
        override_refs: Sequence[tuple[str, int]] = (),
        override_radii: torch.Tensor | None = None,
        uid: str | None = None,
        case_ids: Sequence[str] = (),
        config: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(editor, None, case_ids, config, info)
        self.module = module
        self.uid = uid or uuid.uuid4().hex
        self.keys = keys.detach().to("cpu", torch.float32)
        self.values = values.detach().to("cpu", torch.float32)
        self.radii = radii.detach().to("cpu", torch.float32).reshape(-1)
        self.labels = [str(label) for label in labels]
        self.override_refs = [(str(u), int(i)) for u, i in override_refs]
        self.override_radii = (override_radii if override_radii is not None else torch.zeros(0)).detach().to("cpu", torch.float32).reshape(-1)
        n = len(self.labels)
        if self.keys.shape[0] != n or self.values.shape != self.keys.shape or self.radii.shape != (n,):
            raise EditError(f"GRACE edit: {n} labels but keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)}, radii {tuple(self.radii.shape)}")
        if len(self.override_refs) != len(self.override_radii):
            raise EditError("GRACE edit: one override radius per override reference is needed")

    def num_stored_values(self) -> int:
        return self.keys.numel() + self.values.numel() + self.radii.numel() + self.override_radii.numel()

    def _apply(self, model: nn.Module) -> None:
        check_finite("GRACE edit", self._state_tensors())
        get_module(model, self.module)  # a clear error if the model lacks it
        width = getattr(getattr(model, "config", None), "hidden_size", None)
        if width is not None and self.keys.shape[1] != width:
            raise EditError(f"GRACE edit of {self.module}: keys of width {self.keys.shape[1]} != the model's hidden size {width}")
        Codebook.attach(model, self.module, self)

    def _revert(self, model: nn.Module) -> None:
        Codebook.detach(model, self.module, self)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys.contiguous(), "values": self.values.contiguous(), "radii": self.radii.contiguous(), "override_radii": self.override_radii.contiguous()}

    def save(self, directory):
        self.info.update(module=self.module, uid=self.uid, labels=self.labels, override_refs=[list(r) for r in self.override_refs])
        return super().save(directory)

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "GRACEEdit":
        info = dict(meta.get("info") or {})
        missing = [n for n in ("keys", "values", "radii", "override_radii") if n not in tensors] + [n for n in ("module", "uid", "labels") if n not in info]
        if missing:
            raise EditError(f"GRACE edit: missing {missing} (tensors {sorted(tensors)}, info fields {sorted(info)})")
        return cls(
            meta["editor"], info["module"], tensors["keys"], tensors["values"], tensors["radii"], info["labels"],
            [tuple(r) for r in info.get("override_refs", [])], tensors["override_radii"], info["uid"],
            meta.get("case_ids", ()), meta.get("config"), info,
        )


# --------------------------------------------------------------------------------------------
# Algorithm 1: where a new key goes
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The codebook update for one call: new entries, radii set on existing ones, expanded requests."""

    new_keys: list[torch.Tensor] = field(default_factory=list)
    new_radii: list[float] = field(default_factory=list)
    new_labels: list[str] = field(default_factory=list)
    new_requests: list[int] = field(default_factory=list)  # request index that each new entry answers
    overrides: dict[tuple[str, int], float] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)  # "add", "expand" or "split" per request


def plan_updates(existing: Entries | None, keys: torch.Tensor, labels: Sequence[str], eps_init: float, uid: str) -> Plan:
    """Apply GRACE's add / expand / split rules (Algorithm 1) to ``keys`` one after another.

    ``existing`` is the model's codebook before the call; entries created earlier in the same
    call take part in the later requests' decisions. New entries are referenced as ``(uid, i)``.
    """
    plan = Plan()
    old_keys = existing.keys.cpu() if existing is not None else torch.zeros(0, keys.shape[1])
    old_radii = existing.radii.cpu().tolist() if existing is not None else []
    old_labels = existing.labels if existing is not None else []
    old_refs = existing.refs if existing is not None else []

    for r, (key, label) in enumerate(zip(keys.float().cpu(), labels)):
        all_keys = torch.cat([old_keys, torch.stack(plan.new_keys)]) if plan.new_keys else old_keys
        refs = list(old_refs) + [(uid, i) for i in range(len(plan.new_keys))]
        radii = [plan.overrides.get(ref, rad) for ref, rad in zip(old_refs, old_radii)] + list(plan.new_radii)
        entry_labels = list(old_labels) + plan.new_labels
        if len(all_keys) == 0:
            dist, near = float("inf"), -1
        else:
            d, i = nearest(all_keys, key[None])
            dist, near = float(d[0]), int(i[0])
        if near < 0 or dist > radii[near] + eps_init:  # add: no conflict with any ball
            action, new_radius = "add", eps_init
        elif entry_labels[near] == label:  # expand: cover the new key with the same answer
            action, new_radius = "expand", None
            set_radius = max(radii[near], dist)
        else:  # split: both balls shrink to half the distance
            action = "split"
            set_radius = min(radii[near], dist / 2)
            new_radius = min(eps_init, dist / 2)
        if action in ("expand", "split"):
            ref = refs[near]
            if ref[0] == uid:
                plan.new_radii[ref[1]] = set_radius
            else:
                plan.overrides[ref] = set_radius
        if new_radius is not None:
            plan.new_keys.append(key)
            plan.new_radii.append(new_radius)
            plan.new_labels.append(label)
            plan.new_requests.append(r)
        plan.actions.append(action)
    return plan


# --------------------------------------------------------------------------------------------
# The editor
# --------------------------------------------------------------------------------------------


@register_editor("grace", GRACEConfig)
class GRACE(Editor):
    """GRACE (Hartvigsen et al., 2023): one codebook entry per edit, at the MLP of one block.

    Several requests in one call give several entries (Algorithm 1 applied to them in order) whose
    values are trained jointly; sequential calls add to the same codebook.
    """

    supports_batch = True

    def apply(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: GRACEConfig) -> Edit:
        self.check_requests(requests)
        targets = get_targets(model, config.targets)
        layer = resolve_layer(model, targets, config.layer, "GRACE layer")
        module_name = targets.layer("mlp", layer)
        device = model_device(model)
        encoded = [encode_pair(tokenizer, r.prompt, r.target_new) for r in requests]
        labels = [r.target_new for r in requests]

        # Keys: the wrapped module's input at each prompt's last token (the layer's own output there
        # is the values' warm start). A codebook at this layer does not change its own input.
        prompts = collate_pairs([(p, p[-1:]) for p, _ in encoded], pad_id(tokenizer), device)
        last = torch.tensor([len(p) - 1 for p, _ in encoded], device=device)
        rows = torch.arange(len(encoded), device=device)
        with torch.no_grad(), trace(model, [module_name], inputs=True, outputs=True) as traced:
            model.base_model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, use_cache=False)
        keys = traced[module_name].input[rows, last].float()
        warm = traced[module_name].output[rows, last].float()

        uid = uuid.uuid4().hex
        codebook = Codebook.of(model, module_name)
        plan = plan_updates(codebook.entries if codebook is not None else None, keys, labels, config.eps_init, uid)
        values, steps = self._train_values(model, targets, layer, module_name, [encoded[r] for r in plan.new_requests], warm[plan.new_requests], tokenizer, config)

        width = keys.shape[1]
        edit = GRACEEdit(
            self.name,
            module_name,
            torch.stack(plan.new_keys) if plan.new_keys else torch.zeros(0, width),
            values if plan.new_keys else torch.zeros(0, width),
            torch.tensor(plan.new_radii, dtype=torch.float32),
            plan.new_labels,
            list(plan.overrides),
            torch.tensor(list(plan.overrides.values()), dtype=torch.float32),
            uid,
            [r.case_id for r in requests],
            config.to_dict(),
            {"actions": plan.actions, "steps": steps},
        )
        logger.debug("GRACE at %s: %s", module_name, plan.actions)
        return edit.apply(model)

    def _train_values(self, model, targets, layer, module_name, encoded, warm: torch.Tensor, tokenizer, config: GRACEConfig) -> tuple[torch.Tensor, int]:
        """Values that make each prompt predict its target, the base weights frozen (section 3).

        A value replaces the wrapped module's output at the prompt's last token, so nothing before
        that token, and nothing below ``layer``, depends on it: the prompt up to that token runs
        once and is kept as keys and values (:class:`~factedit.editors.core.prefix.FrozenPrefix`),
        and each step runs only the last prompt token and the target's tokens through the blocks
        from ``layer`` up. The loss is the same per-token mean target NLL as on the full
        sequence, up to float rounding. Returns the values and the optimisation steps taken."""
        if not encoded:
            return warm.detach().cpu(), 0
        device = model_device(model)
        prefix = FrozenPrefix(model, targets, [p + t for p, t in encoded], [len(p) - 1 for p, _ in encoded], layer, pad_id(tokenizer))
        # suffix column j (the last prompt token, then the target's tokens) predicts target token j
        rows = torch.tensor([i for i, (_, t) in enumerate(encoded) for _ in t], device=device)
        cols = torch.tensor([j for _, t in encoded for j in range(len(t))], device=device)
        wanted = torch.tensor([token for _, t in encoded for token in t], device=device)
        lengths = [len(t) for _, t in encoded]
        values = warm.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([values], lr=config.lr)

        def put_values(module: nn.Module, args: tuple, output: Any) -> Any:
            out = first_tensor(output).clone()
            out[:, 0] = values.to(out.dtype)
            return replace_first(output, out)

        handle = get_module(model, module_name).register_forward_hook(put_values)
        loss, taken = None, 0
        try:
            with torch.enable_grad():
                for _ in range(config.steps):
                    loss = sequence_nll(unembed(model, prefix.hidden()[rows, cols]), rows, wanted, lengths).mean()
                    if loss.item() < config.stop_loss:
                        break
                    optimiser.zero_grad()
                    # Only the values need gradients: torch.autograd.grad leaves the model's .grad alone.
                    (values.grad,) = torch.autograd.grad(loss, [values])
                    optimiser.step()
                    taken += 1
        finally:
            handle.remove()
        logger.debug("GRACE values: loss %.4f after %d steps", float("nan") if loss is None else loss.item(), taken)
        return values.detach().cpu(), taken
