"""Computations, setups and cleanups for tests/dispy/test_review_dispy.py (a module
the nodes can import: tests/ is on their PYTHONPATH)."""
import os
import time


def cleanup_marks(marker):
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(marker + ".tmp", marker)


def cleanup_dies(marker):
    os._exit(7)


def hold_until(gate, marker):
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(marker + ".tmp", marker)
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def fast(x):
    return x
