"""A Python node serving generator callbacks, for the stream tests:
`streamer.py PORT [join]`.

Runs the controller on PORT (or, with `join`, joins the one there) until Ctrl-C.
"""

import asyncio
import sys
import threading
import time

from daffi import Global, callback

port = int(sys.argv[1])
runs_controller = sys.argv[2:] != ["join"]


class Producer:
    """How far an endless generator got, and whether it was closed."""

    def __init__(self):
        self.made = 0
        self.closed = threading.Event()

    def report(self, timeout):
        """(items made, closed), once closed or after `timeout` seconds."""
        self.closed.wait(timeout)
        return [self.made, self.closed.is_set()]


producers = {}


@callback
def count(n, start=0):
    for i in range(start, start + n):
        yield i


@callback
async def async_count(n, pause=0):
    for i in range(n):
        if pause:
            await asyncio.sleep(pause)
        yield {"i": i, "square": i * i}


@callback
def fail_after(n):
    yield from range(n)
    raise ValueError(f"boom after {n}")


@callback
async def async_fail_after(n):
    for i in range(n):
        yield i
    raise KeyError(f"async boom after {n}")


@callback
def slow_after_first(seconds):
    yield "first"
    time.sleep(seconds)
    yield "second"


@callback
def endless(key):
    """Counts up forever; `producer(key)` tells how far it got and whether it closed."""
    producer = producers.setdefault(key, Producer())
    try:
        while True:
            producer.made += 1
            yield producer.made
    finally:
        producer.closed.set()


@callback
async def async_stuck(key):
    """One item, then waits forever: only a cancel ends it."""
    producer = producers.setdefault(key, Producer())
    try:
        producer.made += 1
        yield "only"
        await asyncio.sleep(3600)
        yield "never"
    finally:
        producer.closed.set()


@callback
def producer(key, timeout=30):
    """[items made, closed] of the generator run under `key`, once it closed (or timeout)."""
    return producers.setdefault(key, Producer()).report(timeout)


collections = {}


@callback
def collect(item, key):
    """Keeps `item` under `key`; a STREAM calls it with each item."""
    collections.setdefault(key, []).append(item)


@callback
async def async_collect(item, key):
    await asyncio.sleep(0)
    collections.setdefault(key, []).append(item)


@callback
def picky(item, key):
    """`collect`, refusing negative items."""
    if item < 0:
        raise ValueError(f"negative item {item}")
    collections.setdefault(key, []).append(item)


@callback
def collected(key):
    return collections.get(key, [])


@callback
def plain(value):
    return [value, value]


g = Global(process_name="streamer", init_controller=runs_controller, host="localhost", port=port)
try:
    g.join()
except KeyboardInterrupt:
    pass
finally:
    g.stop()
