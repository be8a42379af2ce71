"""Waiting for a call that runs in Rust: in slices with the GIL released, so that Ctrl-C
(and any other signal handler) runs between them; or as an asyncio future."""

import asyncio
import functools
import threading
import time
import weakref

from .exceptions import TimeoutError

#: How long one wait lasts before Python handles pending signals.
SLICE = 0.1


def wait_done(pending, timeout=None):
    """Waits until `pending` is done; False if `timeout` seconds (None: no limit) passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
        if pending.wait(max(left, 0)):
            return True
        if left <= 0:
            return False


def wait(pending, timeout=None):
    """The result of `pending`, waiting at most `timeout` seconds (None: no limit)."""
    if timeout is None:
        return pending.get()
    if not wait_done(pending, timeout):
        raise TimeoutError(f"no result within {timeout} s")
    return pending.result()


async def wait_done_async(pending, timeout=None):
    """Awaits `pending` on the running event loop; False if `timeout` seconds passed."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    pending.add_done_callback(functools.partial(_inbox(loop).put, finished))
    if timeout is None:
        await finished
        return True
    try:
        await asyncio.wait_for(finished, timeout)
    except asyncio.TimeoutError:
        return False
    return True


class _Inbox:
    """The calls done for one event loop, handed over in one wake-up of the loop for all
    that finished together (not one per call)."""

    def __init__(self, loop):
        self._loop = loop
        self._lock = threading.Lock()
        self._done = []

    def put(self, future):
        with self._lock:
            self._done.append(future)
            first = len(self._done) == 1
        if first:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                pass  # the loop closed meanwhile: nobody is waiting

    def _drain(self):
        with self._lock:
            done, self._done = self._done, []
        for future in done:
            if not future.done():
                future.set_result(None)


_inboxes = weakref.WeakKeyDictionary()


def _inbox(loop):
    inbox = _inboxes.get(loop)
    if inbox is None:
        inbox = _inboxes.setdefault(loop, _Inbox(loop))
    return inbox


async def wait_async(pending, timeout=None):
    """The result of `pending`, awaited on the running event loop."""
    future = pending.asyncio_future()
    if timeout is None:
        return await future
    try:
        return await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        if not future.cancelled():
            raise  # the call's own timeout
        raise TimeoutError(f"no result within {timeout} s") from None
