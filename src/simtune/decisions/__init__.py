"""The data side: decision records, readers, curation (stats, export, split, LLM judge).

Every name loads on first use, so importing one module of the package (the schema, for
the recorder, the proxy and the OpenAI protocol) does not import the reader and the rest."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Dataset": "reader",
    "Problem": "reader",
    "describe": "reader",
    "read_dataset": "reader",
    "select": "reader",
    "validate_dataset": "reader",
    "Decision": "schema",
    "Split": "curate",
    "dataset_stats": "curate",
    "export_records": "curate",
    "split_decisions": "curate",
    "write_export": "curate",
    "RateInterrupted": "judge",
    "RateReport": "judge",
    "rate_decisions": "judge",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"simtune.decisions.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Dataset",
    "Decision",
    "Problem",
    "RateInterrupted",
    "RateReport",
    "Split",
    "dataset_stats",
    "describe",
    "export_records",
    "rate_decisions",
    "read_dataset",
    "select",
    "split_decisions",
    "validate_dataset",
    "write_export",
]
