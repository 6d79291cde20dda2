"""Errors a user can fix: each message says what is wrong and what to do."""
from __future__ import annotations


class TuError(Exception):
    """An error a user can fix: the message says what is wrong and what to do."""


class ParameterError(TuError, ValueError):
    """A notebook parameter is unknown, of the wrong type or out of range."""


class DataFileError(TuError, FileNotFoundError):
    """A vendored data file is missing, corrupt or does not match its recorded SHA-256."""


class HubDataUnavailable(TuError, RuntimeError):
    """A hub-only dataset was asked for and is neither reachable nor provided locally."""


class HubModelUnavailable(HubDataUnavailable):
    """A hub-only model was asked for and is neither reachable nor provided locally."""
