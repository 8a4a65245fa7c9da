"""Command line of ``edit.py``: apply an editor to a model and report what the edits did.

    python edit.py --editor ft_m --model smollm2-135m --data counterfact-demo --limit 10
    python edit.py --config configs/ft_m/counterfact.yaml --editor.lr 1.0e-04
    python edit.py --editor rome --mode sequential --limit 200 --general.tasks [hellaswag,arc_easy]
    python edit.py compare runs/rome_seq runs/memit_seq --out runs/compare

``--editor NAME`` picks the method; its settings are ``--editor.<field>`` (``--help`` lists
them for the chosen editor). A YAML given with ``--config`` uses the same keys, with the
editor's name under ``editor.name``.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from editors import available_editors, get_editor

from .general import GeneralConfig
from .runner import DEFAULT_CHECKPOINTS, MODES, EditorSetupError, EditRun
from .scoring import EvalConfig

logger = logging.getLogger("edit")

DEFAULT_EDITOR = "ft_m"
# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"limit", "overwrite", "progress", "config", "out", "device"}


def _editor_name(argv: Sequence[str]) -> tuple[str, list[str]]:
    """Find the editor's name (CLI over config files over the default); rewrite ``--editor X``."""
    name = DEFAULT_EDITOR
    rewritten: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            try:
                loaded = yaml.safe_load(Path(args[i + 1]).read_text()) or {}
            except (OSError, yaml.YAMLError) as err:
                raise SystemExit(f"edit.py: error: --config {args[i + 1]}: {err}")
            editor = loaded.get("editor") if isinstance(loaded, dict) else None
            if isinstance(editor, str):
                raise SystemExit(f"edit.py: error: {args[i + 1]}: write 'editor:' as a mapping with 'name: {editor}' and the editor's settings")
            if isinstance(editor, dict) and "name" in editor:
                name = editor["name"]
        if arg in ("--editor", "--editor.name") and i + 1 < len(args):
            name = args[i + 1]
            rewritten += ["--editor.name", name]
            i += 2
            continue
        if arg.startswith("--editor=") or arg.startswith("--editor.name="):
            name = arg.split("=", 1)[1]
            rewritten.append(f"--editor.name={name}")
            i += 1
            continue
        rewritten.append(arg)
        i += 1
    return name, rewritten


