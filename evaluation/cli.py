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

import argparse
import logging
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional, Sequence

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace

# What the parser needs imports no torch, so that --help and argument errors come at once; the
# model, the editor and the scoring are imported once the arguments are parsed.
from factedit.datamodules.records import FORMATS, RecordError, load_requests
from factedit.datamodules.sources import SourceError, known_sources
from factedit.editors import available_editors, config_class, get_editor

from .config import DEFAULT_CHECKPOINTS, MODES, SEQUENTIAL_SCORING, EvalConfig, GeneralConfig
from .run_dir import RunDir, RunDirError

if TYPE_CHECKING:
    from .distributed import Shard
    from .runner import EditRun

logger = logging.getLogger("edit")

DEFAULT_EDITOR = "ft_m"
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)
# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"limit", "overwrite", "progress", "config", "out", "device", "threads"}
ADDED_SETTINGS = {"eval.case_batch": 1, "eval.edit_together": False}
"""Settings added after runs were made without them, and the value that matches what those runs
did: a folder from before ``eval.case_batch`` measured each case alone, and one from before
``eval.edit_together`` made each edit alone; each resumes as such."""


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


EPILOG = """\
Compare finished runs (curves, tables, the edit budget of sequential runs):
  python edit.py compare RUN_DIR [RUN_DIR ...] --out DIR [--threshold 0.1]
(python edit.py compare --help lists its options)
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's formatter, keeping the line breaks of the description and the epilog."""


def field_help(cls: type, name: str) -> str | None:
    """The ``help`` metadata of dataclass field ``name``; a subclass that only changes a field's
    default (``objective: str = "prompt_last"``) keeps the help its base gives the field."""
    for klass in cls.__mro__:
        found = getattr(klass, "__dataclass_fields__", {}).get(name)
        if found is not None and found.metadata.get("help"):
            return found.metadata["help"]
    return None


def add_settings(parser: ArgumentParser, cls: type, key: str, help: str) -> None:
    """``--key.<field>`` for each field of dataclass ``cls``, each with its field's help text."""
    parser.add_class_arguments(cls, key, help=help)
    for action in parser._actions:
        if action.dest.startswith(f"{key}."):
            text = field_help(cls, action.dest[len(key) + 1 :])
            if text:
                action.help = text.replace("%", "%%")  # argparse expands %-formats in help


