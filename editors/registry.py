"""The registry of editors: each method's name, its editor class and its config class.

An editor registers itself with :func:`register_editor` when its module is imported. The
built-in methods are also listed in :data:`METHODS` by where they live, so that
:func:`get_editor` imports a method only when it is asked for, and :func:`config_class` reads a
method's settings from its config module alone, without the method or torch (all that
``edit.py --help`` needs). A test checks the table against the registrations.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

from .config import EditorConfig

if TYPE_CHECKING:
    from .base import Editor


class Method(NamedTuple):
    """Where a built-in editor lives: the module whose import registers it, and its config
    class as ``"module:Class"`` (a module that imports no torch)."""

    module: str
    config: str


# Read-only table of the built-in methods (immutable, so it holds no state).
METHODS: Mapping[str, Method] = MappingProxyType(
    {
        "ft_l": Method("factedit.editors.ft.editor", "factedit.editors.ft.config:FTLConfig"),
        "ft_m": Method("factedit.editors.ft.editor", "factedit.editors.ft.config:FTMConfig"),
        "kn": Method("factedit.editors.kn.editor", "factedit.editors.kn.config:KNConfig"),
        "rome": Method("factedit.editors.rome.editor", "factedit.editors.rome.config:ROMEConfig"),
        "memit": Method("factedit.editors.memit.editor", "factedit.editors.memit.config:MEMITConfig"),
        "pmet": Method("factedit.editors.memit.pmet", "factedit.editors.memit.config:PMETConfig"),
        "alphaedit": Method("factedit.editors.memit.alphaedit", "factedit.editors.memit.config:AlphaEditConfig"),
        "ke": Method("factedit.editors.ke.editor", "factedit.editors.ke.config:KEConfig"),
        "mend": Method("factedit.editors.mend.editor", "factedit.editors.mend.config:MENDConfig"),
        "enn": Method("factedit.editors.enn.editor", "factedit.editors.enn.config:ENNConfig"),
        "serac": Method("factedit.editors.serac.editor", "factedit.editors.serac.config:SERACConfig"),
        "grace": Method("factedit.editors.grace.editor", "factedit.editors.grace.config:GRACEConfig"),
        "ike": Method("factedit.editors.ike.editor", "factedit.editors.ike.config:IKEConfig"),
        "t_patcher": Method("factedit.editors.t_patcher.editor", "factedit.editors.t_patcher.config:TPatcherConfig"),
        "calinet": Method("factedit.editors.calinet.editor", "factedit.editors.calinet.config:CaliNETConfig"),
        "wise": Method("factedit.editors.wise.editor", "factedit.editors.wise.config:WISEConfig"),
    }
)

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
            raise RuntimeError(f"importing {METHODS[name].module} did not register editor {name!r}; correct editors.registry.METHODS")
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
