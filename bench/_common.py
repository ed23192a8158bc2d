"""What the benchmarks share.  Import it before dpool: it puts this
repository first on ``sys.path``.  The tasks stay in each benchmark's
``__main__`` (dpool ships them by value; the stdlib's fork pools find them
by reference)."""
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CPUS = 2
MP = multiprocessing.get_context("fork")


def clock(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best(fn, repeat=3):
    return min(clock(fn) for _ in range(repeat))
