"""Streams between Python nodes over TCP: generator and async generator callbacks,
read by sync and async callers; errors, timeouts, and a reader that stops (the
generator is closed, having run no further than the stream's credit ahead); and
`& STREAM`, which sends a caller's items to a callback."""

import asyncio
import itertools
import time

import pytest

import daffi
from daffi import BG, FG, STREAM, CallStream, Global
from conftest import NODES, WAIT, free_port, interrupt, spawn_python

#: The most items a stream's producer makes before its reader grants more: the first
#: credit (4,096 items; these items are far below its 2 MiB). A generator is advanced
#: only as far as the credit.
AHEAD = 4096


@pytest.fixture(scope="module")
def g():
    port = free_port()
    streamer = spawn_python(NODES / "streamer.py", port)
    try:
        client = Global(process_name="stream-client", host="localhost", port=port)
        client.wait_function("producer", timeout=WAIT)
        yield client
        client.stop()
    finally:
        _, err = interrupt(streamer)
    assert streamer.returncode == 0, err


def test_a_generator_streams_its_items_to_a_sync_caller(g):
    assert list(g.call.count(5)) == [0, 1, 2, 3, 4]
    assert sum(g.call.count(10_000, start=1)) == 10_000 * 10_001 // 2
    stream = g.call.count(3) & FG(timeout=WAIT)
    assert isinstance(stream, CallStream)
    assert stream.process == "streamer"
    assert [x for x in stream] == [0, 1, 2]
    assert list(stream) == []  # ended
    later = g.call.count(2).bg(timeout=WAIT)
    assert list(later.get(timeout=WAIT)) == [0, 1]
    assert list(g.call.count(0)) == []
    # A plain callback next to them still answers its value.
    assert g.call.plain("x") & FG == ["x", "x"]


def test_an_async_generator_streams_to_sync_and_async_callers(g):
    expected = [{"i": i, "square": i * i} for i in range(50)]
    assert list(g.call.async_count(50)) == expected

    async def main():
        got = [x async for x in g.call.async_count(50)]
        stream = await g.call.count(4) & FG(timeout=WAIT)
        from_generator = [x async for x in stream]
        result = await g.call.count(2) & BG
        from_bg = [x async for x in await result.get_async()]
        return got, from_generator, from_bg

    assert asyncio.run(main()) == (expected, [0, 1, 2, 3], [0, 1])


def test_async_generators_awaiting_between_items_stream_side_by_side(g):
    # 20 streams of 5 items, 0.2 s apart: one after another they would take 20 s.
    async def one(n):
        return [x["i"] async for x in g.call.async_count(5, pause=0.2)]

    async def main():
        started = time.monotonic()
        results = await asyncio.gather(*(one(n) for n in range(20)))
        return results, time.monotonic() - started

    results, took = asyncio.run(main())
    assert results == [list(range(5))] * 20
    assert took < 10


def test_an_exception_in_a_generator_reaches_the_caller_after_its_items(g):
    seen = []
    with pytest.raises(daffi.RemoteCallError, match="ValueError: boom after 3"):
        for x in g.call.fail_after(3):
            seen.append(x)
    assert seen == [0, 1, 2]

    async def main():
        got = []
        with pytest.raises(daffi.RemoteCallError, match="KeyError: 'async boom after 2'"):
            async for x in g.call.async_fail_after(2):
                got.append(x)
        return got

    assert asyncio.run(main()) == [0, 1]
    # Failing before its first item, it raises at the call, as a plain callback does.
    with pytest.raises(daffi.RemoteCallError, match="ValueError: boom after 0"):
        g.call.fail_after(0) & FG
    with pytest.raises(daffi.RemoteCallError, match="TypeError"):
        g.call.count() & FG


def test_the_timeout_bounds_the_wait_for_each_item(g):
    stream = g.call.slow_after_first(5) & FG(timeout=0.5)
    assert next(stream) == "first"
    started = time.monotonic()
    with pytest.raises(daffi.TimeoutError):
        next(stream)
    assert time.monotonic() - started < 4


def test_closing_a_stream_closes_the_generator(g):
    stream = g.call.endless("closed") & FG
    assert [next(stream) for _ in range(10)] == list(range(1, 11))
    stream.close()
    made, closed = g.call.producer("closed") & FG
    assert closed
    assert made <= 10 + AHEAD
    with pytest.raises(StopIteration):
        next(stream)


def test_dropping_a_stream_closes_the_generator(g):
    with g.call.endless("with") & FG as stream:
        assert next(stream) == 1
    assert (g.call.producer("with") & FG)[1]

    for x in g.call.endless("break"):
        if x == 5:
            break  # the loop held the only reference: the stream is dropped
    made, closed = g.call.producer("break") & FG
    assert closed
    assert made <= 5 + AHEAD


def test_closing_a_stream_cancels_an_async_generator_waiting_for_its_next_item(g):
    async def main():
        stream = await g.call.async_stuck("stuck") & FG
        assert await stream.__anext__() == "only"
        stream.close()
        return await g.call.producer("stuck") & FG(timeout=WAIT)

    assert asyncio.run(main()) == [1, True]


