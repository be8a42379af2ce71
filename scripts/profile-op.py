#!/usr/bin/env python3
"""Profile one `daffi-bench` operation with perf, one report per process.

Starts the bench's own roles (`daffi-bench role ...`): a daffi controller, a callee and a
caller (or the floor's relay, server and client with --floor), runs OP once unrecorded as
a warm-up, then runs it again while `perf record -g` samples each process, and prints the
top symbols of each process.

    scripts/profile-op.py '{"op":"one_way","calls":200000}'
    scripts/profile-op.py --floor '{"op":"rate","mode":"pipelined","calls":200000,"in_flight":256}'
    scripts/profile-op.py --floor --threads --cpu '{"op":"latency","calls":20000,"warmup":1000}'
    scripts/profile-op.py --floor --threads --direct --spin-us 200 --cpu '{"op":"latency","calls":20000,"warmup":1000}'
    scripts/profile-op.py --tcp '{"op":"latency","calls":20000,"warmup":1000}'
    scripts/profile-op.py --callees 4 '{"op":"broadcast","calls":10000,"warmup":1000,"nodes":4}'

With --instructions, no perf: each process runs under valgrind's callgrind, and the
script prints the instructions each one executed per call of OP (counted after the
warm-up). Unlike a rate or a CPU time, that count does not move with the machine's
load, so two builds can be compared on a busy machine (rates are ~50x slower there):

    scripts/profile-op.py --instructions '{"op":"rate","mode":"bg","calls":20000,"in_flight":256}'
    scripts/profile-op.py --instructions '{"op":"stream_items","items":20000}'

(A stream's count per call is per item, or per chunk.)

With --nats URL, the caller and callee meet on that nats-server (no controller), and
--floor profiles raw async-nats request-reply through it instead:

    scripts/profile-op.py --nats nats://127.0.0.1:4222 --instructions '{"op":"latency","calls":5000,"warmup":500}'
    scripts/profile-op.py --nats nats://127.0.0.1:4222 --floor --instructions '{"op":"latency","calls":5000,"warmup":500}'

Needs `perf` (software event cpu-clock is enough) or valgrind, and a release build
(`cargo build --release -p daffi-bench`).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAFFI = os.environ.get("DAFFI_BENCH_BIN", os.path.join(ROOT, "target", "release", "daffi-bench"))
# The roles' log filter, e.g. DAFFI_BENCH_LOG=daffi::executor=debug to see hand-offs.
LOG = os.environ.get("DAFFI_BENCH_LOG", "warn")


# A command every role runs under (valgrind, for --instructions).
WRAPPER = []


def role(args):
    p = subprocess.Popen(WRAPPER + [DAFFI, "--log-level", LOG, "role"] + args,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("ready"):
        sys.exit(f"{args[0]}: expected ready, got {line!r}")
    return p, line[len("ready"):].strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("op", help="the JSON command, as the bench sends it")
    ap.add_argument("--floor", action="store_true", help="profile the floor instead")
    ap.add_argument("--direct", action="store_true", help="the floor without batching")
    ap.add_argument("--threads", action="store_true",
                    help="with --floor: the floor on blocking std threads (default: on tokio)")
    ap.add_argument("--spin-us", type=int, default=0, metavar="US",
                    help="with --floor --threads: the client polls for a reply this long before it "
                         "blocks (the spinning floor of A: 200)")
    ap.add_argument("--tcp", action="store_true")
    ap.add_argument("--nats", metavar="URL",
                    help="over the nats-server at URL (with --floor: raw async-nats request-reply)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--callers", action="store_true", help="show call graphs (caller view)")
    ap.add_argument("--repeat", type=int, default=1, help="run OP this many times while recording")
    ap.add_argument("--syscalls", action="store_true",
                    help="with --cpu: also count each process's system calls by name (perf)")
    ap.add_argument("--sched", action="store_true",
                    help="with --cpu: also count each process's wake-ups it makes, the IPIs it sends "
                         "(a wake-up on another, halted vCPU), its migrations and context switches (perf)")
    ap.add_argument("--event", default="cpu-clock",
                    help="the perf event to sample, e.g. syscalls:sys_enter_futex (every one is recorded)")
    ap.add_argument("--controller-linger-us", type=int, metavar="US",
                    help="the controller's linger after a reply (default: the library's; 0: none)")
    ap.add_argument("--callees", type=int, default=1,
                    help="daffi callees to start (4 for a broadcast like scenario D)")
    ap.add_argument("--cpu", action="store_true",
                    help="no perf: print each process's CPU time (user + system) over the run")
    ap.add_argument("--instructions", action="store_true",
                    help="no perf: instructions per call of each process, under callgrind")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="daffi-prof-")
    if a.instructions:
        WRAPPER.extend(["valgrind", "--tool=callgrind", "--quiet", "--max-threads=4000",
                        f"--callgrind-out-file={tmp}/callgrind.%p"])
    listen = "tcp:127.0.0.1:0" if a.tcp else f"unix:{tmp}/s.sock"
    limit = ["--max-frame-size", str(1100 * 1024 * 1024)]
    procs = {}
    if a.nats and a.floor:
        procs["server"], _ = role(["nats-floor-server", "--url", a.nats, "--name", "srv"])
        procs["client"], _ = role(["nats-floor-client", "--url", a.nats, "--server", "srv"])
        driver = procs["client"]
    elif a.nats:
        procs["callee"], _ = role(["callee", "--connect", a.nats, "--name", "callee"] + limit)
        procs["caller"], _ = role(["caller", "--connect", a.nats, "--name", "caller",
                                   "--callees", "callee"] + limit)
        driver = procs["caller"]
    elif a.floor:
        batched = ([] if a.direct else ["--batched"]) + \
            (["--engine", "threads"] if a.threads else [])
        procs["relay"], ep = role(["floor-relay", "--listen", listen] + limit + batched)
        procs["server"], _ = role(["floor-server", "--connect", ep, "--name", "srv"] + limit + batched)
        spin = ["--spin-us", str(a.spin_us)] if a.spin_us else []
        procs["client"], _ = role(["floor-client", "--connect", ep, "--name", "cli",
                                   "--server", "srv"] + limit + batched + spin)
        driver = procs["client"]
    else:
        linger = ([] if a.controller_linger_us is None
                  else ["--linger-us", str(a.controller_linger_us)])
        procs["controller"], ep = role(["controller", "--listen", listen] + limit + linger)
        names = ["callee"] + [f"callee{i}" for i in range(1, a.callees)]
        for n in names:
            procs[n], _ = role(["callee", "--connect", ep, "--name", n] + limit)
        procs["caller"], _ = role(["caller", "--connect", ep, "--name", "caller",
                                   "--callees", ",".join(names)] + limit)
        driver = procs["caller"]

    def run():
        driver.stdin.write(a.op + "\n")
        driver.stdin.flush()
        return driver.stdout.readline().strip()

    print("warm-up:", run())
    if a.instructions:
        count_instructions(procs, run, a, tmp)
        return
    if a.cpu:
        tick = os.sysconf("SC_CLK_TCK")

        def stat(pid):
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()

        def cpu(pid):
            return sum(cpu_split(pid))

        def cpu_split(pid):
            """User and system time, in seconds."""
            fields = stat(pid)
            return int(fields[11]) / tick, int(fields[12]) / tick

        def faults(pid):
            """Minor page faults: fresh memory touched (what a reused buffer saves)."""
            return int(stat(pid)[7])

        def switches(pid):
            """Context switches of each live thread, summed by thread name."""
            by_name = {}
            for task in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{task}/comm") as f:
                        comm = f.read().strip()
                    with open(f"/proc/{pid}/task/{task}/status") as f:
                        n = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
                except FileNotFoundError:
                    continue
                key = comm if not os.environ.get("BY_TID") else f"{comm}/{task}"
                by_name[key] = by_name.get(key, 0) + n
            return by_name

        before = {name: (cpu_split(p.pid), switches(p.pid), faults(p.pid))
                  for name, p in procs.items()}
        counters = {}
        if a.syscalls or a.sched:
            names = []
            if a.syscalls:
                names += [f"syscalls:sys_enter_{s}" for s in
                          ["read", "write", "writev", "recvfrom", "sendto", "sendmsg", "recvmsg",
                           "epoll_wait", "futex", "sched_yield"]]
            if a.sched:
                names += ["sched:sched_wakeup", "ipi:ipi_send_cpu", "cpu-migrations",
                          "context-switches"]
            events = ",".join(names)
            for name, p in procs.items():
                out = os.path.join(tmp, f"{name}.stat")
                ctl, ack = os.path.join(tmp, f"{name}.ctl"), os.path.join(tmp, f"{name}.ack")
                os.mkfifo(ctl)
                os.mkfifo(ack)
                # Started with its counters off: attaching to every thread takes a while,
                # and the op must not begin before perf counts.
                counters[name] = (out, subprocess.Popen(
                    ["perf", "stat", "-e", events, "-p", str(p.pid), "-o", out, "-D", "-1",
                     "--control", f"fifo:{ctl},{ack}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for name in counters:
                # Opening the FIFOs waits for perf to open them; the ack, for the counters.
                with open(os.path.join(tmp, f"{name}.ctl"), "w") as ctl, \
                        open(os.path.join(tmp, f"{name}.ack")) as ack:
                    ctl.write("enable\n")
                    ctl.flush()
                    ack.readline()
        for _ in range(a.repeat):
            print("measured:", run())
        for name, (out, perf) in counters.items():
            perf.send_signal(signal.SIGINT)
            perf.wait()
            with open(out) as f:
                rows = [l.split() for l in f
                        if any(e in l for e in ("syscalls:", "sched:", "ipi:", "cpu-migrations",
                                                "context-switches"))]

            def label(r):
                word = next(w for w in r if any(k in w for k in (":", "cpu-migrations",
                                                                 "context-switches")))
                return word.split("sys_enter_")[-1]

            # "<not counted>" for a syscall the process never made.
            counts = ((label(r), r[0] if r[0].replace(",", "").isdigit() else "0") for r in rows)
            print(f"{name:>12}: " + ", ".join(f"{call} {n}" for call, n in counts))
        for name, p in procs.items():
            now, then = switches(p.pid), before[name][1]
            diff = {t: n - then.get(t, 0) for t, n in now.items() if n != then.get(t, 0)}
            detail = ", ".join(f"{t} {n}" for t, n in sorted(diff.items(), key=lambda x: -x[1]))
            user, system = (now - then for now, then in zip(cpu_split(p.pid), before[name][0]))
            print(f"{name:>12}: {user + system:.2f} s of CPU ({user:.2f} user, {system:.2f} system), "
                  f"{faults(p.pid) - before[name][2]} page faults, "
                  f"{sum(diff.values())} context switches (threads alive at the end: {detail})")
        for p in procs.values():
            p.stdin.close()
            p.wait()
        return
    data = {}
    perfs = {}
    for name, p in procs.items():
        data[name] = os.path.join(tmp, f"{name}.data")
        perfs[name] = subprocess.Popen(
            ["perf", "record", "-e", a.event] + (["-F", "4000"] if a.event == "cpu-clock" else []) + ["-g", "-q",
             "-p", str(p.pid), "-o", data[name]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(a.repeat):
        print("measured:", run())
    for p in perfs.values():
        p.send_signal(signal.SIGINT)
        p.wait()
    for p in procs.values():
        p.stdin.close()
        p.wait()
    for name in procs:
        print(f"\n==================== {name} ====================")
        cmd = ["perf", "report", "-i", data[name], "--stdio", "--sort", os.environ.get("SORT", "sym"), "-n"]
        cmd += ["--children", "-g", "caller,0.5,callee,function,percent"] if a.callers \
            else ["--no-children", "-g", "none"]
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        lines = [l for l in out.splitlines() if l.strip() and (not l.startswith("#") or l.startswith("# Samples"))]
        print("\n".join(lines[: a.top if not a.callers else 400]))


def count_instructions(procs, run, a, tmp):
    """Zeroes each process's callgrind counters, runs OP, dumps them, and prints the
    instructions per call (the op's "calls" times --repeat)."""
    def control(command):
        for p in procs.values():
            subprocess.run(["callgrind_control", command, str(p.pid)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    control("-z")
    for _ in range(a.repeat):
        print("measured:", run())
    control("-d")
    op = json.loads(a.op)
    # A stream counts its items (or chunks) as its calls.
    calls = next((op[k] for k in ("calls", "items", "chunks") if k in op), 1) * a.repeat
    total = 0
    for name, p in procs.items():
        dumps = [f for f in os.listdir(tmp) if f.startswith(f"callgrind.{p.pid}.")]
        last = max(dumps, key=lambda f: int(f.rsplit(".", 1)[1]))
        with open(os.path.join(tmp, last)) as f:
            counted = next(int(l.split()[1]) for l in f if l.startswith("summary:"))
        total += counted
        print(f"{name:>12}: {counted / calls:10.0f} instructions per call")
    print(f"{'all':>12}: {total / calls:10.0f} instructions per call")
    # The controller (or relay) last: the others would log that they lost it.
    for p in reversed(list(procs.values())):
        p.stdin.close()
        p.wait()


if __name__ == "__main__":
    main()
