"""Review of the public APIs: each test pins a bug found by comparing
dpool.futures.Executor / dpool.Pool / dpool.JobCluster with the stdlib or
dispy."""
import gc
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest

import conformance_helpers as h
import dpool
from conftest import poll_for
from dpool.errors import BrokenCluster


def _threads_named(name):
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def test_shutdown_without_wait_finishes_the_work_before_the_interpreter_exits(tmp_path):
    # ProcessPoolExecutor: the submitted work still runs when the program
    # ends right after shutdown(wait=False).  dpool's closing thread was a
    # daemon, so the work was dropped at exit.
    out = tmp_path / "out"
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(f"""
        from dpool.futures import Executor

        def work(path):
            import time
            time.sleep(0.3)
            open(path, "w").write("done")

        if __name__ == "__main__":
            ex = Executor(1)
            ex.submit(work, {str(out)!r})
            ex.shutdown(wait=False)
    """))
    subprocess.run([sys.executable, str(script)], timeout=30, check=True, cwd=tmp_path)
    assert out.read_text() == "done"


def test_a_forgotten_pool_with_callbacks_stops_its_callback_thread():
    before = len(_threads_named("dpool-pool-callbacks"))
    pool = dpool.Pool(1)
    seen = []
    pool.apply_async(h.square, (3,), callback=seen.append).get(5)
    assert seen == [9]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del pool
        gc.collect()
    poll_for(lambda: len(_threads_named("dpool-pool-callbacks")) == before, 5,
             message="the callback thread to end")


def test_a_closed_pool_dropped_without_join_releases_its_workers():
    # multiprocessing: a pool closed, never joined and then dropped is
    # cleaned up by its finalizer; dpool kept the client and the node.
    pool = dpool.Pool(1)
    assert pool.apply(h.square, (2,)) == 4
    client = pool._client
    pool.close()
    del pool
    gc.collect()
    poll_for(lambda: client.closed and not client._thread.thread.is_alive(), 5,
             message="the client to close")


def test_imap_on_a_broken_pool_raises_broken_cluster():
    # apply/map raise BrokenCluster (docs: difference 5); imap said
    # CancelledError("the pool was terminated"), which it was not.
    pool = dpool.Pool(1, initializer=h.failing_initializer)
    try:
        with pytest.raises(BrokenCluster, match="initializer"):
            pool.apply_async(h.square, (2,)).get(10)
        it = pool.imap(h.square, range(3))
        with pytest.raises(BrokenCluster, match="initializer"):
            it.next(5)
    finally:
        pool.terminate()
        pool.join()


def test_recover_jobs_timeout_zero_does_not_wait_for_a_silent_node(tmp_path):
    # timeout=0 ("collect what is there now") waited the full 10 s connect
    # timeout for a node that accepts but does not answer (0.0 or 10.0 == 10.0).
    import json
    import socket
    import time

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        path = tmp_path / "_dispy_recover"
        path.write_text(json.dumps({"dpool_recover": 1}) + "\n" + json.dumps(
            {"node": ["127.0.0.1", server.getsockname()[1]], "token": "ab",
             "secret": b"s".hex()}) + "\n")
        start = time.monotonic()
        assert dpool.recover_jobs(str(path), timeout=0) == []
        assert time.monotonic() - start < 3
        assert path.exists()  # not collected: a later call may try again
