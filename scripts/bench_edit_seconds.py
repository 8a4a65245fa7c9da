"""Seconds per edit of one editor under two settings, measured side by side.

    python scripts/bench_edit_seconds.py --editor grace --base "lr=0.1" --new "" --limit 20
    python scripts/bench_edit_seconds.py --editor t_patcher --base_rev 92f7706 --limit 12

Edits the first ``--limit`` records of ``--data`` one at a time (each edit made, timed and
reverted) with the editor's config updated by ``--base`` and by ``--new``, both on every record
and in alternating order, so both settings see the same records on the same machine at the same
moment (shared cores drift by tens of percent over minutes). With ``--base_rev`` the base column
runs the editor's own module and its config's defaults as they were at that git revision (the
shared code is today's), so a change to an editor is timed against the code before it. Prints each setting's mean and median seconds per
edit, their ratio, and the steps the editor reports where it records them (``info["steps"]``).
Settings are comma-separated ``field=value`` pairs of the editor's config (values read as Python
literals); an empty string keeps the defaults.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_settings(text: str) -> dict:
    settings = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        try:
            settings[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            settings[key.strip()] = value.strip()
    return settings


def module_at_revision(cls: type, revision: str) -> types.ModuleType:
    """The module defining ``cls`` as it was at git ``revision`` (from ``git show``), with its
    relative imports made absolute, its editors not registered and its edit kinds renamed."""
    root = Path(__file__).resolve().parents[1]
    path = Path(inspect.getsourcefile(cls)).resolve().relative_to(root).as_posix()
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, text=True, check=True).stdout
    package = cls.__module__.rsplit(".", 1)[0]
    source = re.sub(r"^from \.\.", "from factedit.editors.", source, flags=re.M)
    source = re.sub(r"^from \.(?=\w)", f"from {package}.", source, flags=re.M)
    source = re.sub(r"^@register_editor\(.*\)\n", "", source, flags=re.M)
    source = re.sub(r'^(\s+kind = "[^"]+)"', rf'\1@{revision}"', source, flags=re.M)
    module = types.ModuleType(f"{cls.__module__}_at_{revision}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def editor_at_revision(editor_class: type, revision: str) -> tuple[object, object]:
    """An instance of ``editor_class`` and the defaults of its config as both were at ``revision``."""
    editor = getattr(module_at_revision(editor_class, revision), editor_class.__name__)()
    config_class = getattr(module_at_revision(editor_class.config_class, revision), editor_class.config_class.__name__)
    editor.name, editor.config_class = editor_class.name, config_class
    return editor, config_class()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--editor", default="grace")
    parser.add_argument("--data", default="../shared/data/zsre/zsre_mend_eval_portability_gpt4.json")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--base", default="", help="settings of the first column, e.g. 'lr=0.1,steps=100'")
    parser.add_argument("--new", default="", help="settings of the second column ('' : the defaults)")
    parser.add_argument("--base_rev", default=None, help="run the base column with the editor's module as it was at this git revision")
    args = parser.parse_args()

    import dataclasses

    from factedit.datamodules import load_requests
    from factedit.editors import get_editor
    from factedit.models import load_model

    model, tokenizer = load_model(args.model)
    editor = get_editor(args.editor)()
    defaults = editor.config_class()
    editors, base_defaults = {"base": editor, "new": editor}, defaults
    if args.base_rev:
        editors["base"], base_defaults = editor_at_revision(type(editor), args.base_rev)
    configs = {"base": dataclasses.replace(base_defaults, **parse_settings(args.base)), "new": dataclasses.replace(defaults, **parse_settings(args.new))}
    requests = load_requests(args.data, limit=args.limit)
    for name, config in configs.items():
        if hasattr(editors[name], "prepare"):
            editors[name].prepare(model, tokenizer, config)
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    steps: dict[str, list[int]] = {name: [] for name in configs}
    for number, request in enumerate(requests, 1):
        for name in ("base", "new") if number % 2 else ("new", "base"):
            config = configs[name]
            start = time.perf_counter()
            edit = editors[name].apply(model, tokenizer, [request], config)
            seconds[name].append(time.perf_counter() - start)
            if isinstance(edit.info.get("steps"), int):
                steps[name].append(edit.info["steps"])
            edit.revert(model)
        print(f"{number}/{len(requests)}: " + ", ".join(f"{name} {seconds[name][-1]:.2f} s" for name in configs), flush=True)
    print(f"{args.editor} on {len(requests)} records of {args.data}, one edit at a time:")
    for name, text in (("base", ", ".join(filter(None, [args.base_rev and f"code at {args.base_rev}", args.base]))), ("new", args.new)):
        line = f"  {name} ({text or 'defaults'}): mean {statistics.mean(seconds[name]):.2f} s, median {statistics.median(seconds[name]):.2f} s per edit"
        if steps[name]:
            line += f", {statistics.mean(steps[name]):.1f} steps on average"
        print(line)
    print(f"  new / base: {statistics.mean(seconds['new']) / statistics.mean(seconds['base']):.2f} (means)")


if __name__ == "__main__":
    main()
