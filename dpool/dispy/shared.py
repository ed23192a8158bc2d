"""dispy's ``SharedJobCluster``: a JobCluster whose jobs go through ``dpool-scheduler``.

::

    SharedJobCluster ── one session ──► dpool-scheduler ── a session per node ──► dpool-node
      (a JobCluster whose one "node"     (places the jobs of all its clients
       is the scheduler)                  on the nodes, equal shares)

Everything a JobCluster does works the same way (jobs, callbacks,
``depends``, ``setup``/``cleanup``, ``dest_path``): the scheduler passes the
computation to each node its jobs may run on, and each job's ``ip_addr``
names the node that ran it.  The cluster's nodes are the nodes behind the
scheduler, as it lists them (events.py: ``ClusterEvents.behind``):
``status()``, ``node_jobs`` and the cluster_status callbacks show those, and
``submit_node`` runs a job on one of them (the scheduler places it there).
See docs/scheduler.md.
"""
import collections
import logging

from ..config import scheduler_address
from .cluster import JobCluster
from .model import ClusterStatus, DispyNode, NodeAllocate, resolve_host


class SharedJobCluster(JobCluster):
    """dispy's SharedJobCluster: ``computation`` runs on the nodes of the
    ``dpool-scheduler`` at ``scheduler_host:scheduler_port``, which shares
    them among its clients.  ``nodes`` limits this cluster to those nodes
    (host names or addresses, ``*`` patterns allowed).  With
    ``exclusive=True`` the cluster has the scheduler's nodes to itself, as in
    dispy: it starts once no other client uses the scheduler (waiting up to
    its connect timeout), and other clients wait until it closes."""

    def __init__(self, computation, nodes=None, depends=[], callback=None,  # noqa: B006 (dispy's)
                 cluster_status=None, ip_addr=None, port=None, scheduler_host=None,
                 scheduler_port=None, ext_ip_addr=None, loglevel=logging.INFO, setup=None,
                 cleanup=True, dest_path=None, poll_interval=None, reentrant=False,
                 exclusive=False, secret="", keyfile=None, certfile=None, recover_file=None,
                 **options):
        self._exclusive = bool(exclusive)
        self._only_nodes = _node_patterns(nodes)
        host, sport = scheduler_address(scheduler_host, scheduler_port)
        super().__init__(computation, nodes=[NodeAllocate(host, sport)], depends=depends,
                         callback=callback, cluster_status=cluster_status, ip_addr=ip_addr,
                         ext_ip_addr=ext_ip_addr, loglevel=loglevel, setup=setup,
                         cleanup=cleanup, dest_path=dest_path, poll_interval=poll_interval,
                         reentrant=reentrant, secret=secret, keyfile=keyfile,
                         certfile=certfile, node_port=sport, recover_file=recover_file,
                         **options)

    # ------------------------------------------------- the nodes behind the scheduler

    def submit_node(self, node, *args, **kwargs):
        """Run a job on ``node`` (a DispyNode, IP address or host name of a
        node behind the scheduler) only; ValueError if there is none."""
        return self.submit_job_id_node(None, node, *args, **kwargs)

    def submit_job_id_node(self, job_id, node, *args, **kwargs):
        link, host = self._behind(node, strict=True)
        return self._submit(job_id, link, args, kwargs, place=host)

    def status(self):
        """ClusterStatus of the nodes behind the scheduler (this cluster's)."""
        def collect_status():
            busy = collections.Counter((job.node, job.where)
                                       for job in self._client.jobs.values()
                                       if job.sent and job.where is not None)
            nodes = []
            for link, behind in self._events.behind.items():
                for host, node in behind.items():
                    node.busy = busy[(link, host)]
                    nodes.append(node)
            return ClusterStatus(nodes, self._client.pending())
        if self._client.closed:
            return ClusterStatus([], 0)
        return self._call(collect_status)

    def node_jobs(self, node, from_node=False):
        """The jobs running on ``node`` (behind the scheduler); [] if unknown."""
        link, host = self._behind(node)
        if link is None:
            return []
        return self._call(lambda: [job.tag for job in self._client.jobs.values()
                                   if job.node is link and job.where == host and job.sent
                                   and job.tag is not None])

    def _behind(self, node, strict=False):
        """A DispyNode, IP address or host name -> (scheduler link, the
        node's host as the scheduler names it), by address first, then name."""
        if isinstance(node, DispyNode):
            ip, name = node.ip_addr, node.name
        elif isinstance(node, str):
            ip, name = resolve_host(node), node
        else:
            ip = name = None
        known = [(link, host, one) for link, behind in list(self._events.behind.items())
                 for host, one in list(behind.items())]
        for match in (lambda host, one: one.ip_addr == ip or host == name,
                      lambda host, one: one.name == name):
            for link, host, one in known:
                if name is not None and match(host, one):
                    return link, host
        if strict:
            raise ValueError(f"{node!r} is not a node of this cluster (the nodes behind the "
                             f"scheduler: {sorted(one.ip_addr for _, _, one in known)})")
        return None, None

    def _session(self):
        # The start of each job carries the node that runs it (job.ip_addr).
        options = dict(super()._session(), notify_start=True)
        if self._exclusive:
            options["exclusive"] = True
        if self._only_nodes:
            options["nodes"] = self._only_nodes
        return options


def _node_patterns(nodes):
    """``nodes`` as a list of host patterns (None: all the scheduler's nodes)."""
    if nodes in (None, "*", ["*"]):
        return None
    if isinstance(nodes, (str, NodeAllocate)):
        nodes = [nodes]
    out = []
    for node in nodes:
        if isinstance(node, NodeAllocate):
            out.append(node.host)
        elif isinstance(node, (tuple, list)):
            out.append(str(node[0]))
        else:
            out.append(str(node).rsplit(":", 1)[0] if str(node).count(":") == 1 else str(node))
    return out
