"""Data stage: formats, generator, cleaning and splitting (see prepare.py)."""
from ftlab.data.prepare import DataError, Example, PreparedData, prepare

__all__ = ["DataError", "Example", "PreparedData", "prepare"]
