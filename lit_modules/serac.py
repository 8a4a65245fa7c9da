"""Training SERAC (Mitchell et al., 2022, "Memory-Based Model Editing at Scale", section 3): the
scope classifier ``g`` and the counterfactual model ``h`` are trained separately on each batch,
with the batch's edits as the memory:

    L_g = BCE(g(z_i, x), [x in scope of z_i])      x: the edit prompt and rephrase of each edit
                                                    (in scope of their own edit, out of scope of
                                                    the others) and the locality prompts (out of
                                                    scope of every edit)
    L_h = NLL(new target_i | h(z_i, x))             x: edit prompt i and rephrase i only (in scope)

    L = classifier_weight * L_g + counterfactual_weight * L_h

The classifier is scored at every position that predicts an answer token (the positions the
routed model is evaluated at), and its BCE averages positive and negative pairs separately, since
a batch of n edits has about n times more negative pairs than positive ones. The logged scores
are those of the routed model, computed by :func:`editors.serac.routed_hidden`, the code the
edit's hooks run: ``edit_success`` / ``rephrase_success`` are teacher-forced token accuracies of
the new target, ``locality`` the share of locality answer positions whose argmax is the frozen
model's.

**Calibrated scope threshold** (``scope_false_positive``; not in the paper, which routes at
in-scope probability 0.5). At the end of fitting, the best network's threshold is raised (never
lowered) until at most that share of the validation split's locality answer positions are routed,
with each validation batch's edits as the memory (as in validation). CounterFact's locality probes
are neighbourhood prompts (same relation, another subject), the inputs a scope classifier confuses
most: after 142 steps of ``configs/serac/counterfact-quick.yaml`` the learned threshold (cosine
0.794) routed 15% of 100 held-out neighbourhood prompts to their edit, and those answers turn into
the new target (NS 0.594 against 0.682 unedited on the first 200 test records); cosine 0.844 routes
4% of them and still 78% of the rephrases, while an edit prompt itself always matches its own key
(cosine 1). With the calibration, a 150-step run of that config raised its threshold from 0.805 to
0.891 on 227 held-out locality positions (routed: locality 0.471 -> 0.048, rephrases 0.961 ->
0.728, edit prompts 1.0) and scores ES 0.945, PS 0.425, NS 0.641 against 0.682 unedited on the
first 200 test records. On zsRE, whose locality probes are NQ questions, the learned threshold
already meets the bound and is kept.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from factedit.datamodules.edit_datamodule import PARTS
from factedit.editors.core.learned import answer_accuracy, answer_nll, label_positions, save_network
from factedit.editors.core.lm import unembed
from factedit.editors.serac import Bank, Job, SERACConfig, base_pass, counterfactual_states, routed_hidden
from factedit.editors.serac.editor import separator_ids

from .base import EditorModule

logger = logging.getLogger(__name__)


class SERACModule(EditorModule):
    """Args: see :class:`lit_modules.base.EditorModule`; ``lr`` is the counterfactual model's
    learning rate, ``classifier_lr`` the scope classifier's (its projection starts random);
    ``scope_false_positive`` the largest share of held-out locality positions the exported network
    may route (see the module's docstring; None: the learned threshold as is)."""

    editor_name = "serac"

    def __init__(
        self,
        model: str | nn.Module = "smollm2-135m",
        editor: SERACConfig | None = None,
        lr: float = 1.0e-4,
        classifier_lr: float = 1.0e-3,
        classifier_weight: float = 1.0,
        counterfactual_weight: float = 1.0,
        scope_false_positive: float | None = 0.05,
    ) -> None:
        super().__init__(model, editor, lr)
        if scope_false_positive is not None and not 0.0 <= scope_false_positive < 1.0:
            raise ValueError(f"scope_false_positive must be in [0, 1) or None, got {scope_false_positive}")
        self.scope_false_positive = scope_false_positive
        self.calibration: dict[str, Any] | None = None
        self.classifier_lr = classifier_lr
        self.classifier_weight = classifier_weight
        self.counterfactual_weight = counterfactual_weight
        self._separator: torch.Tensor | None = None

    def configure_optimizers(self):
        classifier = self.net.classifier_parameters()
        ids = {id(p) for p in classifier}
        counterfactual = [p for p in self.net.parameters() if id(p) not in ids]
        return torch.optim.Adam([{"params": counterfactual, "lr": self.lr}, {"params": classifier, "lr": self.classifier_lr}])

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        with torch.no_grad():  # SERAC needs no gradient to make an edit
            self._shared_step(batch, "val")

    # -- threshold calibration ------------------------------------------------------------------
    def scope_cosines(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per part, the cosine the router compares with the threshold at each answer position
        (the nearest key among the batch's edits, the memory validation uses); for the edit
        prompt and rephrase the nearest key of their own edit, the one that must win."""
        net, model = self.net, self.base
        passes = {p: base_pass(model, net, batch[p]["input_ids"], batch[p]["attention_mask"]) for p in PARTS}
        positions = {p: label_positions(batch[p]["labels"]) for p in PARTS}
        key_rows, key_cols, _ = positions["edit"]
        keys = net.embed(passes["edit"][0][key_rows, key_cols])
        out = {}
        for part in PARTS:
            rows, cols, _ = positions[part]
            cosine = net.embed(passes[part][0][rows, cols]) @ keys.T
            if part == "locality":
                out[part] = cosine.max(1).values
            else:
                own = key_rows[None, :] == rows[:, None]
                out[part] = cosine.masked_fill(~own, -2.0).max(1).values
        return out

    @torch.no_grad()
    def calibrate_threshold(self, batches: Any) -> dict[str, Any] | None:
        """Raise the scope threshold until at most ``scope_false_positive`` of the locality answer
        positions of ``batches`` are routed (a cosine strictly above the threshold is routed).
        Returns what was measured (None when there is nothing to calibrate on)."""
        if self.scope_false_positive is None:
            return None
        was_training = self.net.training
        self.net.eval()
        cosines: dict[str, list[torch.Tensor]] = {p: [] for p in PARTS}
        for batch in batches:
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            for part, values in self.scope_cosines(batch).items():
                cosines[part].append(values.float().cpu())
        self.net.train(was_training)
        if not cosines["locality"]:
            return None
        merged = {p: torch.cat(v) for p, v in cosines.items()}
        negatives = merged["locality"].sort(descending=True).values
        allowed = int(self.scope_false_positive * len(negatives))  # positions that may stay above
        learned = float(self.net.threshold)
        needed = float(negatives[allowed]) if allowed < len(negatives) else -1.0
        threshold = max(learned, needed)
        self.net.threshold.fill_(threshold)
        routed = {p: float((v > threshold).float().mean()) for p, v in merged.items()}
        before = {p: float((v > learned).float().mean()) for p, v in merged.items()}
        report = {
            "scope_false_positive": self.scope_false_positive, "learned_threshold": learned, "threshold": threshold,
            "positions": {p: len(v) for p, v in merged.items()}, "routed_before": before, "routed_after": routed,
        }
        logger.info(
            "SERAC scope threshold %.4f -> %.4f on %d held-out locality positions: routed locality %.3f -> %.3f, "
            "rephrase %.3f -> %.3f, edit prompt %.3f -> %.3f",
            learned, threshold, len(negatives), before["locality"], routed["locality"], before["rephrase"], routed["rephrase"],
            before["edit"], routed["edit"],
        )
        return report

    def finalize(self) -> None:
        """Calibrate the scope threshold on the validation split (see the module's docstring)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        batches = None
        if datamodule is not None and getattr(datamodule, "val_dataset", None) is not None and len(datamodule.val_dataset):
            batches = datamodule.val_dataloader()
        elif self.trainer.val_dataloaders is not None:
            batches = self.trainer.val_dataloaders
        self.calibration = self.calibrate_threshold(batches) if batches is not None else None

    def export(self, directory):
        if self.calibration is None:
            return super().export(directory)
        return save_network(self.net, directory, self.editor_name, self.config, self.signature(), {"scope_calibration": self.calibration})

    def separator(self, device: torch.device) -> torch.Tensor:
        if self._separator is None:
            self._separator = torch.tensor(separator_ids(self.tokenizer, self.config.separator), dtype=torch.long)
        return self._separator.to(device)

    def scope_pairs(
        self, passes: Mapping[str, tuple[torch.Tensor, torch.Tensor]], positions: Mapping[str, tuple[torch.Tensor, ...]], keys: torch.Tensor, key_rows: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The scope classifier's training pairs: for each answer position of each part (rows) and
        each of the batch's ``n`` edits (columns), the in-scope logit (best key of that edit) and
        its label. A position is in scope of its own edit only: the other edits' prompts and
        rephrases (questions of the same distribution, often of the same relation) and the
        locality prompts (NQ questions for zsRE, neighbourhood prompts of the same relation for
        CounterFact) are its negatives. Also returns the part of each row."""
        logits, labels, parts = [], [], []
        for part in PARTS:
            rows, cols, _ = positions[part]
            cosine = self.net.embed(passes[part][0][rows, cols]) @ keys.T
            per_edit = cosine.new_full((len(rows), n), -2.0).scatter_reduce(1, key_rows.expand(len(rows), -1), cosine, "amax")
            logits.append(self.net.in_scope_logit(per_edit))
            labels.append(F.one_hot(rows, n).float() if part != "locality" else torch.zeros_like(per_edit))
            parts += [part] * len(rows)
        return torch.cat(logits), torch.cat(labels), parts

    def step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        n = len(batch["case_id"])
        net, model = self.net, self.base
        with torch.no_grad():
            passes = {p: base_pass(model, net, batch[p]["input_ids"], batch[p]["attention_mask"]) for p in PARTS}
        positions = {p: label_positions(batch[p]["labels"]) for p in PARTS}
        real = {p: batch[p]["attention_mask"].bool() for p in PARTS}

        # The memory: edit i is its text (prompt + new target) and one key per position of the
        # text that predicts a target token, as EditMemory.add stores it.
        edit_ids = batch["edit"]["input_ids"]
        key_rows, key_cols, _ = positions["edit"]
        keys = net.embed(passes["edit"][0][key_rows, key_cols])
        separator = self.separator(edit_ids.device)
        bank = Bank([torch.cat([edit_ids[i][real["edit"][i]], separator]) for i in range(n)], keys, key_rows)

        # Scope classifier: every answer position of every part against every edit (best key).
        logits, labels, _ = self.scope_pairs(passes, positions, keys, key_rows, n)
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
        positive = labels.bool()
        classifier_loss = bce[positive].mean() + bce[~positive].mean()

        # Counterfactual model: the new target given the right edit, on in-scope inputs only.
        counterfactual_loss = torch.zeros((), device=keys.device)
        for part in ("edit", "rephrase"):
            rows, cols, targets = positions[part]
            rank = batch[part]["attention_mask"].long().cumsum(1) - 1
            jobs = [Job(bank.prefixes[i], batch[part]["input_ids"][i][real[part][i]], rank[i, cols[rows == i]]) for i in range(n)]
            states = torch.cat(counterfactual_states(net, model, jobs)).to(passes[part][1].dtype)
            counterfactual_loss = counterfactual_loss + answer_nll(unembed(model, states), targets, rows, n).mean() / 2

        # Scores of the routed model (the hooks' code), memory = this batch's edits.
        scores = {}
        with torch.no_grad():
            frozen = bank.detach()
            for part in PARTS:
                features, hidden = passes[part]
                routed, _ = routed_hidden(net, model, frozen, hidden, features, batch[part]["input_ids"], batch[part]["attention_mask"])
                rows, cols, targets = positions[part]
                after = unembed(model, routed[rows, cols])
                if part == "locality":
                    targets = unembed(model, hidden[rows, cols]).argmax(-1)
                scores[part] = answer_accuracy(after, targets, rows, n)

        return {
            "loss": self.classifier_weight * classifier_loss + self.counterfactual_weight * counterfactual_loss,
            "loss_classifier": classifier_loss,
            "loss_counterfactual": counterfactual_loss,
            "edit_success": scores["edit"],
            "rephrase_success": scores["rephrase"],
            "locality": scores["locality"],
        }
