"""A Python node for the tests: `server.py ROLE NAME PORT`.

ROLE `main` runs the controller on PORT and serves every callback below; `peer` joins
it and serves only the broadcast ones. Runs until Ctrl-C (or SIGTERM).
"""

import asyncio
import sys
import threading
import time
from daffi import FG, Global, callback
from points import Point

role, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
g = None


class Counter:
    """Calls that return nothing, counted, with a way to wait for them."""

    def __init__(self):
        self.seen = []
        self.changed = threading.Condition()

    def add(self, value):
        with self.changed:
            self.seen.append(value)
            self.changed.notify_all()

    def wait_for(self, n, timeout):
        with self.changed:
            self.changed.wait_for(lambda: len(self.seen) >= n, timeout)
            return list(self.seen)


notes = Counter()
tallies = Counter()


def add(a, b=0):
    return a + b


async def sub(a, b):
    return a - b


def slow(seconds):
    time.sleep(seconds)
    return seconds


async def async_sleep_echo(value, seconds):
    await asyncio.sleep(seconds)
    return value


def fail(a, b):
    return a / b


async def async_fail(text):
    raise KeyError(text)


def echo(value):
    return value


def moved(point, dx=0, dy=0):
    """A dataclass in, a dataclass out."""
    return Point(point.x + dx, point.y + dy)


def note(value):
    notes.add(value)


def noted(n, timeout=30):
    """Blocks until `note` was called `n` times (or `timeout`); what it was given."""
    return notes.wait_for(n, timeout)


def tally(value):
    tallies.add(value)


def tallied(n, timeout=30):
    """`noted` for `tally`, which every node serves."""
    return tallies.wait_for(n, timeout)


def bounce(value):
    """Calls back the caller's `client_side`, while that caller waits for this."""
    return g.call.client_side(value) & FG(timeout=10)


def whoami():
    return name


@callback
class Shapes:
    """A class of callbacks: static and class methods at once, the others per instance."""

    sides_of = {"triangle": 3, "square": 4}

    def __init__(self, scale):
        self.scale = scale

    @staticmethod
    def sides(shape):
        return Shapes.sides_of[shape]

    @classmethod
    def shapes(cls):
        return sorted(cls.sides_of)

    def scaled(self, value):
        return value * self.scale

    def _hidden(self):
        return "never served"


broadcast_ones = [whoami, tally, tallied]
main_ones = [add, sub, slow, async_sleep_echo, fail, async_fail, echo, moved, note, noted, bounce]
for f in main_ones + broadcast_ones if role == "main" else broadcast_ones:
    callback(f)

g = Global(process_name=name, init_controller=role == "main", host="localhost", port=port)
if role == "main":
    Shapes(10)
try:
    g.join()
except KeyboardInterrupt:
    pass
finally:
    g.stop()
