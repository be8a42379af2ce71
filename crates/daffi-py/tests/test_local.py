"""One process: Ctrl-C while waiting, the callback class's single instance, stop."""

import sys

import pytest

import daffi
from daffi import Global, callback
from conftest import WAIT, interrupt, spawn_python

WAITS_FOREVER = """
import sys
from daffi import Global
g = Global(process_name="waiter", init_controller=True, unix_sock_path=sys.argv[1])
print("waiting", flush=True)
{wait}
"""


@pytest.mark.parametrize("wait", ["g.join()", "g.wait_process('never')", "g.wait_function('never')"])
def test_ctrl_c_stops_a_waiting_process(processes, tmp_path, wait):
    script = tmp_path / "waiter.py"
    script.write_text(WAITS_FOREVER.format(wait=wait))
    waiter = spawn_python(script, tmp_path / "daffi.sock")
    processes.append(waiter)
    assert waiter.stdout.readline() == "waiting\n"
    _, err = interrupt(waiter, timeout=WAIT)
    assert waiter.returncode != 0
    assert "KeyboardInterrupt" in err


def test_a_callback_class_has_one_instance():
    @callback
    class Single:
        def method(self):
            return 1

    Single()
    with pytest.raises(daffi.InitializationError, match="one instance"):
        Single()


def test_a_stopped_global_refuses_calls(tmp_path):
    with Global(init_controller=True, unix_sock_path=tmp_path / "daffi.sock") as g:
        assert g.process_name.startswith("node-")
    with pytest.raises(daffi.GlobalContextError):
        g.call.anything() & daffi.FG
    g.stop()  # again: nothing to do


def test_a_taken_address_fails_to_start(tmp_path):
    path = tmp_path / "daffi.sock"
    with Global(init_controller=True, unix_sock_path=path):
        with pytest.raises(daffi.InitializationError):
            Global(init_controller=True, unix_sock_path=path)


SERVES_A_LONG_CALL = """
import sys, time
from daffi import Global, callback

@callback
def long_one():
    print("called", flush=True)
    time.sleep(60)

g = Global(process_name="server", init_controller=True, unix_sock_path=sys.argv[1])
g.join()
"""


def test_a_call_in_flight_when_the_callee_dies_raises(processes, tmp_path):
    script = tmp_path / "server.py"
    script.write_text(SERVES_A_LONG_CALL)
    path = tmp_path / "daffi.sock"
    server = spawn_python(script, path)
    processes.append(server)
    with Global(process_name="caller", unix_sock_path=path) as g:
        g.wait_function("long_one", timeout=WAIT)
        result = g.call.long_one() & daffi.BG
        assert server.stdout.readline() == "called\n"
        server.kill()
        with pytest.raises(daffi.RemoteStoppedUnexpectedly):
            result.get(timeout=WAIT)
