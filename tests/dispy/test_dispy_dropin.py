"""dispy programs that ran under dispy and must run unchanged under
``import dpool as dispy`` (issue 12): shared objects made by setup, the
modules dispynode gives a computation, the node names, cancel as
KeyboardInterrupt, NodeAllocate subclasses, submit_node with programs."""
import logging

import pytest

import dpool as dispy
import tasks_dispynode as h
from helpers import cluster_on, poll_for

pytestmark = pytest.mark.timeout(60)


def test_setup_shares_a_multiprocessing_value_among_the_jobs_of_a_node(dpool_node):
    """dispy's node_shvars example: setup makes a lock and a shared Value;
    every job process of the node inherits them (dispynode forks job
    processes from the process that ran setup)."""
    with cluster_on(dpool_node, h.bump_shared_counter, setup=h.setup_shared_counter,
                    cleanup=h.cleanup_shared_counter) as cluster:
        jobs = [cluster.submit(i) for i in range(20)]
        results = [job(timeout=30) for job in jobs]
        assert all(job.status == dispy.DispyJob.Finished for job in jobs), \
            [job.exception for job in jobs]
    values = sorted(value for value, _ in results)
    assert values == list(range(1, 21))  # one counter, shared by every process
    assert len({pid for _, pid in results}) >= 1


def test_setup_shares_on_the_embedded_node_too():
    with dispy.JobCluster(h.bump_shared_counter, setup=h.setup_shared_counter, cpus=2,
                          node_port=1) as cluster:
        jobs = [cluster.submit(i) for i in range(10)]
        values = sorted(job(timeout=30)[0] for job in jobs)
    assert values == list(range(1, 11))


def test_a_computation_uses_dispynodes_modules_without_importing_them(dpool_node):
    with cluster_on(dpool_node, h.uses_unimported_modules,
                    setup=h.setup_uses_unimported_modules) as cluster:
        job = cluster.submit(7)
        result = job(timeout=30)
        assert job.status == dispy.DispyJob.Finished, job.exception
    assert result[:3] == (True, True, True) and result[-1] == 7


def test_node_name_and_ip_addr_in_jobs_and_setup(dpool_node):
    with cluster_on(dpool_node, h.node_names, setup=h.setup_sees_node_names) as cluster:
        job = cluster.submit(1)
        x, name, ip, setup_saw = job(timeout=30)
        assert job.status == dispy.DispyJob.Finished, job.exception
        (node,) = cluster.status().nodes
    assert (name, ip) == (node.name, node.ip_addr) == setup_saw
    assert ip == job.ip_addr == "127.0.0.1"


def test_dispy_logger():
    """Programs pass ``loglevel=dispy.logger.DEBUG`` and log through it."""
    assert dispy.logger.DEBUG == logging.DEBUG
    assert dispy.logger.INFO == logging.INFO and dispy.logger.WARNING == logging.WARNING
    dispy.logger.info("dispy.logger works")
    dispy.logger.setLevel(dispy.logger.INFO)


def test_node_allocate_subclass_sets_per_node_depends_and_setup_args(dpool_node, tmp_path):
    """dispy's node_setup example: allocate() picks this node's data file
    (depends) and setup_args; setup reads the file on the node."""
    data = tmp_path / "node_data.txt"
    data.write_text("data for this node")
    seen = []

    class PerNode(dispy.NodeAllocate):
        def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform="*"):
            seen.append((ip_addr, name, cpus))
            self.depends = [str(data)]
            self.setup_args = (data.name,)
            return max(1, cpus - 1)

    host, port = dpool_node.address
    with cluster_on(dpool_node, h.read_setup_file, nodes=[PerNode(host, port=port)],
                    setup=h.setup_with_file) as cluster:
        job = cluster.submit()
        assert job(timeout=30) == "data for this node", job.exception
        (node,) = cluster.status().nodes
    assert seen and seen[0][0] == "127.0.0.1" and node.cpus == max(1, seen[0][2] - 1)


def test_cancel_of_a_running_job_is_a_keyboard_interrupt_inside_it(dpool_node, tmp_path):
    """dispy cancels a running job with SIGINT: the computation gets a
    KeyboardInterrupt and can clean up; the job ends Terminated."""
    started, cleaned = tmp_path / "started", tmp_path / "cleaned"
    with cluster_on(dpool_node, h.interruptible) as cluster:
        job = cluster.submit(str(started), str(cleaned))
        poll_for(started.exists, 20, message="the job to start")
        assert cluster.cancel(job) == 0
        job(timeout=20)
        assert job.status == dispy.DispyJob.Terminated and job.result is None
        assert cleaned.read_text() == "cleaned up"


def test_submit_node_with_a_program_computation(dpool_node, tmp_path):
    """A program (not a function) computation: submit_node and
    submit_job_id_node run it on that node, arguments as strings."""
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\necho \"args: $*\"\nexit $1\n")
    prog.chmod(0o755)
    with cluster_on(dpool_node, str(prog)) as cluster:
        (node,) = cluster.status().nodes
        job = cluster.submit_node(node, 4, "x")
        assert job(timeout=30) == 4 and job.stdout == b"args: 4 x\n", job.exception
        job = cluster.submit_job_id_node("mine", node.ip_addr, 5)
        assert job(timeout=30) == 5 and job.id == "mine" and job.ip_addr == node.ip_addr


def test_a_process_setup_started_outlives_the_workers(dpool_node):
    """A Manager started by setup serves every job, also after a worker
    died and was replaced (the setup process only reaps what workers leave)."""
    with cluster_on(dpool_node, h.append_to_manager_list,
                    setup=h.setup_starts_a_manager) as cluster:
        assert cluster.submit(1)(timeout=30) == 1
        died = cluster.submit("die")
        died(timeout=30)
        assert died.status == dispy.DispyJob.Abandoned
        job = cluster.submit(2)
        assert job(timeout=30) == 2, job.exception
