"""The nodes a dpool-scheduler's client may run its jobs on, as it was
told of them in Ready: the first Ready lists them, later ones only what
changed (see :class:`dpool.core.broker.ClientSession` and
:func:`dpool.core.nodeevents.ready_info`, the client's side)."""
from __future__ import annotations

from typing import Callable

from .nodeport import NodePort


def _node_entry(port: NodePort) -> dict:
    """A node as its clients see it (``nodes`` in Ready)."""
    name = (port.anchor.info if port.anchor else {}).get("name") or port.host
    return {"host": port.host, "port": port.port, "name": name, "cpus": port.cpus}


class NodeList:
    """One client's nodes: those where its leg is usable now (``usable``,
    the live set the share policy reads), those its last Ready listed
    (``told``), and those whose entry may have changed since (``dirty``):
    a Ready costs the changes, not all the nodes."""

    def __init__(self, cpus_on: Callable[[NodePort], int]) -> None:
        self.cpus_on = cpus_on  # the CPUs of a node the client may use (nodecalls.py)
        self.usable: dict[NodePort, None] = {}
        self.told: dict[NodePort, dict] = {}
        self.dirty: dict[NodePort, None] = {}
        self.changed = False  # usable changed since the last Ready

    def recheck(self, port: NodePort, usable: bool) -> None:
        """Whether its leg on ``port`` is usable now (open, its setup done)."""
        if usable != (port in self.usable):
            if usable:
                self.usable[port] = None
            else:
                del self.usable[port]
            self.dirty[port] = None
            self.changed = True

    def ports(self) -> list[NodePort]:
        return list(self.usable)

    def entry(self, port: NodePort) -> dict:
        return dict(_node_entry(port), cpus=self.cpus_on(port))

    def entries(self) -> dict[NodePort, dict]:
        """The nodes its jobs may run on now, as Ready lists them (the CPUs
        of each it may use: set_node_cpus, nodecalls.py)."""
        return {port: self.entry(port) for port in self.ports()}

    def tell_all(self) -> list[dict]:
        """Every node, for a Ready that lists them all (the first, or one
        that recovers a session); nothing is left to tell."""
        self.changed = False
        self.told = self.entries()
        self.dirty.clear()
        return list(self.told.values())

    def changes(self) -> tuple[list[dict], list[list]]:
        """The entries new or changed, and the nodes gone, since the last
        Ready (of the ``dirty`` ones only); ``told`` updated."""
        told, usable = self.told, self.usable
        added: list[dict] = []
        removed: list[list] = []
        for port in self.dirty:
            if port in usable:
                entry = self.entry(port)
                if told.get(port) != entry:
                    told[port] = entry
                    added.append(entry)
            elif told.pop(port, None) is not None:
                removed.append([port.host, port.port])
        self.dirty.clear()
        return added, removed

    def touch(self, port: NodePort) -> None:
        """``port``'s entry goes in the next Ready if it was told of (a
        node back: its CPUs or name may differ)."""
        if port in self.told:
            self.dirty[port] = None

    def touch_host(self, host: str) -> None:
        """The entries of the nodes at ``host`` go in the next Ready (the
        CPUs the client may use there changed)."""
        for port in self.told:
            if port.host == host:
                self.dirty[port] = None
