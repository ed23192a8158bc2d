"""What the benchmarks share.  Import it before dpool: it puts this
repository first on ``sys.path``.  The tasks stay in each benchmark's
``__main__`` (dpool ships them by value; the stdlib's fork pools find them
by reference)."""
import multiprocessing
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CPUS = 2
MP = multiprocessing.get_context("fork")


def clock(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best(fn, repeat=3):
    return min(clock(fn) for _ in range(repeat))


def _bare_worker(task, arg, count):
    # In the benchmark's session, as dpool's workers are in the client's
    # (since 61dcff1; before, each had a session of its own).  Both sides
    # must be alike there: with the kernel's autogroup scheduling (Linux's
    # default, /proc/sys/kernel/sched_autogroup_enabled) each session is one
    # group in the CPUs' fair share, so on a loaded machine a side whose
    # processes have sessions of their own gets more CPU, and the ratio
    # measures the load, not dpool (1.4-2.2 "in dpool's favour" at load
    # 30-50 when its workers had their own sessions and these did not).
    for _ in range(count):
        task(arg)


def bare_processes(task, arg, tasks):
    """Run ``task(arg)`` ``tasks`` times split over CPUS bare processes
    (forked, no pool): the reference for CPU-bound work."""
    procs = [MP.Process(target=_bare_worker, args=(task, arg, tasks // CPUS))
             for _ in range(CPUS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def first_line(read, proc, timeout, interval=0.05):
    """The first line a daemon ``proc`` writes (``read()``: what it wrote so
    far), once it is there (a daemon says where it listens on it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = read()
        if "\n" in text:
            return text.split("\n", 1)[0]
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited: {text}")
        time.sleep(interval)
    raise SystemExit(f"{proc.args} did not start within {timeout} s")


def listen_port(line):
    """The port in "... on HOST:PORT (pid N)"."""
    return int(line.rsplit(" (pid", 1)[0].rsplit(":", 1)[1])


def stop(proc, timeout=30):
    """Stop a daemon as Ctrl-C does (SIGINT); killed if not gone in ``timeout`` s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds():
    """User + system CPU time of this process (all its threads) so far."""
    times = os.times()
    return times.user + times.system
