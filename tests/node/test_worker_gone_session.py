"""A worker started for a session that has already ended.

Found by ``bench/bench_small.py`` (create + 1 task + shutdown): the session
ended and its directory was removed while the node was still starting a
worker for its other CPU; the worker's ``chdir`` into the removed directory
raised, and every such worker printed a FileNotFoundError traceback onto the
user's terminal (the embedded node shares the client's stderr).
"""
import os
import socket
import tempfile

from dpool import protocol as P
from dpool.transport.blocking import BlockingConnection


def _run_worker(options):
    """Fork a worker on one end of a socketpair, send it Init, close our end;
    return (exit code, what it wrote to stderr)."""
    ours, theirs = socket.socketpair()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker, as the zygote starts it
        try:
            ours.close()
            os.close(err_r)
            os.dup2(err_w, 2)
            from dpool.node import worker

            worker.main(theirs.detach())
        finally:
            os._exit(99)
    theirs.close()
    os.close(err_w)
    conn = BlockingConnection(ours)
    try:
        conn.send([P.encode(P.Init, options)])
    except OSError:
        pass  # it may already have gone
    conn.close()
    with os.fdopen(err_r, "rb") as err:
        text = err.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


def test_a_worker_whose_session_directory_is_gone_exits_quietly():
    gone = tempfile.mkdtemp(prefix="dpool-gone-")
    os.rmdir(gone)
    code, err = _run_worker({"cwd": gone})
    assert "Traceback" not in err, err
    assert code == 0


def test_a_worker_with_its_session_directory_still_serves_until_closed():
    with tempfile.TemporaryDirectory() as cwd:
        code, err = _run_worker({"cwd": cwd})
    assert "Traceback" not in err, err
    assert code == 0
