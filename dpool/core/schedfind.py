"""Discovery for ``dpool-scheduler``: nodes found over UDP join the scheduler.

::

    Broker.start ─► Finder (core/discover.py, as a client's: pings, hears
                    pongs and announcements, relayed ones too)
    a node matching a pattern ─► Broker.add_found(address): a NodePort, its
                    anchor session (the full TCP handshake), then legs for
                    the clients and Ready with the new CPU total
    a found node lost (liveness) ─► re-joined with backoff for FORGET_AFTER
                    heartbeat deadlines, then forgotten: the Finder joins it
                    again when it next answers

The Finder was written for a client's :class:`~dpool.core.links.Links`;
:class:`Joiner` is the Broker seen through that interface.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .discover import Discovery, Finder

if TYPE_CHECKING:
    from .broker import Broker
    from .nodeport import NodePort

#: Heartbeat deadlines (10 s by default) for which a discovered node that
#: was lost (or never joined) is retried before the scheduler forgets it
#: (a node that comes back is found again).
FORGET_AFTER = 3


class Joiner:
    """What :class:`~dpool.core.discover.Finder` asks of its owner, for a Broker."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @property
    def closed(self) -> bool:
        return self.broker.closing

    @property
    def links(self) -> list[NodePort]:
        return self.broker.ports

    def knows(self, address: tuple[str, int]) -> bool:
        """A node in use, or lost and being retried."""
        return address in self.broker.aliases or \
            any(port.address == address for port in self.broker.ports)

    def gave_up_busy(self, address: tuple[str, int]) -> bool:
        """Forgotten (lost or busy for long): join it if it answers again."""
        return address in self.broker.forgotten and not self.knows(address)

    async def join(self, address: tuple[str, int]) -> None:
        await self.broker.add_found(address)


async def start_finder(broker: Broker, settings: Discovery, wait: float) -> Finder:
    """Start looking for nodes; return once some are ready and none is still
    being joined (at least ``discover.SETTLE`` s), or after ``wait`` s."""
    finder = Finder(Joiner(broker), settings)
    await finder.start()
    await finder.settled(wait)
    return finder
