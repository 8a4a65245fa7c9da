"""The editor contract: reversible edits and the :class:`Editor` interface.

Every editor, trained or training-free, implements one call::

    edit = editor.apply(model, tokenizer, requests, config)

which changes ``model`` in place and returns an :class:`Edit`. The edit remembers what it
replaced, so ``edit.revert(model)`` restores the weights bit-exactly; ``edit.save(dir)`` writes it
as safetensors + JSON and ``Edit.load(dir)`` reads it back, to be applied to a fresh copy of the
same model with ``edit.apply(model)``. A saved edit records the model it was made for
(:class:`ModelRecord`), and applying it to another refuses unless forced; it also records the
texts of the requests it carries out (:attr:`Edit.requests`, filled in for every editor by
:class:`Editor`) and the software that made it (:attr:`Edit.provenance`).

Requests, configs and the registry (importable without torch) live in :mod:`.requests`,
:mod:`.config` and :mod:`.registry`, re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file

from .config import EditorConfig
from .registry import available_editors, get_editor, register_editor
from .requests import QA, EditRequest

__all__ = [
    "EDIT_FORMAT_VERSION",
    "QA",
    "Edit",
    "EditError",
    "EditRequest",
    "Editor",
    "EditorConfig",
    "ModelRecord",
    "ParamDelta",
    "available_editors",
    "check_finite",
    "get_editor",
    "register_editor",
    "same_bits",
    "snapshot_deltas",
]

logger = logging.getLogger(__name__)

EDIT_FORMAT_VERSION = 1


# -- edits: what an editor returns --------------------------------------------------------------


class EditError(RuntimeError):
    """An edit cannot be applied, reverted, saved or loaded as asked."""


def check_finite(what: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse (:class:`EditError`) to apply ``what`` if any of its ``tensors`` holds NaN or inf."""
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise EditError(f"{what}: {name} contains non-finite values (NaN or inf); refusing to apply it")


