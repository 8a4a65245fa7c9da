"""Record formats, one module each; importing this package imports every module of it, and each
registers its format with :func:`register_format`.

To add a format, copy ``zsre.py`` (the smallest) to a new file here and change its fields:
:func:`~factedit.datamodules.records.load_requests`, format detection, ``edit.py --format`` and
the error messages then know it. (From outside the package, call :func:`register_format`
before loading.) Formats are registered in alphabetical order of their modules.
"""

import importlib
import pkgutil

from .base import Format, register_format, registered_formats

for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Format", "register_format", "registered_formats"]
