"""Files every layer writes the same way: the project's cache root, and writes that are atomic (a
temporary file beside the target, renamed into place, so that a reader or a run killed during the
write sees the old content or the new, never half of it)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def cache_root() -> Path:
    """``$FACTEDIT_CACHE``, else ``$XDG_CACHE_HOME/factedit``, else ``~/.cache/factedit``: where
    converted models, key statistics, sampled corpora, downloaded data and derived benchmark files
    are kept."""
    root = os.environ.get("FACTEDIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "factedit")
    return Path(root).expanduser()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (its folder created) to write to; renamed to ``path`` when
    the block ends, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A staging folder beside ``path`` (``.NAME.partial``, emptied first) to write a whole folder
    to; renamed to ``path`` when the block ends, so that an interruption never leaves a half-written
    folder under the final name. The staging folder of a killed process is left for
    :func:`leftovers` to find."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    yield staging
    os.replace(staging, path)


def leftovers(path: Path) -> list[Path]:
    """What unfinished atomic writes of ``path`` (by :func:`atomic_path` or :func:`atomic_dir`) left
    beside it when their process was killed."""
    path = Path(path)
    pattern = glob.escape(f".{path.name}.")
    return sorted([*path.parent.glob(pattern + "*.tmp"), *path.parent.glob(pattern + "partial")])