@dataclass
class ParamDelta:
    """The change to one parameter: dense (``delta``) or a product of factors ``left @ right``.

    Low-rank updates (ROME's is rank one) are stored as their factors, so a saved edit holds
    ``(rows + cols) * rank`` numbers instead of ``rows * cols``.
    """

    delta: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.delta is None) == (self.left is None or self.right is None):
            raise ValueError("a ParamDelta holds either a dense delta or both low-rank factors")

    @property
    def rank(self) -> int | None:
        return None if self.left is None else self.left.shape[-1]

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The full change, computed on ``device`` (default: where the tensors are).

        Applying computes the product on the parameter's device, so that an edit made there and
        the same edit loaded from disk (whose factors are on the CPU) write the same bits.
        """
        if self.delta is not None:
            return self.delta.to(device) if device is not None else self.delta
        if device is not None:
            return self.left.to(device) @ self.right.to(device)
        return self.left @ self.right

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.delta is not None:
            return {"delta": self.delta}
        return {"left": self.left, "right": self.right}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold identical bytes (unlike ``torch.equal``: NaN equals NaN, -0 differs from 0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_bytes = lambda t: t.detach().reshape(-1).contiguous().view(torch.uint8)
    return torch.equal(as_bytes(a), as_bytes(b.to(a.device)))


@dataclass(frozen=True)
class ModelRecord:
    """The model an edit was made for, saved with it so that it is not applied to another.

    ``fingerprint`` is :func:`editors.stats.model_fingerprint` of the model just before the edit
    was first applied (a hash of the config and of a strided sample of every weight: about 25 ms
    for a 135M-parameter model on a CPU). In a sequential run edit ``k`` was made on the model
    carrying edits ``1..k-1``, so its fingerprint is that model's: the saved edits re-apply in
    order onto the same base model, and applying edit ``k`` alone to the base is refused. Only
    the weights count: hooks of memory editors are not part of it. ``shapes`` are those of the
    parameters the edit changes (none for memory and patch editors). ``name`` is the model's id
    as it was given (a hub id, a folder, ``edit.py --model``), for people to read: the same
    weights may live under another name elsewhere, so it is never compared.
    """

    model_type: str
    fingerprint: str
    shapes: dict[str, list[int]]
    name: str | None = None

    @classmethod
    def of(cls, model: torch.nn.Module, param_names: Sequence[str]) -> "ModelRecord":
        from factedit.models import model_fingerprint

        params = dict(model.named_parameters())
        shapes = {name: list(params[name].shape) for name in sorted(param_names) if name in params}
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None) or type(model).__name__
        name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
        return cls(str(model_type), model_fingerprint(model), shapes, str(name) if name else None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: Any, where: str) -> "ModelRecord":
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("model_type", "fingerprint")) or not isinstance(row.get("shapes"), dict):
            raise EditError(f"{where}: field 'model' must hold model_type, fingerprint and shapes")
        name = row.get("name")  # absent from edits saved before it was recorded
        return cls(row["model_type"], row["fingerprint"], {str(k): [int(n) for n in v] for k, v in row["shapes"].items()}, name if isinstance(name, str) else None)

    def differences(self, other: "ModelRecord") -> list[str]:
        """How ``other`` (the model at hand) differs from this record, worst first."""
        found = []
        if other.model_type != self.model_type:
            found.append(f"architecture {other.model_type!r}, the edit was made for {self.model_type!r}")
        for name, shape in self.shapes.items():
            if other.shapes.get(name) != shape:
                found.append(f"parameter {name} has shape {other.shapes.get(name)}, the edit was made for {shape}")
        if not found and other.fingerprint != self.fingerprint:
            found.append(
                f"weights fingerprint {other.fingerprint}, the edit was made on {self.fingerprint} (another checkpoint "
                "or dtype, or not the edits that preceded it: apply those first, in order)"
            )
        return found


_EDIT_KINDS: dict[str, type["Edit"]] = {}


class Edit:
    """A reversible change to a model's parameters.

    ``deltas`` maps parameter names (as in ``model.named_parameters()``) to their change. Applying
    snapshots the current values of exactly those parameters and keeps a copy of what it wrote;
    reverting copies the snapshots back, so the model returns to its previous bits whatever
    rounding the addition did. A snapshot is only right while the parameter still holds what this
    edit wrote: if a later edit (or the user) changed it since, restoring would silently undo
    that change too, so revert refuses and edits are reverted in the reverse order of applying.
    ``made_for`` records the model of the first application (:class:`ModelRecord`); later
    applications (of a loaded edit, say) check against it. ``requests`` holds the texts of the
    requests the edit carries out (:meth:`EditRequest.texts`) and ``provenance`` the software
    that made it and when (:func:`editors.provenance.software`; a run adds its model and data):
    both are saved with the edit, for people to read, and change nothing it does.
    Subclasses for memory- or code-based editors override :meth:`_apply`, :meth:`_revert`,
    :meth:`_state_tensors` and :meth:`_from_state`, and register themselves with ``kind``.
    """

    kind: ClassVar[str] = "weight_delta"

    def __init__(
        self,
        editor: str,
        deltas: dict[str, ParamDelta] | None = None,
        case_ids: Sequence[str] = (),
        config: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.editor = editor
        self.deltas = dict(deltas or {})
        self.case_ids = [str(c) for c in case_ids]
        self.config = dict(config or {})
        self.info = dict(info or {})
        self.made_for: ModelRecord | None = None
        self.requests: list[dict[str, Any]] = []
        self.provenance: dict[str, Any] = {}
        self._snapshots: dict[str, torch.Tensor] = {}
        self._written: dict[str, torch.Tensor] = {}
        self._applied_to: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind in _EDIT_KINDS and _EDIT_KINDS[cls.kind] is not cls:
            raise ValueError(f"edit kind {cls.kind!r} is already registered by {_EDIT_KINDS[cls.kind].__name__}")
        _EDIT_KINDS[cls.kind] = cls

    # -- what the edit touches -----------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        return sorted(self.deltas)

    @property
    def is_applied(self) -> bool:
        return self._applied_to is not None

    def num_stored_values(self) -> int:
        return sum(t.numel() for d in self.deltas.values() for t in d.tensors().values())

    # -- apply / revert ------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module, force: bool = False) -> "Edit":
        """Add the change to ``model`` (in place). Refuses non-finite updates and double application,
        and, unless ``force``, a model other than the one the edit was made for (:class:`ModelRecord`)."""
        if self.is_applied:
            raise EditError(f"{self.editor} edit is already applied; revert it first")
        here = ModelRecord.of(model, self.param_names)
        if self.made_for is not None and not force:
            differences = self.made_for.differences(here)
            if differences:
                raise EditError(f"{self.editor} edit was made for another model: {'; '.join(differences)}. Pass force=True to apply it anyway")
        self._apply(model)
        if self.made_for is None:
            self.made_for = here
        self._applied_to = id(model)
        return self

    def revert(self, model: torch.nn.Module, force: bool = False) -> None:
        """Restore the parameters this edit changed to their exact values before :meth:`apply`.

        Refuses, touching nothing, when a parameter no longer holds what this edit wrote (a later
        edit not yet reverted, or a change by hand): its snapshot would discard that change.
        ``force`` restores the snapshots anyway, discarding it.
        """
        if not self.is_applied:
            raise EditError(f"{self.editor} edit is not applied")
        if self._applied_to != id(model):
            raise EditError(f"{self.editor} edit was applied to a different model object")
        if not force:
            self._check_unchanged(model)
        self._revert(model)
        self._applied_to = None

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module, force: bool = False) -> Iterator["Edit"]:
        """``with edit.applied(model): ...`` applies the edit for the block and reverts it after."""
        self.apply(model, force=force)
        try:
            yield self
        finally:
            self.revert(model)

    def _check_unchanged(self, model: torch.nn.Module) -> None:
        """Refuse (:class:`EditError`) to revert if any parameter changed since this edit wrote it."""
        params = dict(model.named_parameters())
        changed = [name for name, written in self._written.items() if name not in params or not same_bits(params[name], written)]
        if changed:
            raise EditError(
                f"{self.editor} edit cannot be reverted: {', '.join(changed)} changed since it was applied (by a later edit "
                "or by hand); revert later edits first, in the reverse order of applying them. Nothing was restored"
            )

    def _apply(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        missing = [n for n in self.deltas if n not in params]
        if missing:
            raise EditError(f"{self.editor} edit changes parameters the model does not have: {missing}")
        updates = {}
        for name, delta in self.deltas.items():
            param = params[name]
            dense = delta.dense(param.device).to(torch.float32)
            if dense.shape != param.shape:
                raise EditError(f"{self.editor} edit of {name}: delta shape {tuple(dense.shape)} != parameter shape {tuple(param.shape)}")
            if not torch.isfinite(dense).all():
                raise EditError(f"{self.editor} edit of {name} contains non-finite values (NaN or inf); refusing to apply it")
            updates[name] = dense
        # Only touch the model once every update has been checked.
        with torch.no_grad():
            for name, dense in updates.items():
                param = params[name]
                self._snapshots[name] = param.detach().clone()
                param.copy_((param.float() + dense).to(param.dtype))
                # What was written, kept whole: revert compares it bit for bit (a hash could miss).
                self._written[name] = param.detach().clone()

    def _revert(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, original in self._snapshots.items():
                params[name].copy_(original)
        self._snapshots, self._written = {}, {}

    # -- save / load ---------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, delta in self.deltas.items():
            for part, tensor in delta.tensors().items():
                out[f"{name}::{part}"] = tensor.detach().to("cpu").contiguous()
        return out

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "Edit":
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            name, _, part = key.rpartition("::")
            if part not in ("delta", "left", "right") or not name:
                raise EditError(f"unexpected tensor {key!r} in a weight-delta edit")
            grouped.setdefault(name, {})[part] = tensor
        deltas = {name: ParamDelta(**parts) for name, parts in grouped.items()}
        return cls(meta["editor"], deltas, meta.get("case_ids", ()), meta.get("config"), meta.get("info"))

    def save(self, directory: str | Path) -> Path:
        """Write ``edit.json`` (what, by whom, for which requests and model, by which software
        and when) and ``edit.safetensors``. Without a ``provenance`` of its own the edit records
        the software saving it."""
        from .core.provenance import software

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self._state_tensors()
        meta = {
            "format_version": EDIT_FORMAT_VERSION,
            "kind": self.kind,
            "editor": self.editor,
            "case_ids": self.case_ids,
            "config": self.config,
            "info": self.info,
            "model": self.made_for.to_dict() if self.made_for is not None else None,
            "requests": self.requests,
            "provenance": self.provenance or software(),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()},
        }
        save_file(tensors, str(directory / "edit.safetensors"))
        (directory / "edit.json").write_text(json.dumps(meta, indent=2, default=str))
        return directory

    @staticmethod
    def load(directory: str | Path) -> "Edit":
        """Read an edit written by :meth:`save`; clear errors for missing or corrupt files."""
        directory = Path(directory)
        meta_path, tensor_path = directory / "edit.json", directory / "edit.safetensors"
        for path in (meta_path, tensor_path):
            if not path.is_file():
                raise EditError(f"{path}: missing; an edit directory holds edit.json and edit.safetensors")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise EditError(f"{meta_path}: not valid JSON ({err})") from err
        if not isinstance(meta, dict) or "kind" not in meta or "editor" not in meta:
            raise EditError(f"{meta_path}: field 'kind' and 'editor' are required")
        if meta.get("format_version", 0) > EDIT_FORMAT_VERSION:
            raise EditError(f"{meta_path}: format_version {meta['format_version']} is newer than this library understands ({EDIT_FORMAT_VERSION})")
        kind = meta["kind"]
        if kind not in _EDIT_KINDS and meta["editor"] in available_editors():
            get_editor(meta["editor"])  # a method registers its kinds of edit when it is imported
        if kind not in _EDIT_KINDS:
            raise EditError(f"{meta_path}: field 'kind': unknown edit kind {kind!r}; known: {sorted(_EDIT_KINDS)}")
        try:
            tensors = load_file(str(tensor_path))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise EditError(f"{tensor_path}: cannot be read as safetensors ({err})") from err
        expected = meta.get("tensors")
        if expected is not None and set(expected) != set(tensors):
            raise EditError(f"{tensor_path}: tensors {sorted(tensors)} do not match edit.json {sorted(expected)}")
        edit = _EDIT_KINDS[kind]._from_state(meta, tensors)
        if meta.get("model") is not None:  # absent from edits saved before it was recorded
            edit.made_for = ModelRecord.from_dict(meta["model"], str(meta_path))
        requests, provenance = meta.get("requests") or [], meta.get("provenance") or {}  # likewise
        if not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests):
            raise EditError(f"{meta_path}: field 'requests' must be a list of objects")
        if not isinstance(provenance, dict):
            raise EditError(f"{meta_path}: field 'provenance' must be an object")
        edit.requests, edit.provenance = requests, provenance
        return edit

    def __repr__(self) -> str:
        state = "applied" if self.is_applied else "not applied"
        return f"{type(self).__name__}(editor={self.editor!r}, cases={len(self.case_ids)}, params={self.param_names}, {state})"


_EDIT_KINDS[Edit.kind] = Edit


def snapshot_deltas(model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> dict[str, ParamDelta]:
    """Turn parameters changed in place back into deltas, restoring their original values.

    Editors that optimise weights directly (fine-tuning) call this at the end: the model is left
    as it was found, and the returned deltas are applied through :class:`Edit` so that revert is
    exact and the editor's changes are limited to the parameters in ``originals``.
    """
    params = dict(model.named_parameters())
    deltas = {}
    with torch.no_grad():
        for name, original in originals.items():
            param = params[name]
            deltas[name] = ParamDelta(delta=(param.float() - original.float()).cpu())
            param.copy_(original)
    return deltas


# -- editors (configs in :mod:`.config`, the registry in :mod:`.registry`) --------------------


class Editor(ABC):
    """An editing method. Subclasses are registered with :func:`register_editor`.

    ``supports_batch`` says whether one call may carry several requests that are edited jointly;
    editors that cannot batch receive one request per call and say so in their docs. It edits
    through the prompt's context (``edits_in_context``: IKE), writes the fact at the subject's last
    token (``writes_at_subject``: ROME, MEMIT), or edits nothing untrained (``needs_trained_network``).

    The :class:`Edit` that a subclass's :meth:`apply` returns leaves with the texts of the
    requests it carries out (:attr:`Edit.requests`): this class records them, once for every
    editor, around each subclass's ``apply``.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[EditorConfig]]
    supports_batch: ClassVar[bool] = True
    edits_in_context: ClassVar[bool] = False
    writes_at_subject: ClassVar[bool] = False
    needs_trained_network: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        apply = cls.__dict__.get("apply")
        if callable(apply) and not getattr(apply, "__isabstractmethod__", False):
            cls.apply = _recording_requests(apply)  # type: ignore[method-assign]

    @abstractmethod
    def apply(self, model: torch.nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: EditorConfig) -> Edit:
        """Edit ``model`` in place to satisfy ``requests`` and return the (applied) :class:`Edit`."""

    # Whether apply_each computes several independent edits in less time than one apply each.
    computes_together: ClassVar[bool] = False

    def apply_each(self, model: torch.nn.Module, tokenizer: Any, units: Sequence[Sequence[EditRequest]], config: EditorConfig) -> list[Edit]:
        """One edit per unit of requests, each made as :meth:`apply` makes it on ``model`` as it is
        (not on the model carrying the other units' edits), returned unapplied; the model is left as
        it was found. Here one :meth:`apply` and revert per unit; editors that can compute several
        independent edits at once (``computes_together``: FT) override it."""
        edits = []
        for unit in units:
            edit = self.apply(model, tokenizer, unit, config)
            edit.revert(model)
            edits.append(edit)
        return edits

    def prepare(self, model: torch.nn.Module, tokenizer: Any, config: EditorConfig) -> None:
        """One-time work that depends only on the unedited model (e.g. key statistics).

        Optional: :meth:`apply` does it on first use when it was not called. A runner calls it
        before any edit, so that the work is done on the unedited model (also when a
        sequential run resumes by re-applying saved edits) and timed apart from the edits.
        """

    def read_data(self, config: EditorConfig, read_requests: Callable[[str, int | None], list[EditRequest]]) -> None:
        """Take in the records of any data file a setting of ``config`` names (IKE's demonstration
        pool). Editors never read files: the application calls this once, before :meth:`prepare`,
        with ``read_requests(path, limit)`` (``edit.py`` passes its own record reader); a library
        user does the same with :func:`factedit.datamodules.load_requests` or any other source of
        requests. Optional: the default reads nothing."""

    def data_not_read(self, setting: str, path: str) -> EditError:
        """The error for a config naming a data file (``setting``) whose records :meth:`read_data` was not given."""
        return EditError(
            f"{self.name}: {setting} {path!r} has not been read; call editor.read_data(config, read_requests) "
            "first (for example with factedit.datamodules.load_requests), as edit.py does"
        )

    def check(self, model: torch.nn.Module, config: EditorConfig) -> None:
        """Cheap checks that ``config`` fits ``model`` (modules the targets table can locate, layers
        in range), raising ``ValueError`` or ``KeyError`` with what to change. ``edit.py`` calls it
        once the model is loaded, before any case is scored or any result is written or discarded."""

    def check_requests(self, requests: Sequence[EditRequest]) -> None:
        if not requests:
            raise ValueError(f"{self.name}: no edit requests given")
        if len(requests) > 1 and not self.supports_batch:
            raise ValueError(f"{self.name} edits one request per call; got {len(requests)} (use --mode single or sequential)")


def _recording_requests(apply):
    """``apply`` that writes the texts of its requests into the edit it returns (unless an
    ``apply`` it called, a parent class's, already did)."""

    @functools.wraps(apply)
    def recording(self: Editor, model: torch.nn.Module, tokenizer: Any, requests: Sequence[EditRequest], config: EditorConfig) -> Edit:
        edit = apply(self, model, tokenizer, requests, config)
        if isinstance(edit, Edit) and not edit.requests:
            edit.requests = [request.texts() for request in requests]
        return edit

    return recording
