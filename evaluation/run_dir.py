"""The run folder of ``edit.py``: every path in it and every way it is created, locked, reset,
read and appended to.

Before this module the command line and the loop each built paths of their own, and a folder one
of them wrote (``shards/``) was forgotten by the other's reset. Now the layout is written down once:

=====================  =================================================================
``config.yaml``        the resolved settings; a resumed run must match them
``cases.jsonl``        one line per finished case (pre- and post-edit measurements)
``pre.jsonl``          sequential mode: unedited measurements, written before any edit
``checkpoints.jsonl``  sequential mode (and batch with the general suite): scores by edits
``checkpoints.md``     the checkpoints as a markdown table
``curves.png``         every score against the number of edits
``edits/``             sequential mode: the edits made so far, ``000001``, ``000002``, ...
``shards/``            sharded runs: one case file per process until they are merged
``tensorboard/``       TensorBoard scalars, written as each case finishes, and the settings
``summary.json``       the run's scores, recomputed from ``cases.jsonl``, and their provenance
``.factedit-run``      the marker: edit.py made this folder (see :meth:`RunDir.owned`)
``.factedit-lock``     held with ``flock`` by the run writing here (see :meth:`RunDir.claim`)
=====================  =================================================================

Deleting is limited to these names, and only in a folder that carries the marker, so that
``--overwrite`` with a mistyped ``--out`` cannot remove anything else.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import yaml

from factedit import jsonl
from factedit.files import atomic_dir, leftovers, write_text_atomically

if TYPE_CHECKING:
    from factedit.editors.base import Edit

logger = logging.getLogger(__name__)

MARKER = ".factedit-run"
LOCK = ".factedit-lock"
FILES = ("config.yaml", "cases.jsonl", "pre.jsonl", "checkpoints.jsonl", "checkpoints.md", "curves.png", "summary.json")
FOLDERS = ("edits", "shards", "tensorboard")
_MARKER_TEXT = (
    "This folder was made by edit.py. 'edit.py --overwrite' deletes only the files edit.py writes\n"
    "(" + ", ".join(FILES + tuple(f"{f}/" for f in FOLDERS)) + "), and only in folders holding this file.\n"
)


class RunDirError(Exception):
    """A run folder that edit.py must not use as asked; the message says why and what to do."""


class RunDirLocked(RunDirError):
    """Another run holds the folder's lock."""


