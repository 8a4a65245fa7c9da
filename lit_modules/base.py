"""The training loop every learned editor shares.

A LightningModule here holds three things: the frozen model being edited (``self.base``, never
saved in checkpoints), the editor's network (``self.net``, the only trained parameters), and the
step. The network is built by the editor class itself (``editor.build_network``), so what is
trained is exactly what ``edit.py --editor NAME --editor.checkpoint PATH`` applies.

Batches come from :class:`datamodules.EditDataModule`: three teacher-forced parts, ``edit``
(prompt + new target), ``rephrase`` (a paraphrase + new target) and ``locality`` (an unrelated
prompt + its answer). Logged per stage (``train/...``, ``val/...``), each a torchmetrics
``MeanMetric`` over edits:

* ``edit_success``: teacher-forced token accuracy of the new target on the edit prompt after the edit;
* ``rephrase_success``: the same on the rephrase;
* ``locality``: share of locality answer positions whose argmax the edit left unchanged
  (``drawdown`` = 1 - locality);
* ``score``: the mean of the three above, one number to select the best network by;
* ``loss`` and its parts.

At the end of fitting the network is exported as ``editor.safetensors`` + ``editor.json`` into
``editor/`` beside the checkpoints folder (see :meth:`EditorModule.export_dir`), which is what
``--editor.checkpoint`` reads. When the trainer's ``ModelCheckpoint`` monitors a metric (the
configs monitor ``val/score``), the exported network is its best checkpoint, not the last step's;
the module then holds that network too. A Lightning ``.ckpt`` works as ``--editor.checkpoint``
as well: it is read with ``weights_only=True`` and carries the same metadata.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from factedit.datamodules.edit_datamodule import BATCH_PARTS
from factedit.editors import get_editor
from factedit.editors.core.learned import LearnedConfig, answer_accuracy, answer_logits, answer_nll, edited_params, gradient_pieces, model_signature, network_meta, read_checkpoint, save_network

logger = logging.getLogger(__name__)

STAGES = ("train", "val")
METRICS = ("loss", "edit_success", "rephrase_success", "locality", "drawdown", "score")
PER_EDIT = ("edit_success", "rephrase_success", "locality")  # one value per edit; the rest are means
EDITS_PER_STEP = ("single", "batch")


class EditorModule(LightningModule):
    """Base LightningModule: owns the frozen model, the network and the metrics.

    Args:
        model: the model to edit: a bundled name, hub id or local path (loaded in
            ``configure_model``), or an ``nn.Module`` (tests pass tiny models).
        lr: the network's Adam learning rate.
        editor_name: the registered editor whose network is trained (set by subclasses).
        editor: that editor's config (its architecture fields define the network).
        export_dir: where the trained network is written at the end of fitting; None: ``editor/``
            beside the checkpoints folder (see :meth:`export_dir`).
    """

    editor_name: str = ""

    def __init__(
        self, model: str | nn.Module = "smollm2-135m", editor: LearnedConfig | None = None, lr: float = 1.0e-4, export_dir: str | None = None
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else [])
        self.model_spec = model if isinstance(model, str) else None
        self.base: nn.Module | None = model if isinstance(model, nn.Module) else None
        config_class = get_editor(self.editor_name).config_class
        # Checkpoints store the config as a plain dict (loadable with weights_only=True).
        self.config = config_class(**editor) if isinstance(editor, dict) else editor if editor is not None else config_class()
        self.lr = lr
        self.export_to = export_dir
        self.editor = get_editor(self.editor_name)()
        self.net: nn.Module | None = None
        # (keys "train"/"val" would clash with nn.Module.train)
        self.metrics = nn.ModuleDict({f"{stage}_metrics": MetricCollection({m: MeanMetric() for m in METRICS}, prefix=f"{stage}/") for stage in STAGES})
        # Checkpoints hold the network and the training state, not the frozen model.
        self.strict_loading = False
        if self.base is not None:
            self._freeze_base()

    # -- building ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The datamodule's tokenizer when training, else the one loaded with the model (or None)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "tokenizer"):
            return datamodule.tokenizer
        return self._tokenizer

    _tokenizer: Any = None

    def configure_model(self) -> None:
        """Load the frozen model (when given by name) and build the network, once."""
        if self.base is None:
            from factedit.models import load_model

            self.base, self._tokenizer = load_model(self.model_spec, device="cpu")
            self._freeze_base()
        if self.net is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                self.net = self.editor.build_network(self.base, self.tokenizer, self.config)

    def setup(self, stage: str) -> None:
        self.configure_model()

    def _freeze_base(self) -> None:
        self.base.eval()
        self.base.requires_grad_(False)

    def train(self, mode: bool = True) -> "EditorModule":
        super().train(mode)
        if self.base is not None:
            self.base.eval()  # the edited model never runs dropout
        return self

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)

    # -- checkpoints ------------------------------------------------------------------------------
    def signature(self) -> dict[str, Any]:
        return model_signature(self.base, self.editor.network_modules(self.base, self.config))


    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("base.")}
        checkpoint["factedit"] = network_meta(self.editor_name, self.config, self.signature())
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict) and "editor" in hparams:
            hparams["editor"] = self.config.to_dict()  # no pickled classes in the checkpoint

    def export(self, directory: str | Path) -> Path:
        """Write the trained network where ``--editor.checkpoint`` can read it."""
        return save_network(self.net, directory, self.editor_name, self.config, self.signature())

    def export_dir(self) -> Path:
        """The ``export_dir`` argument, else ``editor/`` beside the checkpoints folder (stable
        across resumed runs), else in the log folder, else in the trainer's root folder."""
        if self.export_to is not None:
            return Path(self.export_to)
        callback = self.trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath).parent / "editor"
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "editor"

    def best_checkpoint(self) -> Path | None:
        """The best checkpoint of the first ``ModelCheckpoint`` that monitors a metric (None
        without one, or before it has saved anything)."""
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "monitor", None) is not None:
                path = getattr(callback, "best_model_path", "")
                if path:
                    logger.info("best %s network: %s = %s, %s", self.editor_name, callback.monitor, callback.best_model_score, path)
                return Path(path) if path else None
        return None

    def load_best(self) -> Path | None:
        """Put the best checkpoint's network into ``self.net``; returns its path (None: kept as is)."""
        best = self.best_checkpoint()
        if best is not None:
            tensors, _, _ = read_checkpoint(best)
            self.net.load_state_dict(tensors)
        return best

    def finalize(self) -> None:
        """Adjust the best network before it is exported (the default does nothing)."""

    def on_fit_end(self) -> None:
        if self.trainer.fast_dev_run:
            return
        self.load_best()
        self.finalize()
        directory = self.export_dir()  # on every process: trainer.log_dir is a collective call
        if self.trainer.is_global_zero:
            path = self.export(directory)
            logger.info("trained %s network written to %s", self.editor_name, path)

    # -- steps ------------------------------------------------------------------------------------
    @abstractmethod
    def step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Losses and per-edit scores of one batch: ``loss`` (scalar, differentiable), and
        ``edit_success``, ``rephrase_success``, ``locality`` (one value per edit), plus any
        ``loss_*`` parts to log."""

    def _shared_step(self, batch: Mapping[str, Any], stage: str) -> torch.Tensor:
        out = self.step(batch)
        size = len(batch["case_id"])
        metrics = self.metrics[f"{stage}_metrics"]
        # Called (not .update()) so that each step's value is logged too, not only the epoch's.
        metrics["loss"](out["loss"].detach())
        for name in PER_EDIT:
            metrics[name](out[name].detach())
        metrics["drawdown"](1 - out["locality"].detach())
        metrics["score"](torch.stack([out[name].detach() for name in PER_EDIT]).mean(0))
        self.log_dict(metrics, on_step=stage == "train", on_epoch=True, prog_bar=stage == "val", batch_size=size)
        for name, value in out.items():
            if name.startswith("loss_"):
                self.log(f"{stage}/{name}", value.detach(), on_step=stage == "train", on_epoch=True, batch_size=size)
        return out["loss"]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        with torch.enable_grad():  # weight editors differentiate the edit loss to make the edit
            self._shared_step(batch, "val")


def single_request(batch: Mapping[str, Any], row: int) -> dict[str, Any]:
    """Request ``row`` of a batch as a batch of one, without its padding (padding is on the right)."""
    out: dict[str, Any] = {"case_id": [batch["case_id"][row]]}
    for part in (part for part in BATCH_PARTS if part in batch):
        width = int(batch[part]["attention_mask"][row].sum())
        out[part] = {key: value[row : row + 1, :width] for key, value in batch[part].items()}
    return out


class WeightEditModule(EditorModule):
    """Training of editors whose network turns an edit into weight updates (MEND, KE).

    The step: the network makes updates from the ``edit`` part; the edited weights are used
    functionally (``torch.func.functional_call``: the model is never modified, and gradients
    reach the network through the updates); the loss is

        edit_weight * NLL(new target | rephrase, edited) + locality_weight * KL(base || edited on locality)

    with the KL taken over the locality answer positions (MEND, eq. 4-5, with the rephrase as
    the edit-generalisation input). ``edit_parts`` names the parts whose NLL is the edit loss
    (their mean; a class default, or the ``edit_parts`` argument); success is reported for both.
    ``contrast_weight`` (default 0: off) adds :meth:`contrast_loss`, which keeps the locality
    answer's lead over the edit's new target on the locality prompt (CounterFact's NS).
    Subclasses implement :meth:`updates` and may override :meth:`combine` and ``edit_parts``.

    ``edits_per_step`` says what one inner update holds:

    * ``"single"`` (the default): each request of the batch gets its own update from the unedited
      weights and is scored alone, and the losses are averaged over the batch: the single edits
      ``edit.py`` makes, so ``val/*`` are single-edit numbers. (MEND's reference code likewise
      trains with one edit per update, ``n_edits: 1``.)
    * ``"batch"``: the batch's edits are summed into one update and scored together, for editors
      meant to apply many edits in one call (``edit.py``'s batch mode).
    """

    edit_parts: tuple[str, ...] = ("rephrase",)

    def __init__(
        self,
        model: str | nn.Module = "smollm2-135m",
        editor: LearnedConfig | None = None,
        lr: float = 1.0e-4,
        edit_weight: float = 1.0,
        locality_weight: float = 1.0,
        edits_per_step: str = "single",
        export_dir: str | None = None,
        warmup_edits: int = 0,
        edit_parts: Sequence[str] | None = None,
        contrast_weight: float = 0.0,
    ) -> None:
        super().__init__(model, editor, lr, export_dir)
        if not contrast_weight >= 0:
            raise ValueError(f"contrast_weight must be non-negative, got {contrast_weight}")
        self.contrast_weight = contrast_weight
        if edits_per_step not in EDITS_PER_STEP:
            raise ValueError(f"edits_per_step must be one of {EDITS_PER_STEP}, got {edits_per_step!r}")
        if edit_parts is not None:
            if not edit_parts or not set(edit_parts) <= {"edit", "rephrase"}:
                raise ValueError(f"edit_parts must name one or both of 'edit' and 'rephrase', got {list(edit_parts)!r}")
            self.edit_parts = tuple(edit_parts)
        if warmup_edits < 0:
            raise ValueError(f"warmup_edits must be non-negative, got {warmup_edits}")
        self.edit_weight = edit_weight
        self.locality_weight = locality_weight
        self.edits_per_step = edits_per_step
        self.warmup_edits = warmup_edits

    # -- statistics warm-up (networks that standardise the gradient's factors: MEND, KE) ---------
    def on_fit_start(self) -> None:
        # A resumed run has its statistics back from the checkpoint already.
        if self.warmup_edits > 0 and hasattr(self.net, "observe") and self.net.observed() == 0:
            self.warm_up()

    @torch.no_grad()
    def warm_up(self) -> int:
        """Gather the network's factor statistics (``net.observe``) on the first ``warmup_edits``
        training edits, in the training order, before the first step; returns how many edits were
        seen. With ``--trainer.max_steps 0`` this is all a run does, and the exported network is
        the untrained, warmed baseline the trained one is compared with."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_dataloader"):
            logger.warning("no datamodule to warm up %s's statistics from; they are gathered during training only", self.editor_name)
            return 0
        seen = 0
        for batch in datamodule.train_dataloader():
            take = min(len(batch["case_id"]), self.warmup_edits - seen)
            edit = {key: value[:take].to(self.device) for key, value in batch["edit"].items()}
            _, pieces = gradient_pieces(self.base, edit, self.net.module_names)
            self.net.observe(pieces)
            seen += take
            if seen >= self.warmup_edits:
                break
        logger.info("%s statistics warmed up on %d training edits (%d tokens per module)", self.editor_name, seen, self.net.observed())
        return seen

    @abstractmethod
    def updates(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{module name: update [out, in]}`` for the batch's edits, differentiable in the network."""

    def combine(self, edit_loss: torch.Tensor, locality_kl: torch.Tensor) -> torch.Tensor:
        return self.edit_weight * edit_loss + self.locality_weight * locality_kl

    def step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.edits_per_step == "batch":
            out = self.edit_losses(batch)
        else:
            singles = [self.edit_losses(single_request(batch, row)) for row in range(len(batch["case_id"]))]
            out = {
                name: torch.cat([single[name] for single in singles]) if name in PER_EDIT else torch.stack([single[name] for single in singles]).mean()
                for name in singles[0]
            }
        out["loss"] = self.combine(out["loss_edit"], out["loss_locality"])
        if self.contrast_weight:
            out["loss"] = out["loss"] + self.contrast_weight * out["loss_contrast"]
        return out

    def edit_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One update made from all of ``batch``'s edits, and its scores: per-edit successes and
        locality, the mean edit NLL (``loss_edit``, per part ``loss_edit_<part>``) and the
        locality KL (``loss_locality``)."""
        n = len(batch["case_id"])
        params = edited_params(self.base, self.updates(batch))
        out: dict[str, torch.Tensor] = {}
        losses = []
        for part in ("edit", "rephrase"):
            trained = part in self.edit_parts
            with torch.set_grad_enabled(trained and torch.is_grad_enabled()):
                logits, targets, rows = answer_logits(self.base, batch[part], params if trained else {k: v.detach() for k, v in params.items()})
            out[f"{part}_success"] = answer_accuracy(logits.detach(), targets, rows, n)
            if trained:
                losses.append(answer_nll(logits, targets, rows, n).mean())
                out[f"loss_edit_{part}"] = losses[-1]
        loc = batch["locality"]
        with torch.no_grad():
            before, loc_targets, loc_rows = answer_logits(self.base, loc)
        after, _, _ = answer_logits(self.base, loc, params)
        kl = F.kl_div(F.log_softmax(after.float(), -1), F.log_softmax(before.float(), -1), log_target=True, reduction="batchmean")
        out.update(loss_edit=torch.stack(losses).mean(), loss_locality=kl, locality=answer_accuracy(after.detach(), before.argmax(-1), loc_rows, n))
        if self.contrast_weight:
            out["loss_contrast"] = self.contrast_loss(batch["contrast"], params, answer_nll(before, loc_targets, loc_rows, n), answer_nll(after, loc_targets, loc_rows, n))
        return out

    def contrast_loss(self, contrast: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], answer_before: torch.Tensor, answer_after: torch.Tensor) -> torch.Tensor:
        """How much the edit narrowed, on the locality prompt, the lead of its own answer over the
        edit's new target: ``relu(margin_before - margin_after)`` with ``margin = NLL(new target) -
        NLL(locality answer)`` (mean token NLLs), averaged over the edits.

        The KL on the locality answer barely sees the new target's probability rise (from e^-9 to
        e^-4 moves about 2% of the mass), yet that rise is what CounterFact's neighbourhood score
        NS counts: there the locality prompt is a neighbour of the subject and NS asks whether
        ``P(true) > P(new)`` still holds. This term asks for that margin directly (a deviation
        from MEND's loss, off unless ``contrast_weight`` is set)."""
        n = answer_before.shape[0]
        with torch.no_grad():
            new_before, new_targets, new_rows = answer_logits(self.base, contrast)
            margin_before = answer_nll(new_before, new_targets, new_rows, n) - answer_before
        new_after, _, _ = answer_logits(self.base, contrast, params)
        margin_after = answer_nll(new_after, new_targets, new_rows, n) - answer_after
        return torch.relu(margin_before - margin_after).mean()

