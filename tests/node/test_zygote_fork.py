"""The embedded node's zygote forked from the client (issue 13: start-up).

A client created on the main thread of a process that has no other thread
forks its zygote at once instead of starting a fresh interpreter for it
(tens of milliseconds of start-up and imports the first task waited for).
Each test runs a small program in a fresh interpreter: pytest's own
process has a watchdog thread (faulthandler_timeout), so a client made
here takes the usual way (a fresh interpreter), as it must with threads.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRELUDE = """
import json, os, signal, sys, threading
import psutil
from dpool.futures import Executor
from dpool.core.client import Client

def children():
    return [p.pid for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]

def worker_view(_=None):
    return {"pid": os.getpid(), "usr1_default": signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL,
            "stdin": os.read(0, 10).decode()}
"""


def run(body, timeout=60):
    """Run PRELUDE + body in a fresh interpreter; its last stdout line as JSON."""
    code = PRELUDE + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("DPOOL_ZYGOTE", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_single_threaded_client_forks_its_zygote_and_leaves_no_process():
    out = run("""
        signal.signal(signal.SIGUSR1, lambda *a: None)  # the user's: not the workers'
        ex = Executor(2)
        forked = ex._client.embedded.zygote.forked
        views = [ex.submit(worker_view).result(30) for _ in range(4)]
        during = children()
        ex.shutdown()
        print(json.dumps({"forked": forked, "views": views, "during": during,
                          "after": children()}))
    """)
    assert out["forked"] is True
    assert all(v["usr1_default"] for v in out["views"]), out["views"]
    assert all(v["stdin"] == "" for v in out["views"]), out["views"]  # /dev/null
    assert len(out["during"]) >= 2  # the zygote and its workers
    assert out["after"] == []


def test_pools_made_one_after_another_all_fork_and_leave_no_process():
    """The loop thread of the pool closed just before may still be listed by
    the kernel for a moment: it is waited for, not taken as a thread."""
    out = run("""
        import dpool
        forked = []
        for i in range(3):
            with Executor(1) as ex:
                forked.append(ex._client.embedded.zygote.forked)
                assert ex.submit(abs, -i).result(30) == i
            with dpool.Pool(1) as pool:
                forked.append(pool._client.embedded.zygote.forked)
                assert pool.apply(abs, (-i,)) == i
        print(json.dumps({"forked": forked, "after": children()}))
    """)
    assert out["forked"] == [True] * 6
    assert out["after"] == []


def test_with_another_thread_the_zygote_is_a_fresh_interpreter():
    out = run("""
        stop = threading.Event()
        other = threading.Thread(target=stop.wait)
        other.start()
        ex = Executor(1)
        forked = ex._client.embedded.zygote.forked
        result = ex.submit(abs, -5).result(30)
        ex.shutdown()
        stop.set()
        other.join()
        print(json.dumps({"forked": forked, "result": result, "after": children()}))
    """)
    assert out == {"forked": False, "result": 5, "after": []}


def test_a_forked_zygote_that_dies_at_once_is_replaced():
    """Start-up still works when the forked zygote fails: the node starts a
    new zygote (a fresh interpreter) and the jobs run."""
    out = run("""
        from dpool.node import zygote
        zygote._forked_main = lambda ctl, parent: os._exit(7)  # (runs in the fork only)
        ex = Executor(2)
        results = [ex.submit(abs, -i).result(30) for i in range(4)]
        now = ex._client.embedded.zygote.forked
        ex.shutdown()
        print(json.dumps({"results": results, "forked_now": now, "after": children()}))
    """)
    assert out == {"results": [0, 1, 2, 3], "forked_now": False, "after": []}


def test_a_client_closed_without_being_started_leaves_no_process():
    out = run("""
        client = Client(None, cpus=1)
        forked = client._zygote is not None and client._zygote.forked
        client.close()
        print(json.dumps({"forked": forked, "after": children()}))
    """)
    assert out == {"forked": True, "after": []}


def test_a_bad_cpu_count_fails_start_up_and_leaves_no_process():
    out = run("""
        try:
            Client(None, cpus="many").start()
        except Exception as exc:
            error = type(exc).__name__
        else:
            error = None
        print(json.dumps({"error": error, "after": children()}))
    """)
    assert out["error"] is not None
    assert out["after"] == []


def test_workers_forked_from_a_client_with_numpy_draw_different_numbers():
    pytest.importorskip("numpy")
    out = run("""
        import time
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = "1"  # (else its BLAS threads leave the zygote to exec)
        import numpy as np

        np.random.random()  # its global random state made (lazily) before the fork

        def draw(_):
            time.sleep(0.05)  # (both workers take jobs)
            return os.getpid(), float(np.random.random())

        with Executor(2) as ex:
            forked = ex._client.embedded.zygote.forked
            draws = list(ex.map(draw, range(8)))
        first = {}
        for pid, x in draws:
            first.setdefault(pid, x)
        print(json.dumps({"forked": forked, "first": sorted(first.values())}))
    """)
    assert out["forked"] is True
    assert len(out["first"]) == 2, out  # two workers answered
    assert out["first"][0] != out["first"][1]


def test_the_environment_variable_keeps_the_fresh_interpreter():
    out = run("""
        os.environ["DPOOL_ZYGOTE"] = "exec"
        with Executor(1) as ex:
            forked = ex._client.embedded.zygote.forked
            result = ex.submit(abs, -3).result(30)
        print(json.dumps({"forked": forked, "result": result, "after": children()}))
    """)
    assert out == {"forked": False, "result": 3, "after": []}


def test_the_clients_pipes_and_sockets_are_not_held_by_the_forked_zygote():
    """A pipe's write end or a listening socket the client had when it made
    the pool, and closed afterwards, is closed: the reader sees end of file
    and the port is free again, as with a fresh interpreter (which gets
    none of them), not kept open by the zygote and every worker."""
    out = run("""
        import socket
        r, w = os.pipe()
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with Executor(1) as ex:
            forked = ex._client.embedded.zygote.forked
            assert ex.submit(abs, -1).result(30) == 1
            os.close(w)
            server.close()
            os.set_blocking(r, False)
            try:
                eof = os.read(r, 1) == b""
            except BlockingIOError:  # a write end still open elsewhere
                eof = False
            again = socket.socket()
            try:
                again.bind(("127.0.0.1", port))
                again.listen()
                free = True
            except OSError:
                free = False
            again.close()
        print(json.dumps({"forked": forked, "eof": eof, "port_free": free}))
    """)
    assert out == {"forked": True, "eof": True, "port_free": True}


def test_a_worker_uses_the_clients_multiprocessing_resource_tracker():
    """The client's resource tracker (a pipe) stays usable in its forked
    workers, as in ``fork`` children: a task's shared memory registers with
    it, without a warning that the tracker died and a new one started."""
    out = run("""
        import warnings
        from multiprocessing import resource_tracker, shared_memory

        resource_tracker.ensure_running()

        def shm(_):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mem = shared_memory.SharedMemory(create=True, size=16)
                mem.close()
                mem.unlink()
            return [str(w.message) for w in caught]

        with Executor(1) as ex:
            forked = ex._client.embedded.zygote.forked
            caught = ex.submit(shm, 0).result(30)
        print(json.dumps({"forked": forked, "warnings": caught}))
    """)
    assert out == {"forked": True, "warnings": []}