# -- JSON lines ---------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of one of the run's JSON Lines files (``[]`` when missing). These files are appended
    to line by line, so a torn last line is an interrupted write: it is dropped and the file
    trimmed (:func:`factedit.jsonl.read_jsonl`'s ``"repair"``)."""
    return jsonl.read_jsonl(path, torn_tail="repair")


def is_edit_config(config: Any) -> bool:
    """Whether ``config`` (a parsed YAML) has the shape of the ``config.yaml`` edit.py writes."""
    editor = config.get("editor") if isinstance(config, dict) else None
    return isinstance(editor, dict) and "name" in editor and {"model", "data", "mode"} <= set(config)


class RunDir:
    """The output folder of one ``edit.py`` run (see the module docstring for its layout).

    Paths are attributes; nothing touches the disk until a method is called.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.cases = self.root / "cases.jsonl"
        self.pre = self.root / "pre.jsonl"
        self.checkpoints = self.root / "checkpoints.jsonl"
        self.checkpoints_md = self.root / "checkpoints.md"
        self.curves = self.root / "curves.png"
        self.summary = self.root / "summary.json"
        self.edits = self.root / "edits"
        self.shards = self.root / "shards"
        self.tensorboard = self.root / "tensorboard"
        self.marker = self.root / MARKER
        self.lock = self.root / LOCK

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- ownership, lock, reset ---------------------------------------------------------------
    def owned(self) -> bool:
        """Whether edit.py made this folder: it carries the marker file, or it was written before
        the marker existed and its ``config.yaml`` has the shape of an edit.py config. (Such a
        folder is marked when a run claims it.)"""
        if self.marker.is_file():
            return True
        try:
            return is_edit_config(self.read_config())
        except RunDirError:
            return False

    def foreign(self) -> list[str]:
        """Names in the folder that edit.py does not write (kept by :meth:`reset`)."""
        if not self.root.is_dir():
            return []
        ours = set(FILES) | set(FOLDERS) | {MARKER, LOCK} | {p.name for n in FILES for p in leftovers(self.root / n)}
        return sorted(p.name for p in self.root.iterdir() if p.name not in ours)

    def check_usable(self) -> None:
        """Refuse a folder that edit.py did not make, unless it is missing or empty: a run must
        neither mix its results with other files nor, with ``--overwrite``, delete them."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise RunDirError(f"--out {self.root} is a file, not a folder")
        if self.owned():
            return
        entries = sorted(p.name for p in self.root.iterdir() if p.name != LOCK)
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise RunDirError(
                f"--out {self.root} was not made by edit.py (it has no {MARKER} file and no edit.py config.yaml) "
                f"and holds {shown}; nothing was changed there. Give a new or empty folder as --out."
            )

    @contextmanager
    def claim(self) -> Iterator["RunDir"]:
        """Hold the folder for this process: check it may be used, create it, take its lock, and mark
        it as edit.py's. A folder another run holds is refused at once, naming the holder.

        The lock is ``flock`` on a file kept open until the block ends; the kernel drops it when the
        process dies, even by SIGKILL, so a killed run never leaves the folder locked. The lock file
        itself stays (deleting it would let a third run lock a new file while a second still holds
        the old one).
        """
        self.check_usable()
        self.root.mkdir(parents=True, exist_ok=True)
        handle = os.fdopen(os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirLocked(f"--out {self.root} is in use by another edit.py run ({_holder(handle.read())}); wait for it to end or use another --out") from None
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            handle.truncate(0)
            handle.write(json.dumps(holder) + "\n")
            handle.flush()
            if not self.marker.is_file():
                self.marker.write_text(_MARKER_TEXT)
            try:
                yield self
            finally:
                handle.seek(0)
                handle.truncate(0)
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        finally:
            handle.close()

    def reset(self) -> None:
        """Delete everything edit.py writes here and nothing else (files of other origin stay).
        Only in a folder edit.py made; call it while holding :meth:`claim`."""
        if not self.root.exists():
            return
        if not self.owned():
            raise RunDirError(f"--out {self.root} was not made by edit.py; refusing to delete anything there")
        for name in FILES:
            for path in (self.root / name, *leftovers(self.root / name)):
                path.unlink(missing_ok=True)
        for name in FOLDERS:
            shutil.rmtree(self.root / name, ignore_errors=True)
        kept = self.foreign()
        if kept:
            logger.info("%s: kept what edit.py did not write: %s", self.root, ", ".join(kept))

    def has_results(self) -> bool:
        """Whether a run already measured something here."""
        return any(p.exists() for p in (self.cases, self.pre, self.checkpoints, self.edits, self.shards))

    # -- reading and writing ------------------------------------------------------------------
    def prepare(self, shards: bool = False) -> None:
        """Create the folder (and ``shards/`` for a sharded run) before the loop writes."""
        self.root.mkdir(parents=True, exist_ok=True)
        if shards:
            self.shards.mkdir(exist_ok=True)

    def read_config(self) -> dict[str, Any] | None:
        """The saved settings, or None when there are none; a damaged file is an error."""
        if not self.config.is_file():
            return None
        try:
            config = yaml.safe_load(self.config.read_text())
        except yaml.YAMLError as err:
            raise RunDirError(f"{self.config} is not valid YAML ({err}); use --overwrite to discard the run, or another --out") from None
        if not isinstance(config, dict):
            raise RunDirError(f"{self.config} does not hold settings; use --overwrite to discard the run, or another --out")
        return config

    def write_config(self, config: dict[str, Any]) -> None:
        write_text_atomically(self.config, yaml.safe_dump(config, sort_keys=False))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_text_atomically(self.summary, json.dumps(summary, indent=2))

    def append(self, path: Path, record: dict[str, Any]) -> None:
        """Append one record to a JSONL file of this folder (flushed and synced)."""
        with jsonl.JsonlAppender(path) as writer:
            writer.write(record)

    # -- sequential edits ---------------------------------------------------------------------
    def saved_edits(self) -> list[Path]:
        """The edits a sequential run saved, in the order they were made (unfinished saves,
        hidden ``.NNNNNN.partial`` folders, are not listed)."""
        return sorted(self.edits.glob("[0-9]*")) if self.edits.is_dir() else []

    def save_edit(self, edit: "Edit", number: int) -> Path:
        """Save the ``number``-th edit so that an interruption never leaves a half-written edit
        folder behind (a resumed run re-applies every folder it finds): write beside it, rename."""
        directory = self.edits / f"{number:06d}"
        with atomic_dir(directory) as staging:
            edit.save(staging)
        return directory

    # -- shards -------------------------------------------------------------------------------
    def shard_cases(self, rank: int) -> Path:
        return self.shards / f"cases-{rank}.jsonl"

    def merge_shards(self, order: Sequence[Any]) -> None:
        """Fold the per-process case files of a sharded run into ``cases.jsonl``, sorted by the
        position of each case id in ``order`` (the data), and delete them."""
        shard_files = sorted(self.shards.glob("cases-*.jsonl"))
        if not shard_files:
            return
        records = {r["case_id"]: r for r in read_jsonl(self.cases)}
        for path in shard_files:
            records.update({r["case_id"]: r for r in read_jsonl(path)})
        position = {case_id: i for i, case_id in enumerate(order)}
        ordered = sorted(records.values(), key=lambda r: (position.get(r["case_id"], len(position)), str(r["case_id"])))
        jsonl.write_jsonl(self.cases, ordered)
        for path in shard_files:
            path.unlink()


def _holder(text: str) -> str:
    """The holder of a lock, as its lock file describes it."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "holder not yet recorded"
