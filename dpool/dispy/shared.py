"""dispy's ``SharedJobCluster``: a JobCluster whose jobs go through ``dpool-scheduler``.

::

    SharedJobCluster ── one session ──► dpool-scheduler ── a session per node ──► dpool-node
      (a JobCluster whose one "node"     (places the jobs of all its clients
       is the scheduler)                  on the nodes, equal shares)

Everything a JobCluster does works the same way (jobs, callbacks,
``depends``, ``setup``/``cleanup``, ``dest_path``): the scheduler passes the
computation to each node its jobs may run on, and each job's ``ip_addr``
names the node that ran it.  See docs/scheduler.md.
"""
import logging

from ..config import scheduler_address
from .cluster import JobCluster
from .model import NodeAllocate


class SharedJobCluster(JobCluster):
    """dispy's SharedJobCluster: ``computation`` runs on the nodes of the
    ``dpool-scheduler`` at ``scheduler_host:scheduler_port``, which shares
    them among its clients.  ``nodes`` limits this cluster to those nodes
    (host names or addresses, ``*`` patterns allowed); ``exclusive=True``
    (whole nodes for this cluster) is not offered and raises."""

    def __init__(self, computation, nodes=None, depends=[], callback=None,  # noqa: B006 (dispy's)
                 cluster_status=None, ip_addr=None, port=None, scheduler_host=None,
                 scheduler_port=None, ext_ip_addr=None, loglevel=logging.INFO, setup=None,
                 cleanup=True, dest_path=None, poll_interval=None, reentrant=False,
                 exclusive=False, secret="", keyfile=None, certfile=None, recover_file=None,
                 **options):
        if exclusive:
            raise NotImplementedError("SharedJobCluster(exclusive=True) is not supported: the "
                                      "scheduler shares every node among its clients")
        if recover_file:
            raise NotImplementedError("SharedJobCluster(recover_file=...) is not supported: "
                                      "a scheduler keeps no results to recover")
        self._only_nodes = _node_patterns(nodes)
        host, sport = scheduler_address(scheduler_host, scheduler_port)
        super().__init__(computation, nodes=[NodeAllocate(host, sport)], depends=depends,
                         callback=callback, cluster_status=cluster_status, ip_addr=ip_addr,
                         ext_ip_addr=ext_ip_addr, loglevel=loglevel, setup=setup,
                         cleanup=cleanup, dest_path=dest_path, poll_interval=poll_interval,
                         reentrant=reentrant, secret=secret, keyfile=keyfile,
                         certfile=certfile, node_port=sport, **options)

    def _session(self):
        # The start of each job carries the node that runs it (job.ip_addr).
        options = dict(super()._session(), notify_start=True)
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
