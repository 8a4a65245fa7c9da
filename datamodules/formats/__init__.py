"""Record formats, one module each; importing this package registers the built-in ones.

To add a format, copy ``zsre.py`` (the smallest), change its fields, and import the new module
below: :func:`~factedit.datamodules.records.load_requests`, format detection, ``edit.py
--format`` and the datamodules then know it.
"""

# Each import registers its format; the order is the order of FORMATS and of the help texts.
from . import counterfact  # noqa: F401
from . import counterfact_easyedit  # noqa: F401
from . import zsre  # noqa: F401
from . import knowedit  # noqa: F401
from . import mquake  # noqa: F401
from .base import Format, register_format, registered_formats

__all__ = ["Format", "register_format", "registered_formats"]
