"""The node runtime end to end: worker deaths, cancels, output capture,
remote exceptions and clean-up after a client vanishes.

Most tests run a real ``dpool-node`` subprocess (fixtures in
conftest.py); one runs the embedded node of ``Client(None)``.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import dpool
from dpool import protocol as P
from dpool.core.client import Client
from dpool.errors import JobCancelled, WorkerLost
from helpers import cluster_on, node_env, pid_gone, poll_for, read_marker
from tasks import die_or_pid, dies, double, echo_outputs, echo_some, fails, getpid, hold

DispyJob = dpool.DispyJob
pytestmark = pytest.mark.timeout(30)

DEATHS = {"exit": "exited with code 3", "sigkill": "killed by SIGKILL",
          "segfault": "killed by SIGSEGV"}


def dead_pid(job):
    match = re.search(r"worker process \(pid (\d+)\)", job.exception or "")
    assert match, job.exception
    return int(match.group(1))


# ------------------------------------------------------------- worker deaths

@pytest.mark.parametrize("how", sorted(DEATHS))
def test_dead_worker_fails_only_its_job_and_is_replaced(node1, how):
    """1 CPU: the dying job runs first, four more wait behind it."""
    with cluster_on(node1, die_or_pid) as cluster:
        jobs = [cluster.submit(how)] + [cluster.submit(None) for _ in range(4)]
        for job in jobs:
            job(timeout=10)
        assert all(job.finish.is_set() for job in jobs)
        bad, good = jobs[0], jobs[1:]
        assert bad.status == DispyJob.Abandoned
        assert bad.result is None
        assert "WorkerLost" in bad.exception
        assert "worker process" in bad.exception and DEATHS[how] in bad.exception
        assert [job.status for job in good] == [DispyJob.Finished] * 4, \
            [(job.status, job.exception) for job in good]
        pids = {job.result for job in good}
        assert dead_pid(bad) not in pids
        assert pid_gone(dead_pid(bad))
        # Jobs submitted later run too.
        later = cluster.submit(None)
        assert isinstance(later(timeout=10), int) and later.status == DispyJob.Finished


def test_several_deaths_among_queued_jobs(dpool_node):
    """2 CPUs, 20 jobs of which every fifth kills its worker."""
    kinds = ["exit", "sigkill", "segfault", "exit"]
    with cluster_on(dpool_node, die_or_pid) as cluster:
        jobs = [cluster.submit(kinds[i // 5] if i % 5 == 0 else None) for i in range(20)]
        assert cluster.wait(timeout=20)
        for i, job in enumerate(jobs):
            if i % 5 == 0:
                assert job.status == DispyJob.Abandoned, (i, job.status, job.exception)
                assert DEATHS[kinds[i // 5]] in job.exception
            else:
                assert job.status == DispyJob.Finished, (i, job.status, job.exception)
                assert isinstance(job.result, int)
        assert cluster._client.nodes()[0].cpus == 2


def test_embedded_client_worker_death():
    """The embedded node (Client(None)) replaces a dead worker the same way."""
    client = Client(None, cpus=2).start()
    try:
        assert client.nodes()[0].cpus == 2
        bad = client.submit(dies, ("segfault",))
        with pytest.raises(WorkerLost, match="SIGSEGV"):
            bad.future.result(10)
        assert bad.status == "Abandoned"
        good = [client.submit(double, (i,)) for i in range(50)]
        assert [job.future.result(10) for job in good] == [2 * i for i in range(50)]
    finally:
        client.close()


# ------------------------------------------------------------------ cancels

def test_cancel_queued_jobs(node1, tmp_path):
    """1 CPU: job 0 holds the worker; job 1 waits on the node, job 2 in the client."""
    marker, gate = str(tmp_path / "running"), str(tmp_path / "gate")
    with cluster_on(node1, hold) as cluster:
        running = cluster.submit(marker, gate)
        queued = [cluster.submit(marker + str(i), gate) for i in (1, 2)]
        (pid,), _ = read_marker(marker)
        for job in queued:
            assert cluster.cancel(job) == 0
        for job in queued:  # (not after the running one: its gate is shut)
            assert job(timeout=10) is None
            assert job.finish.is_set()
            assert job.status == DispyJob.Cancelled
        assert cluster.cancel(queued[0]) == -1  # already finished
        assert not running.finish.is_set()
        open(gate, "w").close()
        assert running(timeout=10) == pid
        assert running.status == DispyJob.Finished
        for i in (1, 2):
            assert not os.path.exists(marker + str(i))  # never ran


def test_cancel_running_job_kills_it_and_its_children(dpool_node, tmp_path):
    marker = str(tmp_path / "running")
    with cluster_on(dpool_node, hold) as cluster:
        job = cluster.submit(marker, None, True)
        (pid, grandchild), _ = read_marker(marker)
        assert cluster.cancel(job) == 0
        job(timeout=10)
        assert job.finish.is_set()  # (it holds until killed)
        poll_for(lambda: pid_gone(pid), 5, message="the job's worker to die")
        poll_for(lambda: pid_gone(grandchild), 5, message="the job's child to die")
        assert job.status in (DispyJob.Terminated, DispyJob.Cancelled)
        assert job.result is None
        # The worker is replaced.
        assert cluster.submit(str(tmp_path / "again"), str(tmp_path))(timeout=10) != pid


def test_cancel_running_job_status_is_terminated(dpool_node, tmp_path):
    """README: a cancelled running job ends as Terminated (dispy's meaning)."""
    marker = str(tmp_path / "running")
    with cluster_on(dpool_node, hold) as cluster:
        job = cluster.submit(marker, None)
        read_marker(marker)
        cluster.cancel(job)
        job(timeout=10)
        assert job.status == DispyJob.Terminated


def test_cancel_with_client_core(dpool_node, tmp_path):
    """The core's futures: a cancelled running job fails with JobCancelled."""
    marker = str(tmp_path / "running")
    client = Client([dpool_node.address], secret=dpool_node.secret,
                    session={"notify_start": True}).start()
    try:
        job = client.submit(hold, (marker, None))
        (pid,), _ = read_marker(marker)
        client.cancel(job)
        with pytest.raises(JobCancelled):
            job.future.result(10)
        poll_for(lambda: pid_gone(pid), 5, message="the job's worker to die")
        assert job.status == "Terminated"
        assert job.start_time is not None
    finally:
        client.close()


# ------------------------------------------------------- output and errors

def test_stdout_and_stderr_are_captured_per_job(dpool_node):
    with cluster_on(dpool_node, echo_outputs) as cluster:
        jobs = [cluster.submit(n) for n in range(12)]
        for n, job in enumerate(jobs):
            assert job(timeout=10) == n
            assert job.stdout == f"stdout of job {n}\n"
            assert job.stderr == f"stderr of job {n}\n"
            assert job.exception is None


def test_each_job_gets_its_own_output_when_jobs_print_or_not_or_close_stdout(dpool_node):
    """A worker reuses a capture buffer a job left empty: no job sees
    another's output, and a job closing its stdout spoils no later job."""
    with cluster_on(dpool_node, echo_some) as cluster:
        for n in range(12):
            job = cluster.submit(n)
            assert job(timeout=10) == n, job.exception
            assert job.stdout == (f"stdout of job {n}\n" if n % 3 == 0 else "")
            assert job.stderr == "" and job.exception is None


def _captured(capture, fn):
    """(stdout, stderr) a worker sends for ``fn`` run with ``capture``."""
    capture.call(fn, (), {}, False)
    return capture.text


def test_a_job_truncating_its_stdout_leaves_the_next_job_no_padding():
    """A job that wrote, then truncate(0) (its position stays past the
    end): the next job in the worker sees its own output, no NUL padding."""
    from dpool.node.worker import _Capture

    capture = _Capture()
    assert _captured(capture, lambda: (print("abc"), sys.stdout.truncate(0))) == (None, None)
    assert _captured(capture, lambda: print("mine")) == ("mine\n", None)
    assert _captured(capture, lambda: sys.stderr.seek(5)) == (None, None)
    assert _captured(capture, lambda: print("mine", file=sys.stderr)) == (None, "mine\n")


def test_output_a_job_writes_after_it_ended_is_not_the_next_jobs():
    """A job that wrote nothing but kept its stdout (a thread, a logging
    handler) and writes to it after it ended: the next job sees only its own."""
    import threading

    from dpool.node.worker import _Capture

    capture, go = _Capture(), threading.Event()
    threads = []

    def job_a():
        out = sys.stdout
        threads.append(threading.Thread(target=lambda: (go.wait(10), out.write("late A\n"))))
        threads[0].start()

    assert _captured(capture, job_a) == (None, None)
    go.set()
    threads[0].join()
    assert _captured(capture, lambda: print("B")) == ("B\n", None)


def test_exception_comes_back_as_traceback_text(dpool_node):
    with cluster_on(dpool_node, fails) as cluster:
        jobs = [cluster.submit(n) for n in range(3)]
        for n, job in enumerate(jobs):
            assert job(timeout=10) is None
            assert job.status == DispyJob.Terminated
            text = job.exception
            assert text.startswith("Traceback (most recent call last):"), text
            assert "in fails" in text
            assert f"ValueError: boom-{n}" in text
        # A user exception does not kill the worker.
        assert cluster.submit(1)(timeout=10) is None


# ------------------------------------------------- client disconnect clean-up

CLIENT_SCRIPT = textwrap.dedent("""\
    import sys
    import dpool
    from tasks import hold

    port, markers = int(sys.argv[1]), sys.argv[2:]
    cluster = dpool.JobCluster(hold, nodes=[("127.0.0.1", port)])
    jobs = [cluster.submit(marker, None, True) for marker in markers]
    print("submitted", flush=True)
    jobs[0]()
    """)


def test_client_killed_node_cleans_up(dpool_node, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    markers = [str(tmp_path / f"job{i}") for i in range(2)]
    client = subprocess.Popen([sys.executable, str(script), str(dpool_node.port), *markers],
                              env=node_env(dpool_node.secret), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        found = [read_marker(m, timeout=15) for m in markers]
    except AssertionError:
        client.kill()
        _, err = client.communicate(timeout=10)
        raise AssertionError(f"the client script failed: {err.decode()}") from None
    pids = [pid for pids, _ in found for pid in pids]
    session_dir = found[0][1]
    assert os.path.isdir(session_dir) and found[1][1] == session_dir
    client.send_signal(signal.SIGKILL)
    client.communicate(timeout=10)
    for pid in pids:  # two workers and their children
        poll_for(lambda: pid_gone(pid), 10, message=f"process {pid} to die")
    poll_for(lambda: not os.path.exists(session_dir), 10, message="the session folder to go")
    assert dpool_node.proc.poll() is None
    assert "disconnected" in dpool_node.stderr()
    # All CPUs are free again and the node serves the next client.
    with cluster_on(dpool_node, double) as cluster:
        assert cluster._client.nodes()[0].cpus == 2
        assert [j(timeout=10) for j in [cluster.submit(i) for i in range(4)]] == [0, 2, 4, 6]


def test_closed_session_frees_cpus_and_folder(dpool_node, tmp_path):
    marker = str(tmp_path / "marker")
    with cluster_on(dpool_node, hold) as cluster:
        job = cluster.submit(marker, str(tmp_path))
        job(timeout=10)
        _, session_dir = read_marker(marker)
        assert cluster._client.nodes()[0].info["dir"] == session_dir
    poll_for(lambda: not os.path.exists(session_dir), 10, message="the session folder to go")
    with cluster_on(dpool_node, getpid) as cluster:
        assert cluster._client.nodes()[0].cpus == 2
        assert cluster.submit()(timeout=10) > 0


def _zygote_of(pid):
    import psutil

    found = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and \
                    "dpool.node.zygote" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone, or a zombie not reaped yet
            pass
    return found


def test_node_survives_its_zygote_dying(dpool_node):
    """Workers die with the zygote; the node starts a new zygote and serves on."""
    with dpool.JobCluster(abs, nodes=[dpool_node.address], secret=dpool_node.secret,
                          loglevel=None) as cluster:
        assert cluster.submit(-1)(timeout=10) == 1
        (zygote,) = _zygote_of(dpool_node.pid)
        zygote.kill()
        poll_for(lambda: [z for z in _zygote_of(dpool_node.pid) if z.pid != zygote.pid], 10,
                 message="a new zygote")
        jobs = [cluster.submit(-i) for i in range(6)]
        assert [job(timeout=10) for job in jobs] == list(range(6))
    assert "died; starting a new one" in dpool_node.stderr()


def test_embedded_client_survives_its_zygote_dying():
    client = Client(None, cpus=2).start()
    try:
        assert client.submit(abs, (-2,)).future.result(10) == 2
        (zygote,) = _zygote_of(os.getpid())
        zygote.kill()
        poll_for(lambda: [z for z in _zygote_of(os.getpid()) if z.pid != zygote.pid], 10,
                 message="a new zygote")
        assert [client.submit(abs, (-i,)).future.result(10) for i in range(4)] == [0, 1, 2, 3]
    finally:
        client.close()


def test_functions_no_longer_needed_are_forgotten_by_the_node_and_workers():
    """A lambda made per call is a new function each time: the node session
    and its workers keep only a bounded number of them."""
    from dpool.core import client as core

    client = Client(None, cpus=2).start()
    try:
        for _ in range(3):
            jobs = [client.submit(lambda i=i: i + 1) for i in range(800)]
            assert [job.future.result(30) for job in jobs] == list(range(1, 801))
        (session,) = client.embedded.sessions
        assert len(session.fns) <= core._NODE_FUNCTIONS
        assert all(len(w.fns) <= core._NODE_FUNCTIONS for w in session.workers)
        (link,) = client.nodes()
        assert len(link.fns) <= core._NODE_FUNCTIONS
        # Functions still in use were never forgotten: a job of an old one runs.
        keep = lambda: "kept"  # noqa: E731
        assert client.submit(keep).future.result(10) == "kept"
        assert client.submit(keep).future.result(10) == "kept"
    finally:
        client.close()


# ------------------------------------------------------------- the zygote


def test_zygote_exits_quietly_when_the_node_closed_before_the_fork_reply():
    """``Executor(max_workers=4)`` shut down at once sometimes printed a
    zygote ``BrokenPipeError`` traceback: the node had stopped reading the
    control socket while a fork request was in flight, and the b"P" reply
    raised (``_reap`` already ignored that; ``_serve_request`` did not)."""
    ours, theirs = socket.socketpair()
    worker_ours, worker_theirs = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from dpool.node.zygote import main; main()",
             str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()], env=node_env(), stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        theirs.close()
        ours.shutdown(socket.SHUT_RD)  # the zygote's replies now fail with EPIPE
        socket.send_fds(ours, [b"S"], [worker_theirs.fileno()])
        worker_theirs.close()
        try:
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert b"Traceback" not in err, err.decode(errors="replace")
        assert proc.returncode == 0, err.decode(errors="replace")
        worker_ours.settimeout(10)
        assert worker_ours.recv(1) == b""  # the forked worker was killed with it
    finally:
        ours.close()
        worker_ours.close()
        worker_theirs.close()


def _session(client):
    return client.call(lambda: next(iter(client.embedded.sessions)))


def test_zygote_dying_during_a_spawn_does_not_end_the_session():
    """A worker start waiting on the zygote when it dies is retried with the
    new zygote; the session (the node, for the client) goes on serving."""
    client = Client(None, cpus=1).start()
    zygote = None
    try:
        pid = client.submit(getpid).future.result(10)
        zygote = client.embedded.zygote.proc
        os.kill(zygote.pid, signal.SIGSTOP)
        os.kill(pid, signal.SIGKILL)  # a new worker is asked of the stopped zygote
        poll_for(lambda: client.call(lambda: len(client.embedded.zygote._pending)), 10,
                 message="a spawn waiting on the zygote")
        os.kill(zygote.pid, signal.SIGKILL)
        os.kill(zygote.pid, signal.SIGCONT)
        assert client.submit(double, (21,)).future.result(10) == 42
        assert client.nodes()
    finally:
        if zygote is not None:
            try:
                os.kill(zygote.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        client.close()


def test_cancel_of_a_job_queued_in_a_worker_that_just_died(tmp_path):
    """Cancel of a job queued inside a worker whose death is not yet fully
    handled (its exit not reported yet) is not lost: the job is not requeued
    and run, its future fails with JobCancelled."""
    client = Client(None, cpus=1, direct=False).start()  # (the dispatcher's path)
    zygote = None
    try:
        for _ in range(20):  # short jobs: the worker is given several at once
            client.submit(double, (1,)).future.result(10)
        session = _session(client)
        assert client.call(lambda: session.dispatcher.depth) >= 2
        marker = str(tmp_path / "a")
        a = client.submit(hold, (marker,))
        b = client.submit(double, (5,))
        (worker_pid,), _ = read_marker(marker)
        (worker,) = client.call(lambda: list(session.workers))
        assert client.call(lambda: list(worker.outstanding)) == [a.id, b.id]
        cancels = []
        original = session.handlers[P.Cancel]
        session.handlers[P.Cancel] = lambda m, f: (original(m, f), cancels.append(m.job_ids))
        zygote = client.embedded.zygote.proc
        os.kill(zygote.pid, signal.SIGSTOP)  # its exit report waits
        os.kill(worker_pid, signal.SIGKILL)
        poll_for(lambda: client.call(lambda: worker.dead), 10, message="the worker seen dead")
        client.cancel(b)
        poll_for(lambda: cancels, 10, message="the cancel at the node")
        os.kill(zygote.pid, signal.SIGCONT)
        with pytest.raises(JobCancelled):
            b.future.result(10)
        a.future.exception(10)
    finally:
        if zygote is not None:
            os.kill(zygote.pid, signal.SIGCONT)
        client.close()


def test_jobs_requeued_by_a_worker_death_go_to_an_idle_worker_at_once(tmp_path):
    """The jobs waiting inside a worker that dies go back to the queue and
    to a worker with room at once, not only when the dead one's replacement
    has started (here it never does: the session's spawns are held)."""
    client = Client(None, cpus=2, direct=False).start()  # (the dispatcher's path)
    try:
        for _ in range(20):  # short jobs: a worker is given several at once
            client.submit(double, (1,)).future.result(10)
        session = _session(client)
        assert client.call(lambda: session.dispatcher.depth) >= 2
        c = client.submit(hold, (str(tmp_path / "c"),))
        a = client.submit(hold, (str(tmp_path / "a"), str(tmp_path / "gate")))
        b = client.submit(double, (5,))
        (doomed,), _ = read_marker(str(tmp_path / "c"))
        read_marker(str(tmp_path / "a"))
        held = [w for w in client.call(lambda: list(session.workers)) if w.pid == doomed]
        assert client.call(lambda: list(held[0].outstanding)) == [c.id, b.id]
        (tmp_path / "gate").touch()
        assert a.future.result(10)  # the other worker is idle now
        spawns = []
        client.call(lambda: setattr(session, "_spawn", lambda: spawns.append(1)))
        os.kill(doomed, signal.SIGKILL)
        with pytest.raises(WorkerLost):
            c.future.result(10)
        assert spawns == [1]
        assert b.future.result(10) == 10
    finally:
        client.close()
