"""Edit data: named sources, the JSON record formats, and LightningDataModules for training editors.

Raw JSON rows become :class:`~editors.base.EditRequest` objects only in :mod:`factedit.datamodules.records`;
everything downstream (editors, metrics, training) sees requests, never raw records.
The datamodules are imported on first access, so that reading requests does not pull in Lightning.
"""

from factedit import require_namespace

require_namespace(__name__)

from typing import Any

from factedit.datamodules.records import (
    FORMATS,
    RecordError,
    dataset_to_requests,
    detect_format,
    load_requests,
    parse_records,
    requests_to_dataset,
    validate_records,
)
from factedit.datamodules.sources import SOURCES, Source, SourceError, cache_dir, known_sources, resolve_source

__all__ = [
    "FORMATS",
    "SOURCES",
    "CounterFactDataModule",
    "EditDataModule",
    "RecordError",
    "Source",
    "SourceError",
    "ZsREDataModule",
    "cache_dir",
    "dataset_to_requests",
    "detect_format",
    "known_sources",
    "load_requests",
    "parse_records",
    "requests_to_dataset",
    "resolve_source",
    "validate_records",
]

_DATAMODULES = ("CounterFactDataModule", "EditDataModule", "ZsREDataModule")


def __getattr__(name: str) -> Any:
    if name in _DATAMODULES:
        from factedit.datamodules import edit_datamodule

        return getattr(edit_datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
