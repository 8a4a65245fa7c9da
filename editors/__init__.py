"""Editors. Importing this package registers every editor (see :func:`editors.base.get_editor`)."""

from .base import QA, Edit, EditError, Editor, EditorConfig, EditRequest, ParamDelta, available_editors, get_editor, register_editor
from . import ft  # noqa: F401  (registers ft_l, ft_m)

__all__ = ["QA", "Edit", "EditError", "Editor", "EditorConfig", "EditRequest", "ParamDelta", "available_editors", "get_editor", "register_editor"]
