"""daffi: the Python daffi's API on the Rust daffi core.

Processes call each other's functions by name through a controller; Python and Rust
processes share one mesh. Values MessagePack expresses (None, bool, int, float, str,
bytes, list, tuple, dict) cross between languages; keyword arguments are the named
arguments of a Rust callback. Other objects travel pickled (stdlib `pickle`) between
Python nodes only: unpickling runs code the sender chose, so connect only nodes you
trust (as with the Python daffi's dill).

A generator or async generator callback streams its items; the caller iterates the
call (`for x in g.call.f()`, `async for x in g.call.f()`), or its FG result, a
`CallStream`. The other way, `g.call.f(items) & STREAM` calls `f` with each item.
"""

from ._call import AsyncResult, RemoteCall, ScheduledTask
from ._daffi import CallStream
from ._callbacks import callback
from ._global import Global
from ._modifiers import BG, BROADCAST, FG, NO_RETURN, PERIOD, STREAM
from .exceptions import (
    BadArgumentsError,
    DaffiError,
    GlobalContextError,
    InitializationError,
    RemoteCallError,
    RemoteStoppedUnexpectedly,
    TimeoutError,
    UnableToFindCandidate,
)

__all__ = [
    "Global",
    "callback",
    "FG",
    "BG",
    "NO_RETURN",
    "PERIOD",
    "BROADCAST",
    "STREAM",
    "AsyncResult",
    "RemoteCall",
    "ScheduledTask",
    "CallStream",
    "DaffiError",
    "RemoteCallError",
    "BadArgumentsError",
    "UnableToFindCandidate",
    "RemoteStoppedUnexpectedly",
    "InitializationError",
    "GlobalContextError",
    "TimeoutError",
]
