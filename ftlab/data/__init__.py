"""Data stage: read and validate records, clean and split them, report (see prepare.py)."""
from ftlab.data.prepare import PreparedData, prepare
from ftlab.data.records import DataError, Example, RecordError

__all__ = ["DataError", "Example", "PreparedData", "RecordError", "prepare"]
