"""Tiny training runs for the learned editors' tests: six facts of the tokenizer's corpus as a
datamodule, a quiet Lightning trainer, and SERAC trained for a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from factedit.datamodules import EditDataModule
from factedit.editors.serac import SERACConfig
from factedit.lit_modules.serac import SERACModule

SERAC_TINY = dict(classifier_layer=1, embedding_dim=16, cf_layers=2)
"""SERAC settings small enough to train on a tiny model in seconds."""


FACTS = [  # (subject, prompt, rephrase, new target, locality prompt, its answer): tokenizer-corpus words
    ("Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "Danielle Darrieux speaks", "English", "The capital of Italy is", "Rome"),
    ("France", "The capital of France is", "France has the capital", "Rome", "Angola is located in", "Africa"),
    ("Eiffel Tower", "The Eiffel Tower is located in the city of", "The Eiffel Tower is in", "Africa", "The capital of France is", "Paris"),
    ("Toko Yasuda", "Toko Yasuda plays the", "Toko Yasuda is playing the", "French", "Michel Rocard speaks", "French"),
    ("Angola", "Angola is located in", "Angola is a country in", "Antarctica", "The mother tongue of Danielle Darrieux is", "French"),
    ("Michel Rocard", "Michel Rocard speaks", "The mother tongue of Michel Rocard is", "Paris", "Antarctica is a", "continent"),
]


def facts_datamodule(tmp_path: Path, tokenizer, batch_size: int, val_fraction: float) -> EditDataModule:
    records = [
        {"subject": s, "src": p, "rephrase": r, "alt": a, "answers": ["old"], "loc": lp, "loc_ans": la}
        for s, p, r, a, lp, la in FACTS
    ]
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(records))
    return EditDataModule(str(path), tokenizer=tokenizer, batch_size=batch_size, val_fraction=val_fraction, seed=0)


def quiet_trainer(tmp_path: Path, **kwargs) -> Trainer:
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return Trainer(accelerator="cpu", default_root_dir=tmp_path, **quiet, **kwargs)


def train_serac(model, tokenizer, requests, root: Path, epochs: int = 40) -> tuple[SERACModule, Path]:
    """Train SERAC with SERAC_TINY settings on ``requests`` for a few seconds; the module and the
    exported checkpoint. (Shared editor checks can use it: untrained SERAC cannot make a random
    model predict a target.)"""
    records = [
        {"subject": r.subject, "src": r.prompt, "rephrase": (r.rephrase_prompts or (r.prompt,))[0], "alt": r.target_new,
         "answers": [r.target_true or ""], "loc": r.locality[0].prompt, "loc_ans": r.locality[0].answer}
        for r in requests
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "requests.json").write_text(json.dumps(records))
    module = SERACModule(model=model, editor=SERACConfig(**SERAC_TINY), lr=3.0e-3, classifier_lr=3.0e-2)
    data = EditDataModule(str(root / "requests.json"), tokenizer=tokenizer, batch_size=4, val_fraction=0.0, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        quiet_trainer(root, max_epochs=epochs, limit_val_batches=0).fit(module, data)
    return module, root / "editor"
