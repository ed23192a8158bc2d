"""How nodes join a client: the embedded node, or those named, found by
discovery, added later or recovered from a client gone away (see
:mod:`dpool.core.client`)."""
import asyncio
import itertools
import socket

from ..config import resolve_cpus
from ..errors import BrokenCluster
from ..transport import inproc_pair
from .links import NodeLink, describe


class Joining:
    """A client's nodes joining it (each through ``client.net``, the links)."""

    def __init__(self, client):
        self.client = client
        self.net = client.net
        self.thread = client._thread

    async def start(self):
        client = self.client
        if client.node_addresses is None and client.discovery is None:
            await self._start_embedded()
            return
        await asyncio.gather(*(self.net.connect(addr) for addr in client.node_addresses or ()))
        if client.discovery is not None:
            await self.start_discovery()
        await self.net.wait_busy()
        if not self.net.any_ready():
            errors = "; ".join(f"{link.address[0]}:{link.address[1]}: {describe(link.error)}"
                               for link in client.links)
            if client.discovery is not None and not client.links:
                errors = self._nothing_found()
            raise BrokenCluster(f"no node could be used ({errors})")

    async def start_discovery(self):
        """Start looking for nodes over UDP (loop thread); wait for the first."""
        client = self.client
        await self.net.discover(client.discovery)
        await client.finder.settled(client.discovery.wait or client.connect_timeout)

    def _nothing_found(self):
        d, client = self.client.discovery, self.client
        wanted = ", ".join(f"{host}:{port}" for host, port in d.patterns)
        return (f"discovery found no node matching {wanted} within "
                f"{d.wait or client.connect_timeout} s: are dpool-nodes running with the same "
                f"secret, and is UDP port {'/'.join(map(str, sorted(d.ports())))} open to them "
                f"(see docs/discovery.md)?")

    async def _start_embedded(self):
        from ..node.runtime import NodeRuntime

        zygote, self.client._zygote = self.client._zygote, None
        try:
            cpus = resolve_cpus(self.client.embedded_cpus)
        except BaseException:
            if zygote is not None:
                await zygote.close()
            raise
        node = NodeRuntime(cpus, name=socket.gethostname(), embedded=True, zygote=zygote)
        await node.start()
        self.client.embedded = node
        ours, theirs = inproc_pair()
        link = NodeLink("embedded", ours)
        session = node.accept(theirs)
        await self.net.open_session(link)
        self.client.directs.embedded(session, link)

    def recover(self, sessions, terminate=False):
        """Take over sessions that a client gone away left on nodes (dispy's
        ``recover_jobs``; the client had given each a ``recover_token``).

        ``sessions`` is a list of ``((host, port), token)``.  Returns one
        NodeLink per session, its ``error`` set (and ``refusal`` if the node
        refused: it keeps nothing for that token) unless it is ready.  A ready
        link's ``adopted`` lists the session's jobs as :class:`Job` records
        with the ids the old client gave them (``fn_id`` and arguments
        unknown); their futures resolve as their outcomes arrive, as any
        job's do.  They run on that node only: one whose session is lost
        first fails with :class:`NodeLost` (the node keeps it again, for a
        later call).  ``terminate=True`` has the node cancel the jobs not
        finished yet.  Call it before submitting anything to this client.
        """
        async def take_over():
            links = [NodeLink(address) for address, _ in sessions]
            for link, (_, token) in zip(links, sessions):
                link.recover, link.retry = (token, bool(terminate)), False
            await asyncio.gather(*(self.net.connect(link.address, link, quiet=True)
                                   for link in links))
            return links
        links = self.thread.run(take_over(), self.client.connect_timeout + 5)
        top = max((job.id for link in links for job in link.adopted), default=0)
        client = self.client
        client._ids = itertools.count(max(top + 1, next(client._ids)))  # no id taken twice
        return links

    def add_nodes(self, addresses):
        """Connect to more nodes (user thread); returns their NodeLinks."""
        async def connect_all():
            links = [NodeLink(address) for address in addresses]
            await asyncio.gather(*(self.net.connect(address, link) for address, link
                                   in zip(addresses, links)))
            if self.client.broken is not None and any(link.ready for link in links):
                self.client.broken = None
            return links
        return self.thread.run(connect_all(), self.client.connect_timeout + 5)

    def discover(self, patterns, secret=None, node_port=None, **options):
        """Look for more nodes over UDP (user thread): ``patterns`` are
        ``(host pattern, port)``; matching nodes join as they answer;
        ``options`` those of :func:`dpool.core.discover.settings`."""
        from . import discover

        async def run():
            client = self.client
            if client.discovery is None:
                client.discovery = discover.settings([], secret or client.secret, node_port,
                                                     **options)
            await self.net.discover(client.discovery, patterns)
        self.thread.run(run(), 30)
