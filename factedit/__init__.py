"""factedit: knowledge editing of language models, with training and evaluation.

One installed package. Its sub-packages live in folders of their own at the top of a checkout
(``editors/``, ``lit_modules/``, ``datamodules/``, ``metrics/``, ``evaluation/``) and are installed
under this name by ``pyproject.toml``'s ``package-dir`` map, so a research project with folders of
the same names can still import the library: ``from factedit.editors import get_editor``.
"""

__version__ = "0.1.0"

SUBPACKAGES = ("editors", "lit_modules", "datamodules", "metrics", "evaluation")
"""The sub-packages installed under this name from folders of their own (``pyproject.toml``)."""


def require_namespace(name: str) -> None:
    """Refuse a sub-package imported by its folder name (``import editors`` run from the top of a
    checkout finds the folder itself): its modules would be loaded a second time, beside the
    ``factedit.*`` ones, with a registry and classes of their own."""
    if not name.startswith("factedit."):
        raise ImportError(f"import factedit.{name}, not {name}: the library's packages live under the one name factedit")
