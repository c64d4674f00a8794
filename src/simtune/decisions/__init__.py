"""The data side: decision records, readers (and later the recorder, proxy, curation)."""

from simtune.decisions.reader import Dataset, describe, read_dataset, select
from simtune.decisions.schema import Decision

__all__ = ["Dataset", "Decision", "describe", "read_dataset", "select"]
