"""Several weight edits measured in one batch: each batch row runs with its own case's edit.

In single and batch mode every case is scored on the model carrying only its own edit, so the
post-edit measurements of different cases used to need one set of forward passes each: on a CPU
most of a case's time is the fluency and generation decoding of a model that differs from the
unedited one in a single matrix. :class:`RowEdits` lets the cases of a whole chunk share those
passes. For every module an edit changes, it keeps the module's edited weights per edit (written
exactly as :meth:`Edit.apply` writes them) and, during a forward pass, recomputes that module's
output for the rows of each edit with those weights; the other rows keep the unedited output.
Every row so sees the model of its own case, and the batch costs one pass over the shared weights
instead of one per case.

Only plain weight changes (:class:`Edit` itself, ``kind == "weight_delta"``) of the weight or bias
of a linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) can be measured this way. An edit kind
may name its own per-row class (``row_sharing``): IKE's contexts are measured per row by
:class:`~factedit.editors.ike.editor.RowContexts`. Memory and patch editors, whose edits are
code, are measured on the edited model one case at a time (:func:`can_share_rows` says which). The results equal those of the edited model up to the float
rounding of a differently shaped batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from factedit.editors.base import Edit
from factedit.editors.core.targets import is_transposed

_LINEAR_TYPES = ("Linear", "Conv1D")


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str] | None:
    """The linear module holding parameter ``name`` and the parameter's role there (``weight`` or
    ``bias``), or None when the parameter belongs to anything else."""
    module_name, _, role = name.rpartition(".")
    if role not in ("weight", "bias"):
        return None
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return (module, role) if type(module).__name__ in _LINEAR_TYPES else None


def _sharing_class(model: torch.nn.Module, edits: Sequence[Edit]) -> type | None:
    """The class that measures ``edits`` per batch row: :class:`RowEdits` for plain weight changes
    of linear layers, an edit kind's own ``row_sharing`` class (IKE's contexts), else None."""
    if not edits:
        return None
    if all(type(edit) is Edit and edit.deltas and all(_owner(model, name) is not None for name in edit.deltas) for edit in edits):
        return RowEdits
    kinds = {type(edit) for edit in edits}
    return getattr(kinds.pop(), "row_sharing", None) if len(kinds) == 1 else None


def can_share_rows(model: torch.nn.Module, edits: Sequence[Edit]) -> bool:
    """Whether ``edits`` can be measured per batch row: plain weight changes of linear layers
    (:class:`RowEdits`) or edits of a kind that names its own way (``row_sharing``: IKE's
    contexts); a memory or patch edit, or a change to an embedding or a norm, cannot."""
    return _sharing_class(model, edits) is not None


def share_rows(model: torch.nn.Module, per_case: Sequence[Sequence[Edit]]):
    """The context that runs each batch row with its own case's edits (``per_case[i]``: case
    ``i``'s edits, all of one sharing class, as :func:`can_share_rows` found)."""
    classes = {_sharing_class(model, edits) for edits in per_case if edits}
    if len(classes) != 1 or None in classes:
        raise ValueError("these cases' edits cannot be measured per batch row together")
    return classes.pop()(model, per_case)


def edited_bytes(model: torch.nn.Module, edits: Sequence[Edit]) -> int:
    """Bytes measuring ``edits`` per batch row holds: one copy of each changed parameter, and what
    an edit of another kind says it needs (``row_bytes``: an IKE context's keys and values)."""
    names = {name for edit in edits for name in edit.deltas}
    held = sum(param.numel() * param.element_size() for param in map(model.get_parameter, names))
    return held + sum(edit.row_bytes(model) for edit in edits if hasattr(edit, "row_bytes"))


class RowEdits:
    """A context in which each batch row runs with the edits of the case it belongs to.

    ``per_case[i]`` is the list of edits of case ``i`` (cases edited together share one list,
    which is then held once). Before each forward pass the caller names the case of every batch
    row with :meth:`select`; rows of a case with no edits (an empty list) run unedited.
    """

    def __init__(self, model: torch.nn.Module, per_case: Sequence[Sequence[Edit]]) -> None:
        for edits in per_case:
            if edits and not can_share_rows(model, edits):
                raise ValueError("RowEdits measures plain weight changes of linear layers only")
        self.model = model
        units: dict[tuple[int, ...], int] = {}
        self._unit_of_case: list[int | None] = []
        unit_edits: list[Sequence[Edit]] = []
        for edits in per_case:
            if not edits:
                self._unit_of_case.append(None)
                continue
            key = tuple(id(edit) for edit in edits)
            if key not in units:
                units[key] = len(unit_edits)
                unit_edits.append(edits)
            self._unit_of_case.append(units[key])
        params = dict(model.named_parameters())
        # module -> unit -> {"weight": tensor, "bias": tensor}: the module's parameters as that
        # unit's edits leave them, applied one after another as Edit.apply writes them.
        self._weights: dict[torch.nn.Module, dict[int, dict[str, torch.Tensor | None]]] = {}
        with torch.no_grad():
            for unit, edits in enumerate(unit_edits):
                written: dict[str, torch.Tensor] = {}
                for edit in edits:
                    for name, delta in edit.deltas.items():
                        param = params[name]
                        base = written.get(name, param.detach())
                        written[name] = (base.float() + delta.dense(param.device).float()).to(param.dtype)
                for name, value in written.items():
                    module, role = _owner(model, name)  # type: ignore[misc]
                    slot = self._weights.setdefault(module, {}).setdefault(unit, {"weight": module.weight, "bias": module.bias})
                    slot[role] = value
        self._rows: dict[int, torch.Tensor] = {}
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._handles: list = []

    def select(self, cases: Sequence[int]) -> None:
        """Name the case of each row of the next forward passes (``cases[row]``: an index into
        ``per_case``)."""
        rows: dict[int, list[int]] = {}
        for row, case in enumerate(cases):
            unit = self._unit_of_case[case]
            if unit is not None:
                rows.setdefault(unit, []).append(row)
        self._rows = {unit: torch.tensor(r, dtype=torch.long) for unit, r in rows.items()}
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _hook(self, module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for unit, params in self._weights[module].items():
            if unit not in self._rows:
                continue
            key = (unit, x.device)  # a model split over devices: each module's rows where it runs
            if key not in self._on_device:
                self._on_device[key] = self._rows[unit].to(x.device)
            rows = self._on_device[key]
            part = x.index_select(0, rows)
            if is_transposed(module):  # Conv1D: y = x @ W + b, W stored [in, out]
                flat = part.reshape(-1, part.shape[-1])
                flat = flat @ params["weight"] if params["bias"] is None else torch.addmm(params["bias"], flat, params["weight"])
                edited = flat.view(*part.shape[:-1], flat.shape[-1])
            else:
                edited = F.linear(part, params["weight"], params["bias"])
            output = output.index_copy(0, rows, edited.to(output.dtype))
        return output

    def __enter__(self) -> "RowEdits":
        self._handles = [module.register_forward_hook(self._hook) for module in self._weights]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._rows, self._on_device = [], {}, {}
