"""Editors: one package per method, each registering its editor when it is imported.

:func:`get_editor` imports a method on first use (the built-in ones are listed in
:data:`editors.registry.METHODS`), and :func:`config_class` reads a method's settings without
importing it. Importing this package loads no method and no torch; the names that need torch
(:class:`Edit`, :class:`Editor`, ...) are imported from :mod:`editors.base` on first access.
"""

from factedit import require_namespace

require_namespace(__name__)

from typing import Any

from .config import EditorConfig
from .registry import available_editors, config_class, get_editor, register_editor
from .requests import QA, EditRequest

__all__ = ["QA", "Edit", "EditError", "Editor", "EditorConfig", "EditRequest", "ParamDelta", "available_editors", "config_class", "get_editor", "register_editor"]

_FROM_BASE = ("Edit", "EditError", "Editor", "ParamDelta")


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
