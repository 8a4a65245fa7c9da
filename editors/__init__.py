"""Editors. Importing this package registers every editor (see :func:`editors.base.get_editor`)."""

from .base import QA, Edit, EditError, Editor, EditorConfig, EditRequest, ParamDelta, available_editors, get_editor, register_editor
from . import ft  # noqa: F401  (registers ft_l, ft_m)
from . import kn  # noqa: F401  (registers kn)
from . import rome  # noqa: F401  (registers rome)
from . import memit  # noqa: F401  (registers memit, pmet, alphaedit)
from . import ke  # noqa: F401  (registers ke)
from . import mend  # noqa: F401  (registers mend)
from . import enn  # noqa: F401  (registers enn)
from . import serac  # noqa: F401  (registers serac)
from . import grace  # noqa: F401  (registers grace)
from . import ike  # noqa: F401  (registers ike)
from . import tpatcher  # noqa: F401  (registers t_patcher)
from . import calinet  # noqa: F401  (registers calinet)
from . import wise  # noqa: F401  (registers wise)

__all__ = ["QA", "Edit", "EditError", "Editor", "EditorConfig", "EditRequest", "ParamDelta", "available_editors", "get_editor", "register_editor"]
