#!/usr/bin/env python3
"""The memory of an idle node on NATS: `daffi-idle-node` on a fresh `nats-server -js`, a
holder node started 2 s before it (so that the idle node does not take the lease), read
from /proc 8 s after the idle node is ready.

    scripts/idle-nats-rss.py target/release/daffi-idle-node
    scripts/idle-nats-rss.py --smaps /tmp/idle.smaps target/release/daffi-idle-node

NATS_SERVER (default: target/ci-venv/bin/nats-server) names the server; PORT (14322) its
port. How the node binary was written moves its RSS: copy it with `dd bs=4k` to compare
builds on equal terms (a `cp` leaves large folios in the page cache, which the kernel maps
whole around each fault). With --smaps, /proc/PID/smaps is saved there, and the file
offsets of the binary's resident pages (from /proc/PID/pagemap) beside it (.present).
"""
import argparse
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("node", help="the daffi-idle-node program")
    ap.add_argument("--smaps", help="save the idle node's smaps and resident pages here")
    a = ap.parse_args()
    server = os.environ.get("NATS_SERVER", os.path.join(ROOT, "target", "ci-venv", "bin", "nats-server"))
    port = int(os.environ.get("PORT", "14322"))
    store = tempfile.mkdtemp(prefix="idle-nats-")
    srv = subprocess.Popen([server, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes = []
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"nats://127.0.0.1:{port}"

        def node(name):
            p = subprocess.Popen([a.node, "--connect", url, "--name", name],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            nodes.append(p)
            line = p.stdout.readline().strip()
            if line != "ready":
                raise SystemExit(f"{name}: expected ready, got {line!r}")
            return p

        node("holder")
        time.sleep(2)
        idle = node("idle")
        time.sleep(8)
        status = dict(l.split(":", 1) for l in open(f"/proc/{idle.pid}/status"))
        print(" ".join(f"{k}={status[k].strip()}" for k in ("VmRSS", "RssAnon", "RssFile", "Threads")))
        if a.smaps:
            save(idle.pid, os.path.basename(a.node), a.smaps)
    finally:
        for p in nodes:
            p.stdin.close()
            p.wait(10)
        srv.terminate()
        srv.wait(10)
        shutil.rmtree(store, ignore_errors=True)


def save(pid, program, out):
    """smaps to `out`; `perm offset` of each resident page of `program` to `out`.present."""
    shutil.copy(f"/proc/{pid}/smaps", out)
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open(out + ".present", "w") as present:
        for line in open(f"/proc/{pid}/maps"):
            parts = line.split()
            if len(parts) < 6 or os.path.basename(parts[5]) != program:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            offset = int(parts[2], 16)
            pagemap.seek(start // 4096 * 8)
            entries = pagemap.read((end - start) // 4096 * 8)
            for i in range(len(entries) // 8):
                (entry,) = struct.unpack("<Q", entries[i * 8:i * 8 + 8])
                if entry >> 63:
                    present.write(f"{parts[1]} {offset + i * 4096:x}\n")


if __name__ == "__main__":
    main()
