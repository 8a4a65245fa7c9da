"""LightningModules that train hypernetwork editors (the training loop only; the editors live in
``editors/``). Run them with ``python train.py fit --config configs/<method>/<dataset>.yaml``.

Importing the package imports every module, so that ``train.py`` knows each by its class name
(``--model MENDModule``, ``--model.help MENDModule``) as well as by its full class path.
"""

from factedit import require_namespace

require_namespace(__name__)

from .base import EditorModule, WeightEditModule
from .enn import ENNModule
from .ke import KEModule
from .mend import MENDModule
from .serac import SERACModule

__all__ = ["EditorModule", "WeightEditModule", "ENNModule", "KEModule", "MENDModule", "SERACModule"]
