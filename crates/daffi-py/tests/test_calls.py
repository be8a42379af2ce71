"""Calls from this process (a Python node) to two Python node processes, over TCP: every
modifier in both styles, sync and async callers and callbacks, a class of callbacks,
values and errors."""

import asyncio
import time
import pytest

import daffi
from daffi import BG, BROADCAST, FG, NO_RETURN, PERIOD, Global, callback
from conftest import NODES, WAIT, free_port, interrupt, spawn_python
from points import Point


@callback
def client_side(value):
    """Served by this process; `bounce` on the server calls it back."""
    return f"client got {value}"


@pytest.fixture(scope="module")
def g():
    port = free_port()
    servers = [
        spawn_python(NODES / "server.py", "main", "server-main", port),
        spawn_python(NODES / "server.py", "peer", "server-peer", port),
    ]
    try:
        client = Global(process_name="client", host="localhost", port=port)
        client.wait_process("server-main", timeout=WAIT)
        client.wait_process("server-peer", timeout=WAIT)
        client.wait_function("add", timeout=WAIT)
        client.wait_function("scaled", timeout=WAIT)
        yield client
        client.stop()
    finally:
        try:
            ended = [(server, interrupt(server)) for server in servers]
        finally:
            for server in servers:  # left running only if a test above failed
                if server.poll() is None:
                    server.kill()
                    server.communicate()
        for server, (_, err) in ended:
            assert server.returncode == 0, err


def test_fg_in_both_styles(g):
    assert g.call.add(10, 3) & FG == 13
    assert g.call.add(10, b=5) & FG(timeout=5) == 15
    assert g.call.add(a=1, b=2).fg(timeout=5) == 3
    assert g.call.sub(10, 3).fg() == 7


def test_fg_timeout_raises_timeout_error(g):
    started = time.monotonic()
    with pytest.raises(daffi.TimeoutError) as raised:
        g.call.slow(5) & FG(timeout=0.3)
    assert time.monotonic() - started < 4
    assert isinstance(raised.value, TimeoutError)
    assert isinstance(raised.value, daffi.DaffiError)


def test_bg_returns_an_async_result(g):
    result = g.call.slow(0.3) & BG
    assert isinstance(result, daffi.AsyncResult)
    with pytest.raises(daffi.TimeoutError):
        result.get(timeout=0.01)
    assert result.get(timeout=WAIT) == 0.3
    assert result.get() == 0.3  # kept
    later = g.call.add(2, 2).bg(timeout=WAIT, eta=0.2)
    assert later.get(timeout=WAIT) == 4
    with pytest.raises(daffi.TimeoutError):
        g.call.slow(5).bg(timeout=0.2).get(timeout=WAIT)


def test_no_return_in_both_styles(g):
    assert g.call.note("plain") & NO_RETURN is None
    g.call.note("later").no_return(eta=0.2)
    assert sorted(g.call.noted(2) & FG(timeout=WAIT)) == ["later", "plain"]


def test_period_runs_on_schedule_until_cancelled(g):
    before = len(g.call.noted(0) & FG)
    task = g.call.note("tick") & PERIOD(period=0.1)
    seen = g.call.noted(before + 3) & FG(timeout=WAIT)
    task.cancel()
    assert seen[before:before + 3] == ["tick"] * 3
    now = time.time()
    g.call.note("at").period(at_time=[now + 0.2, now + 0.4])
    seen = g.call.noted(len(seen) + 2) & FG(timeout=WAIT)
    assert seen.count("at") == 2


def test_broadcast_reaches_every_node(g):
    assert g.call.whoami() & BROADCAST == {"server-main": "server-main", "server-peer": "server-peer"}
    assert g.call.whoami().broadcast(timeout=WAIT) == {"server-main": "server-main", "server-peer": "server-peer"}
    assert g.call.tally("x") & BROADCAST(return_result=False) is None
    # Each node has the tally: both answer once theirs arrived.
    assert g.call.tallied(1) & BROADCAST(timeout=WAIT) == {"server-main": ["x"], "server-peer": ["x"]}


def test_a_class_of_callbacks(g):
    assert g.call.sides("square") & FG == 4
    assert g.call.shapes() & FG == ["square", "triangle"]
    assert g.call.scaled(3) & FG == 30
    with pytest.raises(daffi.UnableToFindCandidate):
        g.call._hidden() & FG


def test_values_cross_as_themselves(g):
    for value in [None, True, -5, 2**63 - 1, 2**64 - 1, 1.5, "text", b"\x00bytes", [1, [2, "x"]], {"k": {"n": [1]}}]:
        assert g.call.echo(value) & FG == value
    assert g.call.echo((1, 2)) & FG == [1, 2]  # MessagePack has lists only
    assert g.call.echo(bytearray(b"ab")) & FG == b"ab"


def test_a_dataclass_travels_between_python_nodes(g):
    assert g.call.moved(Point(1, 2), dy=5) & FG == Point(1, 7)
    assert g.call.echo(2**70) & FG == 2**70  # too large for MessagePack: pickled


def test_remote_exceptions_raise_with_their_text(g):
    with pytest.raises(daffi.RemoteCallError, match="ZeroDivisionError: division by zero"):
        g.call.fail(1, 0) & FG
    with pytest.raises(daffi.RemoteCallError, match="KeyError: 'gone'"):
        g.call.async_fail("gone") & FG
    with pytest.raises(daffi.RemoteCallError, match="TypeError"):
        g.call.add(1, 2, 3) & FG
    with pytest.raises(daffi.UnableToFindCandidate, match="no_such_callback"):
        g.call.no_such_callback() & FG
    assert g.call.add(1, 1) & FG == 2  # the callee is fine


def test_a_callee_can_call_back_while_the_caller_waits(g):
    # The GIL is released while this thread waits: the callback runs here meanwhile.
    assert g.call.bounce(7) & FG(timeout=WAIT) == "client got 7"


def test_async_callers(g):
    async def main():
        assert await g.call.sub(9, 2) & FG(timeout=WAIT) == 7
        assert await g.call.add(1, 2) == 3
        assert await g.call.add(1, b=2) & FG == 3
        result = await g.call.async_sleep_echo("x", 0.1) & BG
        assert await result.get_async() == "x"
        assert await g.call.whoami() & BROADCAST(timeout=WAIT) == {
            "server-main": "server-main",
            "server-peer": "server-peer",
        }
        with pytest.raises(daffi.TimeoutError):
            await g.call.slow(5) & FG(timeout=0.2)
        # Calls awaited together run together.
        started = time.monotonic()
        values = await asyncio.gather(*(g.call.async_sleep_echo(i, 0.5).fg_async() for i in range(20)))
        assert values == list(range(20))
        return time.monotonic() - started

    assert asyncio.run(main()) < 0.5 * 20 / 2


def test_a_thousand_bg_calls_in_flight(g):
    # Each call sleeps 0.2 s in an async callback: one at a time they would take 200 s.
    started = time.monotonic()
    results = [g.call.async_sleep_echo(i, 0.2) & BG for i in range(1000)]
    assert [r.get(timeout=WAIT) for r in results] == list(range(1000))
    assert time.monotonic() - started < WAIT
