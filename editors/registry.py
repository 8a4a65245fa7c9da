"""The registry of editors: each method's name, its editor class and its config class.

An editor registers itself with :func:`register_editor` when its module is imported. The
built-in methods are also listed in :data:`METHODS` by where they live (each method package's
``config`` module names them in ``REGISTERS``; every package of ``editors/`` but ``core`` is a
method package), so that
:func:`get_editor` imports a method only when it is asked for, and :func:`config_class` reads a
method's settings from its config module alone, without the method or torch (all that
``edit.py --help`` needs). A test checks the table against the registrations.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple

from .config import EditorConfig

if TYPE_CHECKING:
    from .base import Editor


class Method(NamedTuple):
    """Where a built-in editor lives: the module whose import registers it, and its config
    class as ``"module:Class"`` (a module that imports no torch)."""

    module: str
    config: str


def find_methods(folder: Path | None = None, package: str | None = None) -> dict[str, Method]:
    """The methods of the packages in ``folder`` (the package ``package``; default: the editors
    package beside this module): every sub-package but ``core`` is a method package whose
    ``config`` module (torch-free) says what it registers in ``REGISTERS``."""
    folder = folder if folder is not None else Path(__file__).parent
    package = package if package is not None else __name__.rpartition(".")[0]
    methods: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda info: info.name):
        if not info.ispkg or info.name == "core":
            continue
        config = importlib.import_module(f"{package}.{info.name}.config")
        registers = getattr(config, "REGISTERS", None)
        if not isinstance(registers, dict) or not registers:
            raise RuntimeError(f"{config.__name__} names no method in REGISTERS (method name -> (module, config class))")
        for name, (module, config_name) in registers.items():
            if name in methods:
                raise RuntimeError(f"editor {name!r} is named by both {methods[name].module} and {package}.{info.name}.{module}")
            methods[name] = Method(f"{package}.{info.name}.{module}", f"{config.__name__}:{config_name}")
    return methods


class _Methods(Mapping[str, Method]):
    """A read-only table built on first use (the method packages import this module, so the
    table cannot be built while it loads)."""

    def __init__(self) -> None:
        self._table: Mapping[str, Method] | None = None

    def _get(self) -> Mapping[str, Method]:
        if self._table is None:
            self._table = MappingProxyType(find_methods())
        return self._table

    def __getitem__(self, name: str) -> Method:
        return self._get()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


# The built-in methods, found in the method packages: a new method is a new package, and nothing
# here changes.
METHODS: Mapping[str, Method] = _Methods()

_REGISTRY: dict[str, type[Editor]] = {}


def register_editor(name: str, config_class: type[EditorConfig]):
    """Class decorator: register an editor under a unique lower-case ``name``."""

    def decorate(cls: type[Editor]) -> type[Editor]:
        if name != name.lower() or not name.replace("_", "").isalnum():
            raise ValueError(f"editor name {name!r} must be lower-case letters, digits and underscores")
        if name in _REGISTRY:
            raise ValueError(f"editor {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if name in METHODS and cls.__module__ != METHODS[name].module:  # a built-in not imported yet
            raise ValueError(f"editor {name!r} is already registered by the built-in method in {METHODS[name].module}")
        if not (isinstance(config_class, type) and issubclass(config_class, EditorConfig)):
            raise TypeError(f"editor {name!r}: config_class must subclass EditorConfig")
        cls.name = name
        cls.config_class = config_class
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_editors() -> list[str]:
    """The names of the built-in editors and of any other registered one."""
    return sorted(set(METHODS) | set(_REGISTRY))


def _unknown(name: str) -> KeyError:
    return KeyError(f"unknown editor {name!r}; available: {', '.join(available_editors())}")


def get_editor(name: str) -> type[Editor]:
    """The editor class registered under ``name``; a built-in method is imported on first use."""
    if name not in _REGISTRY and name in METHODS:
        importlib.import_module(METHODS[name].module)
        if name not in _REGISTRY:
            raise RuntimeError(f"importing {METHODS[name].module} did not register editor {name!r}; correct REGISTERS in its package's config module")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _unknown(name) from None


def config_class(name: str) -> type[EditorConfig]:
    """The config class of editor ``name``, for a built-in method read from its config module
    without importing the method."""
    if name in _REGISTRY:
        return _REGISTRY[name].config_class
    if name not in METHODS:
        raise _unknown(name)
    module, _, attribute = METHODS[name].config.partition(":")
    return getattr(importlib.import_module(module), attribute)


def lazy_attributes(package: str, *modules: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for a method package that imports only its config: a
    name the package does not define is looked up in ``modules`` (relative to the package, in
    order), which are imported on first access. So ``from factedit.editors.rome import ROME`` works, and
    ``import factedit.editors.rome.config`` loads neither the method nor torch."""

    def __getattr__(name: str) -> Any:
        if not name.startswith("__"):
            for module in modules:
                found = importlib.import_module(module, package)
                if hasattr(found, name):
                    return getattr(found, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
