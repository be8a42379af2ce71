"""Helpers for tests that run real processes talking over real sockets."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

#: The bound on waiting for any event in these tests.
WAIT = 30

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
NODES = HERE / "nodes"
# The nodes' shared modules (`points`) import under the same name here as in them.
sys.path.insert(0, str(NODES))

# The tests press Ctrl-C (SIGINT) as a user at a terminal does. A launcher that ignores
# SIGINT (a background job of a shell without job control) passes that on to its
# children, and a Python child that starts with SIGINT ignored never raises
# KeyboardInterrupt. Caught here instead, it is back to the default in every child
# (`exec` resets a caught signal, never an ignored one).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port():
    """A TCP port free right now on localhost."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def spawn_python(script, *args, cwd=None):
    """Runs `python script args...` with its output piped and unbuffered."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def finish(process, timeout=WAIT):
    """Waits for `process` to exit; its (stdout, stderr)."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{process.args} did not exit within {timeout} s\nstdout:\n{out}\nstderr:\n{err}")


def interrupt(process, timeout=WAIT):
    """Ctrl-C for `process`, then its (stdout, stderr) once it exits."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    return finish(process, timeout)


@pytest.fixture
def processes():
    """Processes a test starts; killed if still running when it ends."""
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="session")
def rust_example():
    """The path of a Rust example of the `daffi` crate, built once (debug profile)."""
    metadata = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    target = Path(json.loads(metadata.stdout)["target_directory"])
    built = set()

    def path(name):
        if name not in built:
            subprocess.run(["cargo", "build", "-q", "-p", "daffi", "--example", name], cwd=REPO, check=True)
            built.add(name)
        return target / "debug" / "examples" / name

    return path
