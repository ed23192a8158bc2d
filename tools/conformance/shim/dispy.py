"""``import dispy`` gives dpool, as ``import dpool as dispy`` would.

For tools/conformance/run_dispy_examples.sh: with EX_NODES (``host:port``
of a dpool-node) and EX_SECRET set, a JobCluster made without ``nodes``,
and a ``NodeAllocate('*')``, use that node: where dispy would look for its
dispynodes on the LAN, the examples stay on loopback.
"""
import os
import sys

import dpool

if os.environ.get("EX_NODES"):
    _HOST, _PORT = os.environ["EX_NODES"].rsplit(":", 1)

    class JobCluster(dpool.JobCluster):
        def __init__(self, computation, nodes=None, *args, **kwargs):
            kwargs.setdefault("secret", os.environ.get("EX_SECRET", ""))
            super().__init__(computation, [NodeAllocate("*")] if nodes is None else nodes,
                             *args, **kwargs)

    class NodeAllocate(dpool.NodeAllocate):
        def __init__(self, host, port=None, *args, **kwargs):
            if host == "*":
                host, port = _HOST, int(_PORT)
            super().__init__(host, port, *args, **kwargs)

    dpool.JobCluster, dpool.NodeAllocate = JobCluster, NodeAllocate
sys.modules[__name__] = dpool