def build_parser(editor_name: str) -> ArgumentParser:
    try:
        settings = config_class(editor_name)
    except KeyError as err:
        raise SystemExit(f"edit.py: error: {err.args[0]}")
    parser = ArgumentParser(
        prog="edit.py",
        description="Apply a knowledge editor to a model and score the edits.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
        env_prefix="FACTEDIT",
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these settings")
    parser.add_argument("--editor.name", type=str, default=DEFAULT_EDITOR, help=f"editing method: {', '.join(available_editors())}")
    add_settings(parser, settings, "editor", help=f"settings of {editor_name} (--editor NAME --help lists another editor's)")
    parser.add_argument("--model", type=str, default="smollm2-135m", help="hub id, local folder, .gguf file, or 'smollm2-135m' (bundled)")
    parser.add_argument("--data", type=str, default="counterfact-demo", help=f"data file (format detected) or a named set: {', '.join(known_sources())}")
    parser.add_argument("--format", type=Optional[str], default=None, help=f"record format of --data, one of {', '.join(FORMATS)} (default: detect)")
    parser.add_argument("--limit", type=Optional[int], default=None, help="use the first N valid records")
    parser.add_argument("--skip_invalid", "--skip-invalid", type=bool, default=False, nargs="?", const=True, help="report and skip malformed records instead of stopping")
    parser.add_argument(
        "--mode",
        type=Literal[MODES],
        default="single",
        help="single: edit, score, revert each case; batch: several per call; sequential: edits accumulate",
    )
    parser.add_argument("--edits_per_call", "--edits-per-call", type=int, default=1, help="requests per editor call in batch and sequential modes")
    parser.add_argument(
        "--checkpoints",
        type=Optional[list[int]],
        default=None,
        help=f"sequential mode: numbers of edits at which all edits so far and the general suite are scored (default {list(DEFAULT_CHECKPOINTS)} up to the number of cases, and the last)",
    )
    parser.add_argument(
        "--sequential_scoring",
        "--sequential-scoring",
        type=Literal[SEQUENTIAL_SCORING],
        default="final",
        help="sequential mode: score each case on the model carrying every edit (final), or right after its own edit (immediate, as EasyEdit does)",
    )
    parser.add_argument("--budget_threshold", "--budget-threshold", type=float, default=0.1, help="edit budget: relative fall of any general-ability score that counts as broken")
    parser.add_argument("--out", type=Optional[str], default=None, help="output folder (default runs/<editor>_<data>_<mode>); an unfinished run there is resumed; a folder another run is writing is refused")
    parser.add_argument("--overwrite", type=bool, default=False, nargs="?", const=True, help="discard the results edit.py wrote in --out (only in a folder it made, once model and data load) instead of resuming")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", type=str, default="float32", help="float32 (default), bfloat16, float16")
    parser.add_argument("--device_map", "--device-map", type=Optional[str], default=None, help="'auto' spreads a large model over the available devices (accelerate); overrides --device")
    parser.add_argument("--trust_remote_code", "--trust-remote-code", type=bool, default=False, nargs="?", const=True, help="allow custom model code from the hub (off unless asked)")
    parser.add_argument("--progress", type=bool, default=True, help="show progress bars")
    parser.add_argument("--threads", type=str, default="auto", help="CPU threads of PyTorch: a number, or auto (the cores other processes leave free, from the load average; OMP_NUM_THREADS set in the environment wins)")
    add_settings(parser, EvalConfig, "eval", help="how edits are scored")
    add_settings(parser, GeneralConfig, "general", help="general-ability suite on the edited model (sequential: at checkpoints; batch: after the first call)")
    return parser


def _default_out(cfg: Namespace) -> Path:
    data = Path(cfg.data).stem if cfg.data.endswith((".json", ".jsonl")) else cfg.data
    return Path("runs") / f"{cfg.editor.name}_{data}_{cfg.mode}"


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    # In sequential mode every case is scored on the model carrying all edits, so the number of
    # cases (limit) is part of what was measured and must not change on resumption.
    free = RESUMABLE_CHANGES - {"limit"} if cfg.get("mode") == "sequential" else RESUMABLE_CHANGES
    return {k: v for k, v in cfg.items() if k not in free}


def _flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Settings by dotted key (``editor.lr``), as they are given on the command line."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def setting_changes(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The settings that differ between a saved run and this command, as ``key: old -> new``
    (settings that may change on resumption left out)."""
    old, new = _flatten(_comparable(saved)), _flatten(_comparable(given))
    old = {**{key: value for key, value in ADDED_SETTINGS.items() if key in new}, **old}
    unset = "(unset)"
    return [f"{key}: {old.get(key, unset)!r} -> {new.get(key, unset)!r}" for key in sorted(set(old) | set(new)) if old.get(key, unset) != new.get(key, unset)]


def prepare_out(parser: ArgumentParser, cfg: Namespace, run_dir: RunDir) -> None:
    """Refuse to mix runs: a folder holding a run must hold the same settings (or --overwrite).

    Called with the folder claimed and only once the model, the data and the editor's settings
    are known to be good, so that neither a mistyped option discards results (--overwrite) nor a
    failed start leaves a config.yaml behind that refuses the corrected command.
    """
    resolved = yaml.safe_load(parser.dump(cfg))
    try:
        if cfg.overwrite:
            run_dir.reset()
        else:
            saved = run_dir.read_config()
            if saved is None and run_dir.has_results():
                raise RunDirError(f"{run_dir.root} holds results but no config.yaml, so they cannot be matched to these settings. Use --overwrite to discard them, or another --out.")
            changes = setting_changes(saved, resolved) if saved is not None else []
            if changes:
                raise RunDirError(f"{run_dir.root} holds a run with other settings ({'; '.join(changes)}). Use another --out, or --overwrite to discard it.")
    except RunDirError as err:
        raise SystemExit(f"edit.py: error: {err}") from None
    run_dir.write_config(resolved)


@contextmanager
def claimed(run_dir: RunDir, shard: Shard) -> Iterator[None]:
    """Hold the run folder for the whole run; a folder edit.py did not make, or one another run
    holds, is refused. Only the main process of a sharded run takes the lock (the others write
    only their own shard files, and would be refused by it)."""
    with ExitStack() as stack:
        if shard.is_main:
            try:
                stack.enter_context(run_dir.claim())
            except RunDirError as err:
                raise SystemExit(f"edit.py: error: {err}") from None
        yield


def _load_data(cfg: Namespace) -> tuple[list[Any], list[str]]:
    """The edit requests, and the records skipped as invalid (with --skip_invalid)."""
    from factedit.datamodules import RecordError, SourceError, load_requests, validate_records

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
    return requests, skipped


def _fit_to_model(cfg: Namespace, model, tokenizer, editor, editor_config, eval_config: EvalConfig, requests: list[Any], skipped: list[str]) -> tuple[list[Any], list[str]]:
    """Refuse, before anything is scored or written, what cannot work on this model: an
    architecture the editor cannot locate, settings out of range (:meth:`Editor.check`), records
    longer than the model's context (left out with --skip_invalid)."""
    from .preflight import PreflightError, check_targets, requests_that_fit

    try:
        check_targets(model, editor_config)
        editor.check(model, editor_config)
    except PreflightError as err:
        raise SystemExit(f"edit.py: error: --editor {cfg.editor.name} on --model {cfg.model}: {err}")
    except (KeyError, ValueError) as err:
        reason = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
        raise SystemExit(f"edit.py: error: --editor.*: {cfg.editor.name} cannot edit --model {cfg.model} as configured: {reason}")
    requests, unfit = requests_that_fit(model, tokenizer, requests, eval_config, cfg.data)
    if unfit and not cfg.skip_invalid:
        more = f" ({len(unfit)} records in all)" if len(unfit) > 1 else ""
        raise SystemExit(f"edit.py: error: {unfit[0]}{more}; shorten the record or pass --skip_invalid to leave such records out")
    for err in unfit:
        logger.warning("skipped: %s", err)
    skipped = skipped + [str(err) for err in unfit]
    if not requests:
        raise SystemExit(f"edit.py: error: no record of {cfg.data} fits the model's context")
    return requests, skipped


def interrupted_message(run: EditRun) -> str:
    """What a stopped run has kept: the finished cases (and the saved edits of a sequential run)."""
    kept = f" ({len(run.dir.saved_edits())} edits saved)" if run.mode == "sequential" else ""
    return f"edit.py: interrupted after {run.cases_done()} of {len(run.requests)} cases{kept}; rerun the same command to resume"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from .compare import main as compare_main

        return compare_main(argv[1:], prog="edit.py compare")
    name, args = _editor_name(argv)
    parser = build_parser(name)
    cfg = parser.parse_args(args)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from factedit.models import ModelLoadError, load_model
    from factedit.evaluation.report import summary_table

    from .distributed import init_from_environment
    from .cases import EditorSetupError
    from .runner import EditRun
    from factedit.threads import set_threads

    try:
        set_threads(cfg.threads)
    except ValueError as err:
        parser.error(str(err))

    editor_cls = get_editor(cfg.editor.name)
    settings = {k: v for k, v in vars(cfg.editor).items() if k != "name"}
    try:
        editor_config = editor_cls.config_class(**settings)
    except (TypeError, ValueError) as err:
        parser.error(f"--editor.*: {err}")
    eval_config = EvalConfig(**vars(cfg.eval))
    general_config = GeneralConfig(**vars(cfg.general))
    run_dir = RunDir(Path(cfg.out) if cfg.out else _default_out(cfg))
    shard, device = init_from_environment(cfg.device)
    # The folder is held from before the data and the model load (a second run is refused at
    # once) to the end of the run; it is reset or given its config.yaml only once both loaded.
    with claimed(run_dir, shard):
        requests, skipped = _load_data(cfg)
        logger.info("%d edit requests from %s; results in %s", len(requests), cfg.data, run_dir.root)
        editor = editor_cls()
        try:
            editor.read_data(editor_config, lambda path, limit: load_requests(path, limit=limit, skip_invalid=True))
        except (RecordError, SourceError, FileNotFoundError) as err:
            parser.error(f"--editor.*: {err}")
        try:
            model, tokenizer = load_model(cfg.model, device=device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, device_map=cfg.device_map)
        except ModelLoadError as err:
            raise SystemExit(f"edit.py: error: {err}")
        requests, skipped = _fit_to_model(cfg, model, tokenizer, editor_cls(), editor_config, eval_config, requests, skipped)
        try:
            run = EditRun(
                model,
                tokenizer,
                editor,
                editor_config,
                requests,
                run_dir.root,
                mode=cfg.mode,
                edits_per_call=cfg.edits_per_call,
                eval_config=eval_config,
                progress=cfg.progress,
                info={"skipped_records": skipped} if skipped else None,
                checkpoints=cfg.checkpoints,
                general=general_config,
                budget_threshold=cfg.budget_threshold,
                sequential_scoring=cfg.sequential_scoring,
                model_id=cfg.model,
                data=cfg.data,
            )
        except ValueError as err:
            raise SystemExit(f"edit.py: error: {err}")
        if shard.is_main:
            prepare_out(parser, cfg, run_dir)
        shard.barrier()
        try:
            summary = run.run()
        except EditorSetupError as err:
            raise SystemExit(f"edit.py: error: --editor.*: {err}")
        except KeyboardInterrupt:
            if shard.is_main:
                print(interrupted_message(run), file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
    if not shard.is_main:
        return summary
    title = f"{cfg.editor.name} on {cfg.data} with {cfg.model}"
    print(summary_table(summary, title))
    print(f"results: {run_dir.summary}, {run_dir.cases}, TensorBoard: {run_dir.tensorboard}")
    return summary


def run() -> None:
    """The ``factedit-edit`` console script (the same as ``python edit.py``)."""
    main()
