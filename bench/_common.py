"""What the benchmarks share.  Import it before dpool: it puts this
repository (or the tree named by ``DPOOL_BENCH_TREE``: another tree's
sources measured with this tree's benchmark, see bench_large_ab.py) first
on ``sys.path``.  The tasks stay in each benchmark's
``__main__`` (dpool ships them by value; the stdlib's fork pools find them
by reference)."""
import multiprocessing
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("DPOOL_BENCH_TREE") or ROOT)

CPUS = 2
MP = multiprocessing.get_context("fork")


def clock(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def settle(client, call, timeout=10.0):
    """Warm up until a lone call takes its steady path: via a dpool-node,
    once the node's channel is open and lent (the calling thread then talks
    to a worker of its session; ``TcpLine.on_chan``, a debug attribute,
    docs/performance.md); at once locally or when no channel will come
    (TLS, refused).  ``call()`` makes one lone call between looks (an idle
    moment: the channel opens at one).  Returns the calls made and the
    seconds it took, or None for the seconds if no channel was lent within
    ``timeout`` (a client that never opens one).  The channel opens 40-140
    ms after the first call's answer at load 12 (docs/performance.md)."""
    start, made = time.monotonic(), 0
    while time.monotonic() - start < timeout:
        line = client._direct
        chan = getattr(line, "chan", None)
        if line is None and made >= 20 or line is not None and (
                chan is None or chan.refused or client.ssl is not None or line.on_chan):
            return made, time.monotonic() - start  # (no direct line; local; no channel; lent)
        call()
        made += 1
        time.sleep(0.001)  # (idle a moment: the client's loop thread opens it then)
    return made, None


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


def start_node_daemon(secret, cpus, prefix="dpool-bench-"):
    """A ``dpool-node`` on 127.0.0.1, port 0, with ``secret`` and a fresh
    DPOOL_HOME: ``(proc, port, env)`` (``env``: the node's, for its clients
    too).  One that does not start is stopped and its home removed (a
    SystemExit says why); :func:`stop_node_daemon` stops a started one."""
    import tempfile

    home = tempfile.mkdtemp(prefix=prefix)
    env = dict(os.environ, DPOOL_SECRET=secret, DPOOL_HOME=home)
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "dpool.daemons.node", "--port", "0",
                                 "--cpus", str(cpus), "--loglevel", "WARNING"],
                                stdout=subprocess.PIPE, env=env, text=True)
        line = proc.stdout.readline()
        if " on " not in line:
            raise SystemExit(f"dpool-node did not start (exit status {proc.poll()}): {line!r}")
        return proc, listen_port(line.rstrip()), env
    except BaseException:
        stop_node_daemon(proc, env)
        raise


def stop_node_daemon(proc, env):
    """Stop a node of :func:`start_node_daemon` (if ``proc``) and remove its home."""
    import shutil

    try:
        if proc is not None:
            if proc.poll() is None:
                stop(proc)
            if getattr(proc, "stdout", None) is not None:
                proc.stdout.close()
    finally:
        if env.get("DPOOL_HOME"):
            shutil.rmtree(env["DPOOL_HOME"], ignore_errors=True)
