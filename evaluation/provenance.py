"""The ``provenance`` block of a run's ``summary.json``: which model, which data, which software.

::

    "provenance": {
      "model": "smollm2-135m",                  # as given to edit.py --model
      "model_fingerprint": "1f0c...",           # editors.stats.model_fingerprint, before any edit
      "data": "counterfact-demo",               # as given to edit.py --data
      "data_file": "/.../demo_counterfact.json",  # the file read (a named source resolved)
      "data_sha256": "9a4e...",                 # of that file's bytes
      "versions": {"python": "3.11.9", "torch": "2.4.0", ...},
      "git_commit": "e6157a1...",               # null unless the project is a git checkout
      "git_dirty": false,
      "date": "2025-05-01T12:34:56+00:00"       # UTC, when this invocation started
    }

Each saved edit of the run records the same block, dated when the edit was made
(:attr:`editors.base.Edit.provenance`). A resumed run records the invocation that wrote the
summary last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from factedit.editors.core.provenance import software


def data_provenance(data: str | None) -> dict[str, Any]:
    """``data`` as given, the file it names (a named source resolved, never downloaded) and the
    SHA-256 of its bytes; ``None`` for what cannot be found."""
    from factedit.datamodules.sources import SourceError, resolve_source, sha256_of

    found: dict[str, Any] = {"data": data, "data_file": None, "data_sha256": None}
    if data is None:
        return found
    try:
        path, _ = resolve_source(data, download=False)
        found["data_sha256"] = sha256_of(path)
    except (SourceError, OSError):
        return found
    found["data_file"] = str(Path(path).resolve())
    return found


def run_provenance(model: torch.nn.Module, model_id: str | None = None, data: str | None = None) -> dict[str, Any]:
    """The block described in the module docstring, for ``model`` as it is now (unedited).
    Without ``model_id`` the name the model was loaded under is used, if it has one."""
    from factedit.models import model_fingerprint

    if model_id is None:
        model_id = getattr(model, "name_or_path", None) or None
    return {"model": model_id, "model_fingerprint": model_fingerprint(model), **data_provenance(data), **software()}