def build_parser(editor_name: str) -> ArgumentParser:
    try:
        editor_cls = get_editor(editor_name)
    except KeyError as err:
        raise SystemExit(f"edit.py: error: {err.args[0]}")
    parser = ArgumentParser(prog="edit.py", description="Apply a knowledge editor to a model and score the edits.", env_prefix="FACTEDIT", default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these settings")
    parser.add_argument("--editor.name", type=str, default=DEFAULT_EDITOR, help=f"editing method: {', '.join(available_editors())}")
    parser.add_class_arguments(editor_cls.config_class, "editor", help=f"settings of {editor_name}")
    parser.add_argument("--model", type=str, default="smollm2-135m", help="hub id, local folder, .gguf file, or 'smollm2-135m' (bundled)")
    parser.add_argument("--data", type=str, default="counterfact-demo", help="data file (format detected) or a named set: counterfact-demo, zsre-demo, counterfact, zsre")
    parser.add_argument("--format", type=Optional[str], default=None, help="counterfact, counterfact_easyedit, zsre or knowedit (default: detect)")
    parser.add_argument("--limit", type=Optional[int], default=None, help="use the first N valid records")
    parser.add_argument("--skip_invalid", "--skip-invalid", type=bool, default=False, nargs="?", const=True, help="report and skip malformed records instead of stopping")
    parser.add_argument("--mode", type=str, default="single", choices=MODES, help="single: edit, score, revert each case; batch: several per call; sequential: edits accumulate")
    parser.add_argument("--edits_per_call", "--edits-per-call", type=int, default=1, help="requests per editor call in batch and sequential modes")
    parser.add_argument(
        "--checkpoints",
        type=Optional[list[int]],
        default=None,
        help=f"sequential mode: numbers of edits at which all edits so far and the general suite are scored (default {list(DEFAULT_CHECKPOINTS)} up to the number of cases, and the last)",
    )
    parser.add_argument("--budget_threshold", "--budget-threshold", type=float, default=0.1, help="edit budget: relative fall of any general-ability score that counts as broken")
    parser.add_argument("--out", type=Optional[str], default=None, help="output folder (default runs/<editor>_<data>_<mode>); an unfinished run there is resumed")
    parser.add_argument("--overwrite", type=bool, default=False, nargs="?", const=True, help="discard results already in --out instead of resuming")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", type=str, default="float32", help="float32 (default), bfloat16, float16")
    parser.add_argument("--device_map", "--device-map", type=Optional[str], default=None, help="'auto' spreads a large model over the available devices (accelerate); overrides --device")
    parser.add_argument("--trust_remote_code", "--trust-remote-code", type=bool, default=False, nargs="?", const=True, help="allow custom model code from the hub (off unless asked)")
    parser.add_argument("--progress", type=bool, default=True, help="show progress bars")
    parser.add_class_arguments(EvalConfig, "eval", help="how edits are scored")
    parser.add_class_arguments(GeneralConfig, "general", help="general-ability suite on the edited model (sequential: at checkpoints; batch: after the first call)")
    return parser


def _default_out(cfg: Namespace) -> Path:
    data = Path(cfg.data).stem if cfg.data.endswith((".json", ".jsonl")) else cfg.data
    return Path("runs") / f"{cfg.editor.name}_{data}_{cfg.mode}"


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    # In sequential mode every case is scored on the model carrying all edits, so the number of
    # cases (limit) is part of what was measured and must not change on resumption.
    free = RESUMABLE_CHANGES - {"limit"} if cfg.get("mode") == "sequential" else RESUMABLE_CHANGES
    return {k: v for k, v in cfg.items() if k not in free}


def prepare_out(parser: ArgumentParser, cfg: Namespace, out: Path) -> None:
    """Refuse to mix runs: an existing folder must hold the same settings (or --overwrite)."""
    resolved = yaml.safe_load(parser.dump(cfg))
    saved_path = out / "config.yaml"
    if cfg.overwrite and out.exists():
        for name in ("cases.jsonl", "pre.jsonl", "summary.json", "config.yaml", "checkpoints.jsonl", "curves.png", "checkpoints.md"):
            (out / name).unlink(missing_ok=True)
        for name in ("edits", "tensorboard"):
            shutil.rmtree(out / name, ignore_errors=True)
    elif saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        old, new = _comparable(saved), _comparable(resolved)
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            raise SystemExit(
                f"edit.py: error: {out} holds a run with other settings (differing: {', '.join(differ)}). "
                f"Use another --out, or --overwrite to discard it."
            )
    out.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(yaml.safe_dump(resolved, sort_keys=False))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from datamodules import RecordError, SourceError, load_requests, validate_records
    from evaluation.models import ModelLoadError, load_model
    from evaluation.report import summary_table

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from .compare import main as compare_main

        return compare_main(argv[1:], prog="edit.py compare")
    name, args = _editor_name(argv)
    parser = build_parser(name)
    cfg = parser.parse_args(args)
    editor_cls = get_editor(cfg.editor.name)
    settings = {k: v for k, v in vars(cfg.editor).items() if k != "name"}
    try:
        editor_config = editor_cls.config_class(**settings)
    except (TypeError, ValueError) as err:
        parser.error(f"--editor.*: {err}")
    eval_config = EvalConfig(**vars(cfg.eval))
    general_config = GeneralConfig(**vars(cfg.general))
    out = Path(cfg.out) if cfg.out else _default_out(cfg)

    skipped: list[str] = []
    try:
        if cfg.skip_invalid:
            requests, errors = validate_records(cfg.data, format=cfg.format, limit=cfg.limit)
            skipped = [str(err) for err in errors]
            for message in skipped:
                logger.warning("skipped: %s", message)
        else:
            requests = load_requests(cfg.data, format=cfg.format, limit=cfg.limit)
    except (RecordError, SourceError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"edit.py: error: --data: {err}")
    if not requests:
        raise SystemExit(f"edit.py: error: {cfg.data} holds no valid records")
    from .distributed import init_from_environment

    shard, device = init_from_environment(cfg.device)
    if shard.is_main:
        prepare_out(parser, cfg, out)
    shard.barrier()
    logger.info("%d edit requests from %s; results in %s", len(requests), cfg.data, out)
    try:
        model, tokenizer = load_model(cfg.model, device=device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, device_map=cfg.device_map)
    except ModelLoadError as err:
        raise SystemExit(f"edit.py: error: {err}")
    from .preflight import PreflightError, check_targets, requests_that_fit

    try:
        check_targets(model, editor_config)
    except PreflightError as err:
        raise SystemExit(f"edit.py: error: --editor {cfg.editor.name} on --model {cfg.model}: {err}")
    requests, unfit = requests_that_fit(model, tokenizer, requests, eval_config, cfg.data)
    if unfit and not cfg.skip_invalid:
        more = f" ({len(unfit)} records in all)" if len(unfit) > 1 else ""
        raise SystemExit(f"edit.py: error: {unfit[0]}{more}; shorten the record or pass --skip_invalid to leave such records out")
    for err in unfit:
        logger.warning("skipped: %s", err)
        skipped.append(str(err))
    if not requests:
        raise SystemExit(f"edit.py: error: no record of {cfg.data} fits the model's context")

    try:
        run = EditRun(
            model,
            tokenizer,
            editor_cls(),
            editor_config,
            requests,
            out,
            mode=cfg.mode,
            edits_per_call=cfg.edits_per_call,
            eval_config=eval_config,
            progress=cfg.progress,
            info={"skipped_records": skipped} if skipped else None,
            checkpoints=cfg.checkpoints,
            general=general_config,
            budget_threshold=cfg.budget_threshold,
        )
    except ValueError as err:
        raise SystemExit(f"edit.py: error: {err}")
    try:
        summary = run.run()
    except EditorSetupError as err:
        raise SystemExit(f"edit.py: error: --editor.*: {err}")
    if not shard.is_main:
        return summary
    title = f"{cfg.editor.name} on {cfg.data} with {cfg.model}"
    print(summary_table(summary, title))
    print(f"results: {out}/summary.json, {out}/cases.jsonl, TensorBoard: {out}/tensorboard")
    return summary
