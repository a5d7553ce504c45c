"""Exceptions that are the user's to fix (printed as one line by the CLI, no traceback)."""
from __future__ import annotations


class DataError(ValueError):
    """Bad or empty data set (after filtering), with the per-reason report in the message."""


class ModelLoadError(OSError):
    """A model or tokenizer that cannot be loaded: no network for a hub id, missing folder."""


class VocabularyMismatch(ValueError):
    """Teacher and student do not share one vocabulary (DPKD compares token distributions)."""


USER_ERRORS = (DataError, ModelLoadError, VocabularyMismatch, FileNotFoundError)
