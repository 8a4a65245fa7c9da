"""What learned editors (MEND, KE, SERAC) share: their checkpoint files, the modules they edit,
the fine-tuning gradient in rank-one pieces, and forward passes with edited weights.

A learned editor is a plain ``nn.Module`` (its *network*) built from the model it edits and its
config, trained by a LightningModule in :mod:`lit_modules`, and applied through the ordinary
:class:`~editors.base.Editor` contract. Its config names a checkpoint; without one the editor
runs with the untrained network (seeded), which is the baseline training has to beat.

Checkpoints are read without unpickling anything: the network exported by training
(``editor.safetensors`` + ``editor.json``), a bare ``.safetensors`` file, or a Lightning ``.ckpt``
opened with ``torch.load(weights_only=True)``, from which only the network's tensors are taken.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from factedit.batches import IGNORE_INDEX, labelled_batch, pad_id, teacher_forced

from ..base import EditError, EditRequest
from ..config import LearnedConfig  # defined with the other configs, importable without torch
from .lm import encode_pair, hidden_states, model_device, unembed
from .targets import delta_to_param_layout, get_module, get_targets, resolve_layer, weight_as_out_in

logger = logging.getLogger(__name__)

NETWORK_FILE = "editor.safetensors"
META_FILE = "editor.json"
NETWORK_PREFIX = "net."  # the network's attribute name in the LightningModules
CHECKPOINT_FORMAT_VERSION = 1


class CheckpointError(EditError):
    """A learned editor's checkpoint is missing, corrupt, or was trained for something else."""


# --------------------------------------------------------------------------------------------
# Which modules a learned editor changes
# --------------------------------------------------------------------------------------------


def edited_modules(model: nn.Module, roles: Sequence[str], layers: Sequence[int], overrides: Mapping[str, str] | None = None) -> list[str]:
    """Module names for ``roles`` in ``layers`` (negative indices count from the top).

    Roles the architecture does not have (``mlp_gate`` in GPT-2) are skipped; a role none of the
    layers has, or a layer out of range, is an error.
    """
    targets = get_targets(model, overrides)
    names = []
    for layer in layers:
        index = resolve_layer(model, targets, layer)
        for role in roles:
            if getattr(targets, role, None) is None:
                if not hasattr(targets, role):
                    raise ValueError(f"unknown module role {role!r}; roles: mlp_in, mlp_gate, mlp_out, attn_out, ...")
                continue
            names.append(targets.layer(role, index))
    if not names:
        raise ValueError(f"none of the roles {list(roles)} exists in this architecture")
    return names


