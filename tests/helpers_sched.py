"""A ``dpool-scheduler`` subprocess for the scheduler's tests."""
import pathlib
import signal
import subprocess
import sys

from helpers import node_env, poll_for

SECRET = b"scheduler-test-secret"  # the secret of tests/sched's nodes and scheduler
NODE_CPUS = 2


class SchedulerProcess:
    """``python -m dpool.daemons.scheduler`` in a subprocess, on a free port."""

    def __init__(self, workdir, nodes, secret, host="127.0.0.1", port=0, args=(), prefix=(),
                 env=None):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.out_path = self.workdir / "scheduler.out"
        self.err_path = self.workdir / "scheduler.err"
        self.host, self.secret = host, secret
        nodes = ",".join(f"{h}:{p}" for h, p in nodes)
        cmd = [*prefix, sys.executable, "-m", "dpool.daemons.scheduler", "--host", host,
               "--port", str(port), "--nodes", nodes, *args]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=node_env(secret, **(env or {})),
                                         cwd=self.workdir)
        self.port = self.cpus = None

    def wait_serving(self, timeout=60.0):
        """Parse "dpool-scheduler: N of M nodes ready, C CPUs, on HOST:PORT (pid P)"
        (the deadline grows with load, as NodeProcess.wait_serving's)."""
        def line():
            if self.proc.poll() is not None:
                raise AssertionError(f"dpool-scheduler exited with {self.proc.returncode}: "
                                     f"{self.stderr()}")
            text = self.out_path.read_text()
            return text.split("\n", 1)[0] if "\n" in text else None
        words = poll_for(line, timeout, message="dpool-scheduler to start").split()
        self.cpus = int(words[6])
        self.port = int(words[9].rsplit(":", 1)[1])
        return self

    @property
    def address(self):
        return (self.host, self.port)

    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def terminate(self, timeout=15.0, sig=signal.SIGINT):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"dpool-scheduler did not exit within {timeout}s") from None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_scheduler(workdir, nodes, secret, **kwargs):
    sched = SchedulerProcess(workdir, nodes, secret, **kwargs)
    try:
        return sched.wait_serving()
    except BaseException:
        sched.kill()
        raise


def share(jobs_a, jobs_b):
    """The part of the CPU time client A got while both had jobs running."""
    start = max(min(j.start_time for j in jobs_a), min(j.start_time for j in jobs_b))
    end = min(max(j.end_time for j in jobs_a), max(j.end_time for j in jobs_b))

    def used(jobs):
        return sum(max(0.0, min(j.end_time, end) - max(j.start_time, start)) for j in jobs)
    a, b = used(jobs_a), used(jobs_b)
    return a / (a + b)


def holding_client(address, secret, heartbeat, markers, prefix=()):
    """A client in a subprocess (run under ``prefix``, e.g. a namespace's)
    holding CPUs with ``hold`` jobs, one a marker."""
    code = (f"from dpool.core.client import Client\nfrom tasks import hold\nimport time\n"
            f"c = Client([{address!r}], secret={secret!r}, heartbeat={heartbeat!r})"
            f".start()\njobs = [c.submit(hold, (m,)) for m in {markers!r}]\ntime.sleep(120)\n")
    return subprocess.Popen([*prefix, sys.executable, "-c", code], env=node_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def resubmit(client, fn, args, timeout=30):
    """Submit ``fn(*args)`` once the client has re-joined (BrokenCluster until then)."""
    from dpool.errors import BrokenCluster

    def resubmitted():
        try:
            return client.submit(fn, args)
        except BrokenCluster:
            return None
    return poll_for(resubmitted, timeout, interval=0.1, message="the client to re-join")
