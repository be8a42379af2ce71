"""The exceptions daffi raises: one base class, `DaffiError`, and the Python daffi's names."""

import builtins

__all__ = [
    "DaffiError",
    "RemoteCallError",
    "BadArgumentsError",
    "UnableToFindCandidate",
    "RemoteStoppedUnexpectedly",
    "InitializationError",
    "GlobalContextError",
    "TimeoutError",
]


class DaffiError(Exception):
    """Base class of every daffi failure; `message` is its text."""

    def __init__(self, message):
        self.message = message
        super().__init__(message)


class RemoteCallError(DaffiError):
    """The remote callback raised (or returned a Rust `Err`, or panicked); the text says why."""


class BadArgumentsError(RemoteCallError):
    """The callee could not take the arguments (a Rust callback given a pickled Python object)."""


class UnableToFindCandidate(DaffiError):
    """No node serves the callback, or the named process is unknown."""


class RemoteStoppedUnexpectedly(DaffiError):
    """The callee (or the controller) went away while the call was in flight."""


class InitializationError(DaffiError):
    """The node or controller could not start (address in use, name taken, bad options)."""


class GlobalContextError(DaffiError):
    """The `Global` was stopped, or has no node to call from."""


class TimeoutError(DaffiError, builtins.TimeoutError):
    """No result within the timeout. Also a built-in `TimeoutError`."""
