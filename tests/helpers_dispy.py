"""Computations, setups and cleanups for the dispy-compatibility tests.

They live in a module the nodes can import (tests/ is on their PYTHONPATH),
and use the names dispy puts in a computation's globals (dispy_node_name,
dispy_provisional_result, ...), which dpool injects on the node.
"""
import os
import time

# ruff: noqa: F821  (dispy_* names and setup's globals are injected on the node)


def where(x):
    return x, dispy_node_name, dispy_node_ip_addr, dispy_job_path, os.getcwd()


def provisional(n):
    for i in range(n):
        dispy_provisional_result(("step", i))
    return ("final", n)


def send_back(name, text):
    with open(name, "w") as f:
        f.write(text)
    return dispy_send_file(name)


def setup_reads(path, marker):
    global data
    with open(path) as f:
        data = f.read().strip()
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    return 0


def cleanup_writes(path, marker):
    with open(marker + ".tmp", "w") as f:
        f.write(data)
    os.replace(marker + ".tmp", marker + ".cleanup")


def uses_setup(x, rendezvous=None):
    """With ``rendezvous`` (a folder), wait (up to 10 s) until two worker
    processes have both started a job, so that both are seen to run."""
    if rendezvous:
        open(os.path.join(rendezvous, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 10
        while len(os.listdir(rendezvous)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    return helper(data, x), os.getpid()


def setup_raises():
    raise RuntimeError("setup broke on purpose")


def setup_two(a, b):
    return 0


def read_file(name):
    with open(name) as f:
        return f.read()


def read_file_where(name):
    with open(name) as f:
        return f.read(), os.getcwd(), dispy_job_path


def nap(seconds, value=None):
    time.sleep(seconds)
    return value


def hold_until(gate, marker):
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def counter_setup(marker):
    with open(marker, "a") as f:
        f.write("setup\n")
    return 0


def fast(x):
    return x
