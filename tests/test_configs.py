"""Every YAML under configs/ parses with the entry point it is written for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from factedit.editors import get_editor
from factedit.evaluation.cli import _editor_name, build_parser

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))


def _kind(path: Path) -> str:
    data = yaml.safe_load(path.read_text()) or {}
    if "editor" in data:
        return "edit"
    if set(data) & {"trainer", "model", "data"}:
        return "train"
    raise AssertionError(f"{path}: neither an edit.py nor a train.py config")


def test_there_are_configs():
    assert ALL


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses(path):
    if _kind(path) == "edit":
        name, args = _editor_name(["--config", str(path)])
        cfg = build_parser(name).parse_args(args)
        settings = {k: v for k, v in vars(cfg.editor).items() if k != "name"}
        get_editor(cfg.editor.name).config_class(**settings)  # the editor accepts every value
    else:
        data = yaml.safe_load(path.read_text())
        if "model" in data:  # a full train.py config: train.py's CLI builds model, data and trainer
            from factedit.lit_modules.cli import EditorCLI

            cli = EditorCLI(run=False, save_config_callback=None, args=["--config", str(path), "--trainer.logger", "false"])
            assert cli.model.editor.name == cli.model.editor_name  # the module trains a registered editor
        elif "trainer" in data:  # a trainer fragment such as trainer/debug.yaml
            from lightning.pytorch import Trainer

            Trainer(**data["trainer"])