def test_an_endless_stream_read_slowly_runs_only_its_credit_ahead(g):
    stream = g.call.endless("slow") & FG
    for expected in range(1, 11):
        assert next(stream) == expected
        time.sleep(0.05)  # a slow reader, not a wait for an event
    made, closed = g.call.producer("slow", timeout=0) & FG
    assert not closed
    assert 10 < made <= AHEAD
    del stream
    assert (g.call.producer("slow") & FG)[1]


def test_stuck_stream_readers_leave_other_calls_to_the_node_alone(g):
    stuck = [g.call.endless(f"stuck-{i}") & FG for i in range(20)]  # read once, then never
    started = time.monotonic()
    results = [g.call.plain(i) & BG for i in range(200)]
    assert [r.get(timeout=WAIT) for r in results] == [[i, i] for i in range(200)]
    assert sum(g.call.count(1000)) == 999 * 1000 // 2
    assert time.monotonic() - started < WAIT
    for stream in stuck:
        stream.close()
    for i in range(20):
        made, closed = g.call.producer(f"stuck-{i}") & FG
        assert closed and made <= AHEAD


def test_a_callee_killed_mid_stream_ends_the_stream_with_an_error(processes):
    port = free_port()
    with Global(process_name="owner", init_controller=True, host="localhost", port=port) as g:
        streamer = spawn_python(NODES / "streamer.py", port, "join")
        processes.append(streamer)
        g.wait_function("endless", timeout=WAIT)
        stream = g.call.endless("killed") & FG
        assert next(stream) == 1
        streamer.kill()
        started = time.monotonic()
        with pytest.raises(daffi.RemoteStoppedUnexpectedly):
            for _ in stream:  # the items already sent come first
                pass
        assert time.monotonic() - started < 1


READS_A_STUCK_STREAM = """
import sys
from daffi import Global
g = Global(process_name="reader", host="localhost", port=int(sys.argv[1]))
g.wait_function("async_stuck")
stream = iter(g.call.async_stuck("ctrl-c"))
print(next(stream), flush=True)
next(stream)
"""


def test_ctrl_c_stops_a_process_waiting_for_an_item(g, processes, tmp_path):
    script = tmp_path / "reader.py"
    script.write_text(READS_A_STUCK_STREAM)
    reader = spawn_python(script, g.port)
    processes.append(reader)
    assert reader.stdout.readline() == "only\n"
    _, err = interrupt(reader, timeout=WAIT)
    assert reader.returncode != 0
    assert "KeyboardInterrupt" in err
    # The reader left: its stream was cancelled, and the generator closed.
    assert g.call.producer("ctrl-c") & FG(timeout=WAIT) == [1, True]


def test_stream_calls_the_callback_with_each_item_in_order(g):
    assert g.call.collect(range(10_000), "range") & STREAM is None
    assert g.call.collected("range") & FG == list(range(10_000))
    g.call.collect((x * x for x in range(5)), key="generator").stream(timeout=WAIT)
    assert g.call.collected("generator") & FG == [0, 1, 4, 9, 16]
    assert g.call.collect([], "empty") & STREAM(timeout=WAIT) is None
    assert g.call.collected("empty") & FG == []
    # Values that travel pickled cross as items too.
    g.call.collect([2**70, b"\x00"], "pickled") & STREAM
    assert g.call.collected("pickled") & FG == [2**70, b"\x00"]


def test_stream_from_async_code_to_an_async_callback(g):
    async def main():
        await g.call.async_collect([{"n": i} for i in range(20)], "async") & STREAM
        await g.call.collect(iter(["a", "b"]), key="sync-items") & STREAM(timeout=WAIT)

    asyncio.run(main())
    assert g.call.collected("async") & FG == [{"n": i} for i in range(20)]
    assert g.call.collected("sync-items") & FG == ["a", "b"]


def test_stream_takes_items_only_as_far_as_the_callee_took_them(g):
    taken = []

    def items():
        for i in range(2 * AHEAD):
            taken.append(i)
            yield i

    with pytest.raises(daffi.RemoteCallError, match="ValueError: negative item -1"):
        g.call.picky(itertools.chain([1, 2, -1], items()), "picky") & STREAM
    assert g.call.collected("picky") & FG == [1, 2]
    # The items past the failing one that were taken: no more than the credit, less
    # the three before them.
    assert len(taken) <= AHEAD - 3


def test_an_exception_of_the_iterable_stops_the_stream_and_raises(g):
    def items():
        yield 1
        raise LookupError("no more items")

    with pytest.raises(LookupError, match="no more items"):
        g.call.collect(items(), "broken") & STREAM
    assert g.call.collected("broken") & FG == [1]
    with pytest.raises(TypeError, match="first argument"):
        g.call.collect() & STREAM
    with pytest.raises(TypeError):
        g.call.collect(5, "not-iterable") & STREAM
