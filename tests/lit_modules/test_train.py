"""train.py: where the resolved config goes, and what an unreadable checkpoint says (tiny KE)."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from factedit.lit_modules import cli as train
from factedit.editors.core.learned import CheckpointError, read_checkpoint


@pytest.fixture
def tiny_run(tmp_path, tokenizer):
    """A one-step KE training config on a tiny LLaMA saved to disk, without a logger."""
    from helpers import build_llama

    model_dir = tmp_path / "tiny-llama"
    build_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "factedit.lit_modules.ke.KEModule",
            "init_args": {"model": str(model_dir), "editor": {"layers": [-1], "lstm_hidden": 8, "condition_dim": 8, "head_hidden": 8}},
        },
        "data": {"class_path": "factedit.datamodules.CounterFactDataModule", "init_args": {"data": "counterfact-demo", "tokenizer": str(model_dir), "batch_size": 2, "val_fraction": 0.0}},
        "trainer": {"accelerator": "cpu", "max_steps": 1, "limit_val_batches": 0, "logger": False, "enable_progress_bar": False, "enable_model_summary": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    train.main()


def test_no_logger_writes_no_config_into_the_working_directory(tiny_run, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _train(monkeypatch, "fit", "--config", str(tiny_run), "--trainer.enable_checkpointing", "false")
    assert not (work / "config.yaml").exists()
    # Where a folder is named, the config goes there.
    root = tmp_path / "root"
    _train(monkeypatch, "fit", "--config", str(tiny_run), "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(root))
    assert (root / "config.yaml").is_file() and not (work / "config.yaml").exists()


def test_corrupt_last_checkpoint_names_the_file_and_the_others(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoints = tmp_path / "ckpts"
    good = checkpoints / "step-1.ckpt"
    callbacks = f'[{{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {{"dirpath": "{checkpoints}", "filename": "step-{{step}}", "auto_insert_metric_name": false, "save_last": true}}}}]'
    _train(monkeypatch, "fit", "--config", str(tiny_run), "--trainer.callbacks", callbacks)
    last = checkpoints / "last.ckpt"
    assert good.is_file() and last.is_file()
    last.write_bytes(last.read_bytes()[:1000])  # a run killed while writing it

    with pytest.raises(CheckpointError, match=rf"{last}: cannot be read.*--ckpt_path {good}"):
        _train(monkeypatch, "fit", "--config", str(tiny_run), "--trainer.max_steps", "2", "--trainer.callbacks", callbacks, "--ckpt_path", "last")
    # The editor's own reader (--editor.checkpoint) says the same.
    with pytest.raises(CheckpointError, match=rf"{last}: cannot be read.*--editor.checkpoint {good}"):
        read_checkpoint(last)
    # The way out the message gives works: training goes on from step 1.
    _train(monkeypatch, "fit", "--config", str(tiny_run), "--trainer.max_steps", "2", "--trainer.callbacks", callbacks, "--ckpt_path", str(good))
    assert torch.load(checkpoints / "step-2.ckpt", weights_only=True)["global_step"] == 2
    for path in checkpoints.glob("*.ckpt"):
        if path != last:
            path.unlink()
    last.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"no other checkpoint is in {checkpoints}; start afresh without --ckpt_path"):
        _train(monkeypatch, "fit", "--config", str(tiny_run), "--trainer.callbacks", callbacks, "--ckpt_path", str(last))


def test_model_help_by_class_name_lists_its_arguments(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit:
        _train(monkeypatch, "fit", "--model.help", "MENDModule")
    assert exit.value.code == 0
    shown = capsys.readouterr().out
    assert "MENDModule" in shown
    for argument in ("--model.model", "--model.editor", "--model.lr", "--model.lr_lr", "--model.edit_weight", "--model.warmup_edits"):
        assert argument in shown
    assert "MENDConfig" in shown  # the type of --model.editor
    with pytest.raises(SystemExit) as exit:
        _train(monkeypatch, "fit", "--data.help", "CounterFactDataModule")
    assert exit.value.code == 0
    assert "--data.batch_size" in capsys.readouterr().out


def test_model_and_data_by_class_name(tiny_run, tmp_path, monkeypatch):
    """Class names resolve like full class paths, in a YAML file and on the command line."""
    from factedit.datamodules.edit_datamodule import CounterFactDataModule, ZsREDataModule
    from factedit.lit_modules.cli import EditorCLI
    from factedit.lit_modules.ke import KEModule

    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(tiny_run.read_text())
    config["model"]["class_path"] = "KEModule"
    config["data"]["class_path"] = "CounterFactDataModule"
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump(config))
    cli = EditorCLI(run=False, args=["--config", str(short)])
    assert type(cli.model) is KEModule and type(cli.datamodule) is CounterFactDataModule
    assert cli.model.config.layers == [-1]
    # The full class paths of the original file still work, and a name on the command line wins.
    cli = EditorCLI(run=False, args=["--config", str(tiny_run), "--data", "ZsREDataModule", "--data.data", "zsre-demo", "--data.tokenizer", config["data"]["init_args"]["tokenizer"]])
    assert type(cli.model) is KEModule and type(cli.datamodule) is ZsREDataModule
