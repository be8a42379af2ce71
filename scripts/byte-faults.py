#!/usr/bin/env python3
"""Page faults per byte-type call, in the order scenario C runs them.

Starts the bench's own roles (a daffi controller, a callee and a caller, as
`profile-op.py` does), then runs C's byte-type sequence at 64 MiB (a plain argument,
the echoes, then the results) REPS times, and prints each call's MiB/s with the page
faults the caller and the callee took during it: fresh memory touched, which is what a
reused buffer saves. An echo's caller count includes the 16,385 of the bench making its
payload (before the timing).

    scripts/byte-faults.py [REPS]
    DAFFI_BENCH_BIN=/path/to/daffi-bench scripts/byte-faults.py 3

Needs a release build (`cargo build --release -p daffi-bench`) and Linux (/proc).
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAFFI = os.environ.get("DAFFI_BENCH_BIN", os.path.join(ROOT, "target", "release", "daffi-bench"))
BYTES = 64 << 20
OPS = [("echo", k) for k in ["blob", "vec", "byte_buf", "bytes"]] + \
      [("result", k) for k in ["blob", "fresh_blob", "vec", "byte_buf", "bytes", "static_slice"]]


def role(args):
    p = subprocess.Popen([DAFFI, "--log-level", "error", "role"] + args,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("ready"):
        sys.exit(f"{args[0]}: expected ready, got {line!r}")
    return p, line[len("ready"):].strip()


def faults(p):
    """Minor page faults of process `p` so far."""
    with open(f"/proc/{p.pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    tmp = tempfile.mkdtemp(prefix="daffi-faults-")
    limit = ["--max-frame-size", str(1100 * 1024 * 1024)]
    procs = []
    try:
        controller, ep = role(["controller", "--listen", f"unix:{tmp}/s.sock"] + limit)
        procs.append(controller)
        callee, _ = role(["callee", "--connect", ep, "--name", "callee"] + limit)
        procs.append(callee)
        caller, _ = role(["caller", "--connect", ep, "--name", "caller",
                          "--callees", "callee"] + limit)
        procs.append(caller)

        def run(op):
            caller.stdin.write(json.dumps(op) + "\n")
            caller.stdin.flush()
            answer = json.loads(caller.stdout.readline())
            if "Ok" not in answer:
                sys.exit(f"{op}: {answer}")
            return answer["Ok"]["mib_per_s"]

        for rep in range(reps):
            run({"op": "blob", "bytes": BYTES})
            for what, kind in OPS:
                before = faults(caller), faults(callee)
                mib_s = run({"op": what, "kind": kind, "bytes": BYTES})
                print(f"{rep} {what:6} {kind:12} {mib_s:8.0f} MiB/s  page faults: "
                      f"caller +{faults(caller) - before[0]:6}  callee +{faults(callee) - before[1]:6}")
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
