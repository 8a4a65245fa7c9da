"""The bases of every editor's settings: :class:`EditorConfig`, and :class:`LearnedConfig` for
editors with a trained network.

Config modules (this one and each method's ``config.py``) import no torch and no editor, so that a
method's settings can be listed and checked (``edit.py --help``) without loading the method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class EditorConfig:
    """Base of every editor's settings. Method settings only: no paths, devices or run options."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LearnedConfig(EditorConfig):
    """Settings every learned editor has. Fields listed in ``ARCHITECTURE`` define the network's
    shape; a checkpoint records them and refuses to load into a network built otherwise."""

    checkpoint: str | None = field(
        default=None,
        metadata={"help": "trained network: a folder or .safetensors written by train.py, or a Lightning .ckpt; None: untrained"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the network's initialisation (what 'untrained' means)"})

    ARCHITECTURE: ClassVar[tuple[str, ...]] = ()

    def architecture(self) -> dict[str, Any]:
        """The settings that determine the network's parameters (recorded in checkpoints)."""
        values = dataclasses.asdict(self)
        return {name: values[name] for name in self.ARCHITECTURE}
