"""Exceptions, one per concept. The user's to fix: printed as one line by the command line
and the study driver (exit 2), no traceback. `TrainingFault` is numerical (exit 3)."""
from __future__ import annotations


class ConfigError(ValueError):
    """Bad params: the message names the key (and the file) and the fix."""


class DataError(ValueError):
    """Bad or empty data set (after filtering), with the per-reason report in the message."""


class ModelLoadError(OSError):
    """A model or tokenizer that cannot be loaded: no network for a hub id, a missing or
    corrupt folder, a missing wheel. (OSError: what transformers raises for the same.)"""


class VocabularyMismatch(ValueError):
    """Teacher and student do not share one vocabulary (DPKD compares token distributions)."""


class MemoryPlanError(ValueError):
    """A training plan that does not fit the device's memory; the message lists the fixes."""


class RunBusy(RuntimeError):
    """Another live process holds the run folder."""


class StudyError(RuntimeError):
    """The study driver could not run a notebook (missing params, a failed cell)."""


class TrainingFault(RuntimeError):
    """A numerical fault (NaN/inf loss or weights) that stopped training; the last good
    checkpoint stays."""


USER_ERRORS = (ConfigError, DataError, ModelLoadError, VocabularyMismatch, MemoryPlanError,
               RunBusy, FileNotFoundError)
