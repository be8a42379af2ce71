"""The examples in examples/python/, run as they are."""

import subprocess

from conftest import REPO, WAIT, finish, free_port, interrupt, spawn_python

EXAMPLES = REPO / "examples" / "python"


def test_getting_started_scripts_print_what_the_readme_says(processes, tmp_path):
    # The two scripts of the Python daffi's "Getting started", unchanged (port 8888).
    proc1 = spawn_python(EXAMPLES / "proc1.py", cwd=tmp_path)
    proc2 = spawn_python(EXAMPLES / "proc2.py", cwd=tmp_path)
    processes += [proc1, proc2]
    # proc1 makes 10 rounds with 5 s pauses, then stops.
    out1, err1 = finish(proc1, timeout=10 * 5 + WAIT)
    assert proc1.returncode == 0, err1
    assert out1 == "Calculated delta = 7\n" * 10
    # proc2 waits forever (`await g.join_async()`) until Ctrl-C.
    out2, err2 = interrupt(proc2)
    assert "KeyboardInterrupt" in err2
    lines = out2.splitlines()
    assert lines.count("Func2 has been triggered!") == 10, out2
    assert lines.count("Calculated sum is 10") == 5, out2
    assert len(lines) == 15, out2


def test_a_rust_node_and_a_python_node_call_each_other(processes, rust_example):
    rust = rust_example("mixed")
    port = free_port()
    python_node = spawn_python(EXAMPLES / "mixed.py", port)
    processes.append(python_node)
    rust_node = subprocess.Popen(
        [str(rust), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    processes.append(rust_node)
    py_out, py_err = finish(python_node)
    rust_out, rust_err = finish(rust_node)
    assert python_node.returncode == 0, py_err
    assert rust_node.returncode == 0, rust_err
    assert rust_out.splitlines() == [
        "rust-node: py_mul(6, 7) = 42",
        "rust-node: py_scale(values=[1.0, 2.5], factor=2.0) = [2.0, 5.0]",
        "rust-node: py_fail raised: callback `py_fail` on process `python-node` failed: "
        "ValueError: boom from Python",
        "rust-node: py_squares(4) streamed [0, 1, 4, 9]",
        'rust-node: streamed [a, b, c] to py_record, which got ["a", "b", "c"]',
    ]
    assert py_out.splitlines() == [
        "python-node: rust_add(2, 3) = 5",
        "python-node: rust_greet(name='Python', punctuation='!') = 'Hello from Rust, Python!'",
        "python-node: rust_checked_div(1, 0) raised: callback `rust_checked_div` on process "
        "`rust-node` failed: division by zero",
        "python-node: rust_add(Point(1, 2), 3) raised: callback `rust_add` on process `rust-node` "
        "rejected its arguments: argument 1 (`a`) of rust_add(a: i64, b: i64): expected an "
        "integer, got a pickled Python object of type `__main__.Point`, which only Python nodes "
        "read (send a value MessagePack expresses: None, bool, int, float, str, bytes, list, dict)",
        "python-node: rust_countdown(3) streamed [3, 2, 1]",
        "python-node: rust_sum(range(101)) & STREAM = 5050",
    ]
