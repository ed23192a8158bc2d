"""Departures from dispy found by running dispy's own examples
(py3/examples/*.py) against dpool: each test pins one fix, against a
``dpool-node``.  docs/dispy-compatibility.md "dispy's examples" lists the run.
"""

import dpool as dispy
from helpers import cluster_on, poll_for


def delegate(func_name, n):
    """dispy's delegate.py: the job's function is one sent with the job."""
    return globals()[func_name](n)


def _made_here():
    def triple(n):  # (not a name of this module: sent by value)
        return (dispy_node_name, 3 * n)  # noqa: F821 (a name dispy gives jobs)
    return triple


def dpool_node_name(cluster):
    (node,) = cluster.status().nodes
    return node.name


class Box:
    def __init__(self, n):
        self.n = n


def test_dispy_job_depends_sends_functions_and_classes_for_that_job(dpool_node):
    # delegate.py: submit(..., dispy_job_depends=[func]) raised TypeError.
    with cluster_on(dpool_node, delegate) as cluster:
        job = cluster.submit("triple", 14, dispy_job_depends=[_made_here()])
        assert job(timeout=30) == (dpool_node_name(cluster), 42), job.exception
        job = cluster.submit("Box", 5, dispy_job_depends=[Box])
        assert job(timeout=30).n == 5, job.exception
        # a name sent with one job is gone for the next (dispy: per job)
        job = cluster.submit("triple", 1)
        job(timeout=30)
        assert job.status == dispy.DispyJob.Terminated and "KeyError" in str(job.exception)


def test_a_python_program_computation_runs_with_the_nodes_python(dpool_node, tmp_path):
    # node_update.py: its node_update_script.py (mode 644, as in dispy's
    # repository) ended Terminated with PermissionError: dispynode runs a
    # ".py" program with its own Python, not as an executable.
    prog = tmp_path / "update.py"
    prog.write_text("import sys\nprint('args', *sys.argv[1:])\nsys.exit(int(sys.argv[1]))\n")
    prog.chmod(0o644)
    with cluster_on(dpool_node, str(prog)) as cluster:
        job = cluster.submit(3, "x")
        assert job(timeout=30) == 3, job.exception
        assert job.status == dispy.DispyJob.Finished
        # node_update.py prints job.stdout.decode(): a program's output is
        # bytes in dispy (a function's, text); it was text here
        assert job.stdout == b"args 3 x\n" and job.stderr == b""


def test_a_programs_output_is_its_bytes_as_they_were(dpool_node, tmp_path):
    # dispy's job.stdout is the program's bytes; bytes not UTF-8 came back
    # as U+FFFD (decoded with errors="replace" on the node, then encoded).
    prog = tmp_path / "latin.py"
    prog.write_text("import sys\nsys.stdout.buffer.write(b'caf\\xe9 \\xff\\n')\n"
                    "sys.stderr.buffer.write(b'\\x80 ok')\n")
    with cluster_on(dpool_node, str(prog)) as cluster:
        job = cluster.submit()
        assert job(timeout=30) == 0, job.exception
        assert job.stdout == b"caf\xe9 \xff\n" and job.stderr == b"\x80 ok"


UNCLOSED_CLIENT = """
import sys, time
import dpool as dispy

def compute(x):
    return x

def status(job):
    time.sleep(0.5)  # (still running when the main thread ends)
    print("callback", job.result, flush=True)

if __name__ == "__main__":
    cluster = dispy.JobCluster(compute, nodes=[("127.0.0.1", {port})], secret={secret!r},
                               job_status=status)
    cluster.submit(7)
    cluster.wait()
    print("waited", flush=True)
"""


def test_callbacks_queued_when_the_program_ends_still_run(dpool_node, tmp_path):
    # job_scheduler.py ends (without close) once wait() returns; dispy's
    # exit handler runs the callbacks already queued (the last job's
    # Finished), dpool's daemon callback thread died with them.
    import os
    import subprocess
    import sys

    script = tmp_path / "client.py"
    secret = dpool_node.secret.decode() if isinstance(dpool_node.secret, bytes) \
        else dpool_node.secret
    script.write_text(UNCLOSED_CLIENT.format(port=dpool_node.port, secret=secret))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ["callback 7", "waited"], out.stderr


def working_folder(_):
    import os

    return os.getcwd()


def test_arguments_past_cluster_status_by_position_are_dispys(dpool_node):
    # dispy's JobCluster(computation, nodes, depends, job_status,
    # cluster_status, host, dispy_port, ext_host, ip_addr, ext_ip_addr,
    # ipv4_udp_multicast, dest_path, loglevel, callback, setup, cleanup,
    # ping_interval, pulse_interval, poll_interval, reentrant, secret, ...):
    # the sixth was taken as dpool's own dest_path, the seventh as loglevel...
    import logging
    import os

    import pytest

    secret = dpool_node.secret
    args = [None] * 5 + [False, "dpool-test/positional", logging.INFO, None, None, True,
                         None, None, None, False, secret]
    with dispy.JobCluster(working_folder, [dpool_node.address], [], None, None,
                          *args) as cluster:
        job = cluster.submit(0)
        cwd = job(timeout=30)
        assert cwd and cwd.endswith(os.path.join("dpool-test", "positional")), job.exception
    with pytest.raises(TypeError, match="multiple values for argument 'secret'"):
        dispy.JobCluster(working_folder, [dpool_node.address], [], None, None, *args,
                         secret=secret)
    with pytest.raises(TypeError, match="at most 24 positional"):
        dispy.JobCluster(working_folder, [dpool_node.address], [], None, None,
                         *args, None, None, None, None)


def test_callbacks_come_after_the_constructor_returned(dpool_node):
    # job_scheduler.py, longrun.py, node_update.py: cluster_status submits
    # to the node it is told of, with the module's ``cluster`` (and
    # ``submitted``) set just after JobCluster() returns; the Initialized
    # callback ran while the constructor waited for the node's set-up:
    # NameError.
    holder = []
    seen = []

    def status(status, node, job):
        if status == dispy.DispyNode.Initialized:
            seen.append(len(holder))

    holder.append(cluster_on(dpool_node, working_folder, cluster_status=status))
    cluster = holder[0]
    try:
        assert cluster.submit(0)(timeout=30), "the job failed"
        poll_for(lambda: seen, 30, message="the Initialized callback")
        assert seen == [1]
    finally:
        cluster.close()
