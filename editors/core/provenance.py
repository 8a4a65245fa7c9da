"""Where a result comes from: the software that produced it, and when.

The outputs a user keeps, a run's ``summary.json`` and a saved edit's ``edit.json``, record the
versions of the packages that computed them, the project's git commit when it runs from a git
checkout, and the date (UTC), so that a number can be traced back to the code behind it.

Nothing here runs at import time and nothing here raises: what cannot be found (a package that
is not installed, an installation that is not a git checkout, no ``git`` program) is ``None``.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "factedit", "lightning", "torchmetrics", "datasets")
"""The distributions whose versions every output records (beside Python's)."""

GIT_TIMEOUT_SECONDS = 5.0


def package_versions() -> dict[str, str | None]:
    """``{"python": "3.11.9", "torch": "2.4.0", ...}``; ``None`` for a package not installed."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def project_root() -> Path:
    """The folder holding the project's packages (``editors/``, ``evaluation/``, ...)."""
    return Path(__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_SECONDS, check=False)
    except (OSError, ValueError, subprocess.SubprocessError):  # no git, a timeout, undecodable output
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: Path | None = None) -> tuple[str | None, bool | None]:
    """The commit checked out at ``root`` (default: the project) and whether tracked files differ
    from it; ``(None, None)`` unless ``root`` is the top of a git checkout. (A project installed
    into a folder that happens to lie inside another repository does not take that one's commit.)"""
    root = (root or project_root()).resolve()
    out = _git(root, "rev-parse", "--show-toplevel", "HEAD")
    lines = out.split() if out else []
    if len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None, None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return lines[1], (bool(status.strip()) if status is not None else None)


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second: ``2025-05-01T12:34:56+00:00``."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def software() -> dict[str, Any]:
    """Package versions, the project's git commit (``None`` outside a git checkout) and whether
    the checkout had uncommitted changes, and the date: what every output records."""
    commit, dirty = git_state()
    return {"versions": package_versions(), "git_commit": commit, "git_dirty": dirty, "date": utc_now()}
