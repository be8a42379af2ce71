#!/usr/bin/env python3
"""The Python scenario: a Python caller calls a Python callee `echo(x)` through a
controller/router process (three processes), with daffi-rs (crates/daffi-py) and with the
Python daffi 3.0.1 from PyPI, in the same run.

    python3 scripts/python-bench.py            # builds both venvs under target/ first

Measures, for each: the round trip p50 and p99 of sequential calls (one in flight),
calls/s with 256 in flight (256 asyncio tasks, each awaiting one call at a time), and
the CPU time per call of the three processes together over the caller's run (steadier
than calls/s on a shared machine, where calls/s follows the CPU left to the run). The
venvs: target/bench-venv (`pip install crates/daffi-py`, a release build) and
target/daffi3-venv (`pip install daffi==3.0.1`). Over TCP on localhost.
"""

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = REPO / "target" / "bench-venv"
THEIRS = REPO / "target" / "daffi3-venv"
IN_FLIGHT = 256
#: Calls made by this caller process (for the CPU time per call).
calls_made = 0


def echo(x):
    return x


# ---- roles: daffi-rs (the Python daffi's API) ----------------------------------------


def ours_controller(port):
    from daffi import Global

    g = Global(process_name="controller", init_controller=True, init_node=False, host="127.0.0.1", port=port)
    ready()
    g.join()


def ours_callee(port):
    from daffi import Global, callback

    callback(echo)
    g = Global(process_name="callee", host="127.0.0.1", port=port)
    ready()
    g.join()


def ours_caller(port, rounds, seconds):
    from daffi import FG, Global

    g = Global(process_name="caller", host="127.0.0.1", port=port)
    g.wait_function("echo", timeout=30)

    def one(i):
        return g.call.echo(i) & FG

    async def many(i):
        return await g.call.echo(i).fg_async()

    report(one, many, rounds, seconds)
    g.stop()


# ---- roles: the Python daffi 3.0.1 -----------------------------------------------------


def theirs_controller(port):
    from daffi import Router

    router = Router(app_name="router", host="127.0.0.1", port=port)
    router.start()
    ready()
    router.join()


def theirs_callee(port):
    from daffi import Client, callback

    callback(echo)
    client = Client(app_name="callee", host="127.0.0.1", port=port)
    client.connect()
    ready()
    client.join()


def theirs_caller(port, rounds, seconds):
    from daffi import Client
    from daffi.aio import AsyncClient

    client = Client(app_name="caller", host="127.0.0.1", port=port)
    conn = client.connect()
    conn.wait_for_members("callee", timeout=30, interval=0.05)

    def one(i):
        return conn.rpc(timeout=30).echo(i)

    async def main():
        aclient = AsyncClient(app_name="async-caller", host="127.0.0.1", port=port)
        aconn = await aclient.connect()

        async def many(i):
            return await aconn.rpc(timeout=30).echo(i)

        result = await measure_in_flight(many, seconds)
        await aclient.stop()
        return result

    latency = measure_round_trip(one, rounds)
    print(json.dumps({**latency, "calls_per_s": asyncio.run(main()), **caller_cpu()}), flush=True)
    client.stop()


# ---- measuring ------------------------------------------------------------------------


def measure_round_trip(one, rounds):
    global calls_made
    calls_made += 200 + rounds
    for i in range(200):  # warm up
        assert one(i) == i
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        assert one(i) == i
        times.append(time.perf_counter() - started)
    times.sort()
    return {
        "p50_us": statistics.median(times) * 1e6,
        "p99_us": times[int(len(times) * 0.99)] * 1e6,
    }


async def measure_in_flight(many, seconds):
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(w):
        nonlocal done
        i = w
        while time.perf_counter() < deadline:
            assert await many(i) == i
            done += 1
            i += IN_FLIGHT

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(IN_FLIGHT)))
    global calls_made
    calls_made += done
    return done / (time.perf_counter() - started)


def report(one, many, rounds, seconds):
    latency = measure_round_trip(one, rounds)
    calls_per_s = asyncio.run(measure_in_flight(many, seconds))
    print(json.dumps({**latency, "calls_per_s": calls_per_s, **caller_cpu()}), flush=True)


def caller_cpu():
    """The calls this caller made and the CPU seconds it used (all its threads)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return {"calls": calls_made, "caller_cpu_s": used.ru_utime + used.ru_stime}


def ready():
    print("ready", flush=True)


# ---- the driver -----------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_venvs():
    if not (OURS / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(OURS)], check=True)
        subprocess.run([OURS / "bin" / "pip", "install", "-q", str(REPO / "crates" / "daffi-py")], check=True)
    if not (THEIRS / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(THEIRS)], check=True)
        subprocess.run([THEIRS / "bin" / "pip", "install", "-q", "daffi==3.0.1"], check=True)


def cpu_seconds(pid):
    """The CPU seconds process `pid` used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_system(system, venv, rounds, seconds):
    python = str(venv / "bin" / "python")
    port = free_port()
    started = []
    try:
        for role in ("controller", "callee"):
            p = subprocess.Popen([python, __file__, "--role", f"{system}_{role}", "--port", str(port)],
                                 stdout=subprocess.PIPE, text=True)
            started.append(p)
            if p.stdout.readline() != "ready\n":
                raise SystemExit(f"{system} {role} did not start")
        servers_before = sum(cpu_seconds(p.pid) for p in started)
        caller = subprocess.run(
            [python, __file__, "--role", f"{system}_caller", "--port", str(port),
             "--rounds", str(rounds), "--seconds", str(seconds)],
            stdout=subprocess.PIPE, text=True, check=True, timeout=300,
        )
        result = json.loads(caller.stdout.strip().splitlines()[-1])
        servers = sum(cpu_seconds(p.pid) for p in started) - servers_before
        result["cpu_us_per_call"] = (result["caller_cpu_s"] + servers) / result["calls"] * 1e6
        return result
    finally:
        for p in started:
            p.kill()
            p.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role")
    parser.add_argument("--port", type=int)
    parser.add_argument("--rounds", type=int, default=5000, help="sequential calls timed")
    parser.add_argument("--seconds", type=float, default=5.0, help="time with 256 in flight")
    args = parser.parse_args()
    if args.role:
        role = globals()[args.role]
        if args.role.endswith("_caller"):
            role(args.port, args.rounds, args.seconds)
        else:
            role(args.port)
        return
    ensure_venvs()
    results = {
        "daffi-rs": run_system("ours", OURS, args.rounds, args.seconds),
        "Python daffi 3.0.1": run_system("theirs", THEIRS, args.rounds, args.seconds),
    }
    print(f"{'':20} {'p50 us':>9} {'p99 us':>9} {'calls/s (256 in flight)':>24} {'CPU us/call':>12}")
    for name, r in results.items():
        print(f"{name:20} {r['p50_us']:9.1f} {r['p99_us']:9.1f} {r['calls_per_s']:24.0f} "
              f"{r['cpu_us_per_call']:12.1f}")
    ours, theirs = results["daffi-rs"], results["Python daffi 3.0.1"]
    print(f"ratios: calls/s x{ours['calls_per_s'] / theirs['calls_per_s']:.2f}, "
          f"p50 x{theirs['p50_us'] / ours['p50_us']:.2f} lower, "
          f"CPU per call x{theirs['cpu_us_per_call'] / ours['cpu_us_per_call']:.2f} lower")


if __name__ == "__main__":
    main()
