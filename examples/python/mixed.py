"""The Python half of examples/mixed.rs: a Python node (with the controller) and a Rust
node call each other by name, and stream to each other both ways.

    python examples/python/mixed.py          # controller + Python node on port 8890
    cargo run -p daffi --example mixed       # the Rust node

A first argument overrides the port.
"""

import sys
import threading
from dataclasses import dataclass

from daffi import FG, STREAM, BadArgumentsError, Global, RemoteCallError, callback

rust_done = threading.Event()


@callback
def py_mul(a, b):
    return a * b


@callback
def py_scale(values, factor=1.0):
    return [v * factor for v in values]


@callback
def py_fail(what):
    raise ValueError(f"{what} from Python")


@callback
def py_squares(n):
    """A generator: its items stream to the caller, here a Rust node."""
    for i in range(n):
        yield i * i


recorded = []


@callback
def py_record(word):
    """Called with each item a caller streams (Rust's `.stream_from(..)`)."""
    recorded.append(word)


@callback
def py_recorded():
    return recorded


@callback
def py_rust_done():
    rust_done.set()


@dataclass
class Point:
    x: int
    y: int


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8890
    with Global(process_name="python-node", init_controller=True, host="localhost", port=port) as g:
        g.wait_function("rust_add")
        print("python-node: rust_add(2, 3) =", g.call.rust_add(2, 3) & FG)
        greeting = g.call.rust_greet(name="Python", punctuation="!") & FG(timeout=5)
        print("python-node: rust_greet(name='Python', punctuation='!') =", repr(greeting))
        try:
            g.call.rust_checked_div(1, 0) & FG
        except RemoteCallError as e:
            print("python-node: rust_checked_div(1, 0) raised:", e)
        try:
            g.call.rust_add(Point(1, 2), 3) & FG
        except BadArgumentsError as e:
            print("python-node: rust_add(Point(1, 2), 3) raised:", e)
        print("python-node: rust_countdown(3) streamed", list(g.call.rust_countdown(3)))
        print("python-node: rust_sum(range(101)) & STREAM =", g.call.rust_sum(range(101)) & STREAM)
        rust_done.wait(timeout=60)


if __name__ == "__main__":
    main()
