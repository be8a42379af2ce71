"""Waiting for a call that runs in Rust: in slices with the GIL released, so that Ctrl-C
(and any other signal handler) runs between them; or as an asyncio future."""

import asyncio
import time

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
    if not wait_done(pending, timeout):
        raise TimeoutError(f"no result within {timeout} s")
    return pending.result()


async def wait_done_async(pending, timeout=None):
    """Awaits `pending` on the running event loop; False if `timeout` seconds passed."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def wake():
        try:
            loop.call_soon_threadsafe(_set_done, finished)
        except RuntimeError:
            pass  # the loop closed meanwhile: nobody is waiting

    pending.add_done_callback(wake)
    try:
        await asyncio.wait_for(finished, timeout)
    except asyncio.TimeoutError:
        return False
    return True


async def wait_async(pending, timeout=None):
    """The result of `pending`, awaited on the running event loop."""
    if not await wait_done_async(pending, timeout):
        raise TimeoutError(f"no result within {timeout} s")
    return pending.result()


def _set_done(future):
    if not future.done():
        future.set_result(None)
