"""`g.call.<name>(*args, **kwargs)`: a `RemoteCall`, ended by a modifier (`& FG`, ...) or
a method (`.fg(timeout=..)`, ...), or awaited."""

import linecache
import re
import sys

from ._modifiers import MODIFIERS, FG, instance, is_modifier
from ._wait import wait, wait_async, wait_done, wait_done_async
from .exceptions import DaffiError, TimeoutError

_MODIFIER_ON_LINE = re.compile(r"&\s*((?:[A-Za-z_]\w*\.)*(?:%s))\b" % "|".join(MODIFIERS))


class Caller:
    """`g.call`: `g.call.func1(10, 3)` is a call of the remote callback `func1`."""

    def __init__(self, g):
        self._g = g

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        g = self._g

        def call(*args, **kwargs):
            return RemoteCall(g, name, args, kwargs)

        # Kept: the next `g.call.<name>` finds it without `__getattr__`.
        self.__dict__[name] = call
        return call


class RemoteCall:
    """A call of a remote callback, not sent until a modifier or method ends it.

    A callback that streams (a generator, an async generator, a Rust stream callback)
    answers FG (and BG's `get()`) with a `CallStream` of its items; iterating the call
    itself is the same as iterating its FG result: `for x in g.call.f(n)` or
    `async for x in g.call.f(n)`. The caller needs no modifier for it: a callee that
    streams says so when called, and this process calls that name as a stream from
    then on.
    """

    __slots__ = ("_g", "_name", "_args", "_kwargs")

    def __init__(self, g, name, args, kwargs):
        self._g = g
        self._name = name
        self._args = args
        self._kwargs = kwargs

    def __repr__(self):
        return f"RemoteCall({self._name!r}, args={self._args!r}, kwargs={self._kwargs!r})"

    def __and__(self, modifier):
        if modifier is FG:  # the common case, without making an FG
            return self.fg()
        if not is_modifier(modifier):
            return NotImplemented
        return instance(modifier).apply(self)

    def __await__(self):
        # `await g.call.f() & FG(timeout=1)` awaits `g.call.f()` first: the modifier
        # of that line is read from the source, as the Python daffi does.
        modifier = _modifier_on_line(sys._getframe(1))
        return modifier.apply_async(self).__await__()

    def __iter__(self):
        # `for x in g.call.f()`: the items of a stream callback (or of a plain result).
        return iter(self.fg())

    def __aiter__(self):
        return _aiter_result(self.fg_async())

    def _start(self, mode, timeout=None, eta=None):
        return self._g._node_now().call(self._name, self._args, self._kwargs, mode, timeout, eta)

    def fg(self, timeout=None):
        """FG: the result; TimeoutError after `timeout` seconds (the call's own). For a
        stream callback, a `CallStream` once its first item is in; `timeout` then bounds
        the wait for each item."""
        return self._start("result", timeout).get()

    async def fg_async(self, timeout=None):
        """FG in async code."""
        return await self._start("result", timeout).asyncio_future()

    def bg(self, timeout=None, eta=None):
        """BG: an `AsyncResult` at once."""
        return AsyncResult(self._start("result", timeout, eta))

    def no_return(self, eta=None):
        """NO_RETURN: returns once the call is sent (at once with an `eta`)."""
        wait(self._start("no_return", eta=eta))

    async def no_return_async(self, eta=None):
        """NO_RETURN in async code."""
        await wait_async(self._start("no_return", eta=eta))

    def broadcast(self, timeout=None, eta=None, return_result=True):
        """BROADCAST: with `return_result`, a dict node name -> result; else None."""
        return wait(self._start(_broadcast_mode(return_result), timeout, eta))

    async def broadcast_async(self, timeout=None, eta=None, return_result=True):
        """BROADCAST in async code."""
        return await wait_async(self._start(_broadcast_mode(return_result), timeout, eta))

    def stream(self, timeout=None):
        """STREAM: streams the items of the first argument (an iterable) to the callback,
        only as far ahead as it takes them. A Python callback is called with each item
        in turn (the other arguments after it), and this gives None once all were taken;
        a Rust callback takes them as its `daffi::Incoming` parameter, and this gives
        its result. `timeout` bounds the whole call."""
        return wait(self._stream_to(timeout))

    async def stream_async(self, timeout=None):
        """STREAM in async code (the items: a plain iterable, taken on another thread)."""
        return await wait_async(self._stream_to(timeout))

    def _stream_to(self, timeout):
        items, rest = self._split_items()
        return self._g._node_now().stream_to(self._name, items, rest, self._kwargs, timeout)

    def _split_items(self):
        if not self._args:
            raise TypeError(f"STREAM sends the items of the first argument of {self._name}(): give one")
        return self._args[0], self._args[1:]

    def period(self, at_time=None, period=None):
        """PERIOD: a `ScheduledTask`."""
        return ScheduledTask(wait(self._schedule(at_time, period)))

    async def period_async(self, at_time=None, period=None):
        """PERIOD in async code."""
        return ScheduledTask(await wait_async(self._schedule(at_time, period)))

    def _schedule(self, at_time, period):
        if at_time is not None and not isinstance(at_time, (list, tuple)):
            at_time = [at_time]
        return self._g._node_now().schedule(self._name, self._args, self._kwargs, at_time, period)


async def _aiter_result(result):
    """`async for` over an awaited result: a `CallStream`'s items, or a plain value's."""
    value = await result
    if hasattr(value, "__aiter__"):
        async for item in value:
            yield item
    else:
        for item in value:
            yield item


def _broadcast_mode(return_result):
    return "broadcast" if return_result else "broadcast_no_return"


def _modifier_on_line(frame):
    """The modifier written after `&` on the line being run in `frame` (FG if none)."""
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    found = _MODIFIER_ON_LINE.search(line)
    if not found:
        return FG()
    end = found.end()
    rest = line[end:]
    if rest.lstrip().startswith("("):
        end += len(rest) - len(rest.lstrip()) + _closing_paren(rest.lstrip())
    expression = line[found.start(1):end]
    return instance(eval(expression, frame.f_globals, frame.f_locals))


def _closing_paren(text):
    """The length of the balanced parenthesised group `text` starts with."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return i + 1
    return len(text)


class AsyncResult:
    """The result of a BG call, collected later with `get()` or `await get_async()`."""

    def __init__(self, pending):
        self._pending = pending
        self._outcome = None

    def ready(self):
        """Whether the result (or error) is in."""
        return self._outcome is not None or self._pending.done()

    def get(self, timeout=None):
        """The result, waiting at most `timeout` seconds (TimeoutError; the call goes on)."""
        if self._outcome is None and not wait_done(self._pending, timeout):
            raise TimeoutError(f"no result within {timeout} s")
        return self._give()

    async def get_async(self, timeout=None):
        """The result, awaited."""
        if self._outcome is None and not await wait_done_async(self._pending, timeout):
            raise TimeoutError(f"no result within {timeout} s")
        return self._give()

    def _give(self):
        if self._outcome is None:
            try:
                self._outcome = (True, self._pending.result())
            except DaffiError as error:
                self._outcome = (False, error)
        ok, value = self._outcome
        if not ok:
            raise value
        return value


class ScheduledTask:
    """A PERIOD schedule the controller keeps; `cancel()` ends it."""

    def __init__(self, schedule):
        self._schedule = schedule

    @property
    def id(self):
        """The schedule's id at the controller."""
        return self._schedule.id

    def cancel(self):
        """Cancels the schedule."""
        self._schedule.cancel()
