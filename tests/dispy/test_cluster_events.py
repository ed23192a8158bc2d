"""JobCluster's events (dpool.dispy.events.ClusterEvents): what the nodes a
job ran on count of it."""
from dpool.core import job as core
from dpool.dispy.events import ClusterEvents
from dpool.dispy.model import DispyJob, DispyNode


class _Link:
    """A scheduler's NodeLink, as far as the events read it."""

    address = ("127.0.0.1", 1)


def _behind_a_scheduler():
    """Events for a cluster on one scheduler, with nodes h1 and h2 behind it."""
    events = ClusterEvents(None, None, None, lambda job, core_job: None, lambda link: None)
    link = _Link()
    nodes = {host: DispyNode(f"10.0.0.{i}", host, 1) for i, host in enumerate(("h1", "h2"), 1)}
    events.behind[link] = dict(nodes)
    events._ips.update({"h1": "10.0.0.1", "h2": "10.0.0.2"})
    return events, link, nodes


def _started(events, core_job, host):
    core_job.where, core_job.start_time, core_job.status = host, 1.0, core.RUNNING
    events.on_event("started", core_job)


def _done(events, core_job):
    core_job.end_time, core_job.status, core_job.value = 2.0, core.FINISHED, 42
    events.on_event("done", core_job)


def test_a_job_started_again_elsewhere_is_busy_on_one_node_only():
    """The scheduler runs a job again on another node (the first one's leg
    was lost, the node is still listed): a second start.  The first node
    counts the job busy no more (it was counted busy there until the end
    of the cluster), the second one until the job ends."""
    events, link, nodes = _behind_a_scheduler()
    core_job = core.Job(1, 0, None, tag=DispyJob())
    core_job.node = link
    _started(events, core_job, "h1")
    assert nodes["h1"].busy == 1
    _started(events, core_job, "h2")
    assert (nodes["h1"].busy, nodes["h2"].busy) == (0, 1)
    _done(events, core_job)
    assert (nodes["h1"].busy, nodes["h2"].busy) == (0, 0)
    assert (nodes["h1"].jobs_done, nodes["h2"].jobs_done) == (0, 1)


def test_a_job_started_twice_on_one_node_is_busy_there_once():
    events, link, nodes = _behind_a_scheduler()
    core_job = core.Job(1, 0, None, tag=DispyJob())
    core_job.node = link
    _started(events, core_job, "h1")
    _started(events, core_job, "h1")
    assert nodes["h1"].busy == 1
    _done(events, core_job)
    assert nodes["h1"].busy == 0
