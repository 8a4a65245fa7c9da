"""``edit.py --help`` explains every option: each editor's settings, the scoring and the
general-ability suite show their fields' help, and the listed choices are the real ones. The help
comes without importing torch or any method, from the config modules the registry names."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from factedit.datamodules.records import FORMATS
from factedit.datamodules.sources import known_sources
from factedit.editors import available_editors, config_class, get_editor
from factedit.editors.registry import METHODS
from factedit.evaluation.cli import build_parser, field_help, main
from factedit.evaluation.config import MODES, EvalConfig, GeneralConfig

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "torchmetrics", "lightning")

GROUPS = ("editor", "eval", "general")


def _squeeze(text: str) -> str:
    """Text without whitespace: help is re-wrapped, and may be broken at hyphens."""
    return re.sub(r"\s+", "", text)


def _option_help(shown: str, option: str) -> str:
    """The help text printed for ``option`` (up to the next option line)."""
    match = re.search(rf"^  {re.escape(option)}\b.*?(?=^  -|^\S|\Z)", shown, flags=re.M | re.S)
    assert match, f"{option} is not in the help"
    return match.group(0)


@pytest.mark.parametrize("name", available_editors())
def test_every_setting_of_every_editor_shows_its_help(name):
    parser = build_parser(name)
    shown = _squeeze(parser.format_help())
    settings = {"editor": get_editor(name).config_class, "eval": EvalConfig, "general": GeneralConfig}
    for group, cls in settings.items():
        for field in dataclasses.fields(cls):
            text = field_help(cls, field.name)
            assert text and text.strip(), f"{cls.__qualname__}.{field.name} has no help metadata"
            assert _squeeze(text) in shown, f"--{group}.{field.name}: its help is not shown"
    options = [a for a in parser._actions if a.dest.split(".")[0] in GROUPS and "." in a.dest]
    assert {a.dest for a in options} >= {f"editor.{f.name}" for f in dataclasses.fields(settings["editor"])}
    for action in options:
        if action.dest == "editor.name":
            continue
        assert action.help and action.help.strip(), f"--{action.dest} has no help"


def test_an_overridden_default_keeps_its_base_help():
    from factedit.editors.ft import FTConfig, FTLConfig

    assert field_help(FTLConfig, "objective") == FTConfig.__dataclass_fields__["objective"].metadata["help"]
    assert field_help(FTLConfig, "no_such_field") is None


def test_help_lists_the_real_choices(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--editor", "rome", "--help"])
    assert exit.value.code == 0
    shown = capsys.readouterr().out
    assert "<function" not in shown and "lambda" not in shown
    assert f"--mode {{{','.join(MODES)}}}" in shown
    for option, names in (("--format", FORMATS), ("--data", known_sources()), ("--editor.name", available_editors())):
        listed = _squeeze(_option_help(shown, option))
        for value in names:
            assert _squeeze(value) in listed, f"{option}: {value} is not listed"
    assert "mquake" in _option_help(shown, "--format") and "mquake-demo" in _option_help(shown, "--data")
    assert "settings of rome" in shown


def test_help_names_the_compare_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert "python edit.py compare RUN_DIR [RUN_DIR ...] --out DIR" in shown
    with pytest.raises(SystemExit) as exit:
        main(["compare", "--help"])
    assert exit.value.code == 0
    assert "--out" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_registry_table_names_what_each_method_registers(name):
    editor = get_editor(name)
    assert editor.name == name
    assert editor.config_class is config_class(name)
    assert editor.__module__ == METHODS[name].module


def test_help_imports_neither_torch_nor_any_method():
    """In a fresh interpreter: the help of every editor, and edit.py's own --help, load no
    torch (about 1.5 s of imports) and no method's implementation."""
    code = f"""
import contextlib, io, sys
from factedit.evaluation.cli import build_parser, main
from factedit.editors import available_editors
for name in available_editors():
    build_parser(name).format_help()
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["--editor", "rome", "--help"])
loaded = [m for m in {HEAVY!r} if m in sys.modules]
methods = sorted(m for m in sys.modules if m.startswith("editors.") and m.endswith((".editor", ".pmet", ".alphaedit", ".network", ".memory")))
print(loaded, methods)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []", result.stdout
