"""No CPU idles while a job waits (issue 9), with real dpool-node
subprocesses on loopback.  Asserts placement and concurrency from the jobs'
own start and end times (all nodes share this host's clock), never wall time.
"""
import pytest

from dpool.core.client import Client
from helpers import poll_for, start_node
from tasks import nap_for

pytestmark = pytest.mark.timeout(60)

#: How late a job may start after a CPU freed up (a round trip or two, on a
#: loaded machine).
SLACK = 0.4


@pytest.fixture
def nodes(request, tmp_path, node_secret):
    count, cpus = request.param
    started = []
    try:
        for i in range(count):
            started.append(start_node(tmp_path / f"node{i}", cpus=cpus, secret=node_secret))
        yield started
    finally:
        codes = [node.terminate() for node in started]
        assert codes == [0] * len(started), [node.stderr() for node in started]


def run_all(nodes, secret, durations):
    """Submit ``nap_for(d)`` jobs in one batch (one scheduler pass); return
    the finished jobs in submission order."""
    client = Client([node.address for node in nodes], secret=secret).start()
    try:
        jobs = client.call(lambda: [client.submit(nap_for, (d,)) for d in durations])
        for job in jobs:
            job.future.result(30)
        return jobs
    finally:
        client.close()


def assert_no_idle_cpu_while_a_job_waits(jobs, cpus):
    """Each time a job ends, if some job has not started yet SLACK later,
    every CPU is busy then (or was freed less than SLACK before and is about
    to be refilled)."""
    for ended in jobs:
        t = ended.end_time + SLACK
        if any(job.start_time > t for job in jobs):
            running = sum(1 for job in jobs if job.start_time <= t < job.end_time + SLACK)
            assert running >= cpus, (
                f"{cpus - running} CPUs idle at {t:.2f} while jobs waited: "
                + ", ".join(f"{job.start_time:.2f}-{job.end_time:.2f}@{job.node.address[1]}"
                            for job in jobs))


@pytest.mark.parametrize("nodes", [(3, 2)], indirect=True)
def test_six_jobs_on_three_nodes_of_two_cpus_all_run_at_once(nodes, node_secret):
    """Issue 9: 6 x 1 s jobs on 3 x 2 CPUs took 2 s (one node idle, another
    running four).  Now each node runs two, all six at the same time."""
    jobs = run_all(nodes, node_secret, [1.0] * 6)
    per_node = {}
    for job in jobs:
        per_node.setdefault(job.node.address, []).append(job.id)
    assert sorted(len(ids) for ids in per_node.values()) == [2, 2, 2], per_node
    assert max(job.start_time for job in jobs) < min(job.end_time for job in jobs)
    assert_no_idle_cpu_while_a_job_waits(jobs, 6)


@pytest.mark.parametrize("nodes", [(2, 2)], indirect=True)
def test_a_job_waiting_on_a_busy_node_moves_to_a_free_cpu(nodes, node_secret):
    """Jobs 0-3 go one per CPU (0, 1 on node X; 2, 3 on node Y), 4-7 are read
    ahead (4, 5 wait on X behind long jobs; 6, 7 on Y), 8, 9 follow to Y.
    When Y has run its short jobs, X still runs 0 and 1: the client takes
    4 and 5 back from X and Y runs them."""
    short, long = 0.6, 2.4
    durations = [long, long, short, short, long, long, short, short, short, short]
    jobs = run_all(nodes, node_secret, durations)
    x, y = jobs[0].node, jobs[2].node
    assert x is not y and jobs[1].node is x and jobs[3].node is y
    assert [job.node for job in jobs[4:]] == [y] * 6
    assert_no_idle_cpu_while_a_job_waits(jobs, 4)
    # the node's log line at the session's end
    poll_for(lambda: any(" 2 given back" in node.stderr() for node in nodes),
             message="a node to log the jobs it gave back")


@pytest.mark.parametrize("nodes", [(2, 2)], indirect=True)
def test_seed_like_jobs_keep_every_cpu_busy(nodes, node_secret):
    """The seed program's shape (10 jobs of random length) on 2 nodes of 2
    CPUs: no CPU idles while a job waits, so the makespan is within one job
    of the ideal."""
    durations = [0.9, 0.5, 1.3, 0.7, 1.1, 0.5, 1.5, 0.6, 1.0, 0.8]
    jobs = run_all(nodes, node_secret, durations)
    assert_no_idle_cpu_while_a_job_waits(jobs, 4)
    makespan = max(job.end_time for job in jobs) - min(job.start_time for job in jobs)
    ideal = max(sum(durations) / 4, max(durations))
    assert makespan <= ideal + max(durations) + SLACK