def module_shape(model: nn.Module, name: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear (or GPT-2 Conv1D) module."""
    out_features, in_features = weight_as_out_in(get_module(model, name)).shape
    return int(out_features), int(in_features)


def model_signature(model: nn.Module, modules: Sequence[str]) -> dict[str, Any]:
    """What a checkpoint must match: the architecture and the shapes of the edited modules."""
    return {
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "hidden_size": int(model.get_input_embeddings().weight.shape[1]),
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
        "modules": {name: list(module_shape(model, name)) for name in modules},
    }


# --------------------------------------------------------------------------------------------
# Teacher-forced batches and the fine-tuning gradient in rank-one pieces
# --------------------------------------------------------------------------------------------


def pair_batch(tokenizer, pairs: Sequence[tuple[str, str]], device: torch.device | str, max_length: int = 128) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` for (prompt, target) pairs, with
    labels ``-100`` outside the target: the layout of :mod:`datamodules.edit_datamodule`."""
    rows = [teacher_forced(*encode_pair(tokenizer, prompt, target), max_length) for prompt, target in pairs]
    return labelled_batch(rows, pad_id(tokenizer), device)


def request_batches(tokenizer, requests: Sequence[EditRequest], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The edit part of a training batch, built from requests at edit time."""
    return pair_batch(tokenizer, [(r.prompt, r.target_new) for r in requests], device)


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, targets)``: position ``cols`` of row ``rows`` predicts token ``targets``."""
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    return rows, cols, labels[rows, cols + 1]


def answer_logits(model: nn.Module, part: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict answer tokens, optionally with some parameters replaced.

    ``params`` maps parameter names to tensors used in place of the model's own for this call
    (``torch.func.functional_call``), so edited weights can carry gradients to the network that
    produced them while the model itself is never modified.
    Returns ``(logits [n_answer_tokens, vocab], targets [n], rows [n])``.
    """
    rows, cols, targets = label_positions(part["labels"])
    if params:
        body = _functional_body(model, params)
        hidden = body(input_ids=part["input_ids"], attention_mask=part["attention_mask"])
    else:
        hidden = hidden_states(model, part["input_ids"], part["attention_mask"])
    return unembed(model, hidden[rows, cols]), targets, rows


def _functional_body(model: nn.Module, params: Mapping[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    body = model.base_model
    prefix = model.base_model_prefix + "." if getattr(model, "base_model_prefix", "") and body is not model else ""
    local = {name[len(prefix) :] if prefix and name.startswith(prefix) else name: value for name, value in params.items()}

    def run(**inputs: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(body, local, args=(), kwargs={**inputs, "use_cache": False}, strict=False)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    return run


def answer_nll(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row NLL of the answer, averaged over its tokens ``[n_rows]``."""
    token = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    total = torch.zeros(n_rows, device=token.device).index_add(0, rows, token)
    count = torch.zeros(n_rows, device=token.device).index_add(0, rows, torch.ones_like(token))
    return total / count.clamp_min(1)


def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row teacher-forced token accuracy ``[n_rows]`` (the token protocol's reliability)."""
    hit = (logits.argmax(-1) == targets).float()
    total = torch.zeros(n_rows, device=hit.device).index_add(0, rows, hit)
    count = torch.zeros(n_rows, device=hit.device).index_add(0, rows, torch.ones_like(hit))
    return total / count.clamp_min(1)


@dataclass
class GradientPieces:
    """The fine-tuning gradient of one linear module as rank-one pieces (MEND, section 3.1):
    ``dL/dW = sum_i grads[i]^T inputs[i]`` in ``[out, in]`` layout, one piece per real token."""

    inputs: torch.Tensor  # [n_tokens, in_features]  (u in MEND)
    grads: torch.Tensor  # [n_tokens, out_features] (delta in MEND)

    def dense(self) -> torch.Tensor:
        return self.grads.T @ self.inputs


def gradient_pieces(model: nn.Module, batch: Mapping[str, torch.Tensor], modules: Sequence[str]) -> tuple[torch.Tensor, dict[str, GradientPieces]]:
    """The edit loss (mean answer NLL over the batch) and, at each module, in pieces, the gradient
    of the *sum* over the batch's edits of each edit's answer NLL: every edit contributes its own
    gradient, as large as when it is edited alone, so a network trained on batches of edits sees
    the same inputs when it edits one request at a time.

    Each module's input and the gradient of the loss with respect to its output are recorded at
    every non-padding position. The model's parameters need not require gradients: the token
    embeddings are made a leaf that does, so autograd reaches every edited module's output along
    all paths (later edited modules included); ``autograd.grad`` stops at the lowest of them.
    The pieces are detached: they are data for the editor's network, as in MEND.
    """
    handles, seen_inputs, seen_outputs = [], {}, {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen_inputs[name] = args[0]
            seen_outputs[name] = output

        return hook

    def lift(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    try:
        handles.append(model.get_input_embeddings().register_forward_hook(lift))
        for name in modules:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        with torch.enable_grad():
            logits, targets, rows = answer_logits(model, batch)
            per_edit = answer_nll(logits, targets, rows, batch["input_ids"].shape[0])
            outputs = [seen_outputs[name] for name in modules]
            grads = torch.autograd.grad(per_edit.sum(), outputs, allow_unused=True)
            loss = per_edit.mean()
    finally:
        for handle in handles:
            handle.remove()
    mask = batch["attention_mask"].bool()
    pieces = {}
    for name, grad in zip(modules, grads):
        inp = seen_inputs[name].detach()
        grad = torch.zeros_like(seen_outputs[name]) if grad is None else grad.detach()
        pieces[name] = GradientPieces(inputs=inp[mask], grads=grad[mask])
    return loss.detach(), pieces


def edited_params(model: nn.Module, updates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module.weight: W + update}`` for :func:`answer_logits`; updates are ``[out, in]``."""
    params = dict(model.named_parameters())
    return {f"{m}.weight": params[f"{m}.weight"] + delta_to_param_layout(get_module(model, m), u).to(params[f"{m}.weight"].dtype) for m, u in updates.items()}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def network_meta(editor: str, config: LearnedConfig, signature: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records about its network (checked by :func:`load_network`)."""
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "editor": editor,
        "architecture": config.architecture(),
        "config": config.to_dict(),
        "model": dict(signature),
    }


def save_network(network: nn.Module, directory: str | Path, editor: str, config: LearnedConfig, signature: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``editor.safetensors`` (the network's tensors) and ``editor.json`` (what it is for)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    meta = {**network_meta(editor, config, signature), **dict(extra or {})}
    tmp = directory / (NETWORK_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"factedit": json.dumps(meta)})
    tmp.replace(directory / NETWORK_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return directory


def other_checkpoints(path: str | Path) -> list[Path]:
    """The other Lightning checkpoints (``*.ckpt``) in ``path``'s folder, newest first: where a
    run whose checkpoint is unreadable (say, killed while writing ``last.ckpt``) can go back to."""
    path = Path(path)
    found = [p for p in path.parent.glob("*.ckpt") if p.is_file() and p.name != path.name]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def unreadable_checkpoint(path: str | Path, err: BaseException, option: str) -> str:
    """The message for a checkpoint that cannot be read: the file, the cause, and what to pass
    to ``option`` instead."""
    others = other_checkpoints(path)
    if others:
        advice = f"pass another with {option}, e.g. {option} {others[0]} (others in its folder, newest first: {', '.join(p.name for p in others)})"
    else:
        advice = f"no other checkpoint is in {Path(path).parent}; start afresh without {option}"
    return f"{path}: cannot be read as a Lightning checkpoint ({type(err).__name__}: {err}); it may be truncated or corrupt. To go on, {advice}"


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Path]:
    """The network's tensors and metadata from any accepted checkpoint form, without unpickling."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / NETWORK_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (a folder holding {NETWORK_FILE}, a .safetensors file or a Lightning .ckpt)")
    if path.suffix == ".ckpt":
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt files and pickled objects both land here
            raise CheckpointError(unreadable_checkpoint(path, err, "--editor.checkpoint") + " (only weights_only=True checkpoints are read)") from err
        state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: field 'state_dict' is missing; not a Lightning checkpoint")
        tensors = {k[len(NETWORK_PREFIX) :]: v for k, v in state.items() if k.startswith(NETWORK_PREFIX)}
        if not tensors:
            raise CheckpointError(f"{path}: field 'state_dict' holds no '{NETWORK_PREFIX}*' tensors; not a learned editor's checkpoint")
        meta = ckpt.get("factedit") if isinstance(ckpt.get("factedit"), dict) else None
        return tensors, meta, path
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            raw = (handle.metadata() or {}).get("factedit")
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({err})") from err
    meta = None
    if raw is not None:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: its 'factedit' metadata is not valid JSON ({err})") from err
    return tensors, meta, path


def load_network(network: nn.Module, path: str | Path, editor: str, config: LearnedConfig, signature: Mapping[str, Any]) -> dict[str, Any] | None:
    """Load a checkpoint into ``network`` after checking it was trained for this editor and model."""
    tensors, meta, path = read_checkpoint(path)
    if meta is not None:
        if meta.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {meta['format_version']} is newer than this library understands")
        if meta.get("editor") != editor:
            raise CheckpointError(f"{path}: field 'editor': trained for {meta.get('editor')!r}, not {editor!r}")
        trained = meta.get("architecture", {})
        wanted = config.architecture()
        differ = {k: (trained.get(k), wanted[k]) for k in wanted if _normal(trained.get(k)) != _normal(wanted[k])}
        if differ:
            detail = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in differ.items())
            raise CheckpointError(f"{path}: field 'architecture' differs from the editor's settings ({detail}); set them as trained")
        model = meta.get("model", {})
        for key in ("model_type", "hidden_size", "vocab_size", "modules"):
            if key in model and _normal(model[key]) != _normal(signature[key]):
                raise CheckpointError(f"{path}: field 'model.{key}': trained for {model[key]!r}, this model has {signature[key]!r}")
    own = network.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the network (missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the network expects {tuple(own[key].shape)}")
    network.load_state_dict(tensors)
    logger.info("loaded %s network from %s", editor, path)
    return meta


def _normal(value: Any) -> Any:
    """JSON round trip, so tuples and lists (and ints in keys) compare equal."""
    return json.loads(json.dumps(value, default=str))


class LearnedEditorMixin:
    """Builds (once per model object) an editor's network and loads its checkpoint.

    Subclasses implement ``build_network(model, tokenizer, config) -> nn.Module`` and
    ``network_modules(model, config) -> list[str]`` (the module names in the signature).
    """

    def __init__(self) -> None:
        self._networks: dict[tuple[int, str], nn.Module] = {}

    def network(self, model: nn.Module, tokenizer: Any, config: LearnedConfig) -> nn.Module:
        key = (id(model), json.dumps(config.to_dict(), sort_keys=True, default=str))
        if key not in self._networks:
            with torch.random.fork_rng(devices=[]):  # reproducible init, global RNG untouched
                torch.manual_seed(config.seed)
                net = self.build_network(model, tokenizer, config)
            net.to(model_device(model))
            if config.checkpoint:
                load_network(net, config.checkpoint, self.name, config, model_signature(model, self.network_modules(model, config)))
            net.eval()
            net.requires_grad_(False)
            self._networks = {key: net}  # one model at a time: drop networks built for others
        return self._networks[key]

    def prepare(self, model: nn.Module, tokenizer: Any, config: LearnedConfig) -> None:
        self.network(model, tokenizer, config)
