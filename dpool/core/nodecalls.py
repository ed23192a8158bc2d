"""A scheduler client's own use of each node behind it: dispy's node methods
on a SharedJobCluster (``allocate_node``, ``deallocate_node``,
``close_node``, ``resetup_node``, ``set_node_cpus``, ``send_file``).

::

    client ── NodeCall(req_id, op, host, arg) ──► ClientSession.calls (NodeCalls)
           ◄── NodeReply(req_id, result) ─────────  acts on THIS client's leg
                                                    on that node and its jobs
    deallocate  no more of its jobs placed there (running ones finish)
    allocate    placed there again (a closed leg opened again, with setup)
    cpus        at most N of its jobs running there at once
    close       deallocate; its jobs queued for the node cancelled; its leg
                closed once its jobs there ended (terminate_pending: killed)
    resetup     close, then the leg opened again (setup runs again)
    file        File to that leg only; FileDone -> NodeReply 0 or -1

Every call acts on the calling client's session only (its legs, its
queues, its share): a client cannot change what another client runs on a
node, nor the node's CPUs.  The scheduler resolves ``host`` among its own
nodes; an unknown one answers -1.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from .. import protocol as P
from .nodeport import NodePort

log = logging.getLogger("dpool.scheduler")

#: Seconds between checks while a closing leg still runs the client's jobs.
CLOSE_POLL = 0.05


class NodeCalls:
    def __init__(self, session: Any) -> None:
        self.session = session  # a broker.ClientSession
        self.off: set[str] = set()  # hosts where none of its jobs is placed
        self.closed: set[str] = set()  # hosts whose leg it closed (no leg opened there)
        self.caps: dict[str, int] = {}  # host -> the most of its jobs running there
        self.extra: set[str] = set()  # hosts allocate_node added past its ``nodes``
        self._file_ids = itertools.count(-1, -1)  # (the client's own File ids are >= 0)
        self._ops = {"allocate": self.allocate, "deallocate": self.deallocate,
                     "close": self.close, "resetup": self.resetup, "cpus": self.set_cpus}

    @property
    def active(self) -> bool:
        return bool(self.off or self.caps)

    # ---------------------------------------------------------- placement

    def placeable(self, ports: list[NodePort]) -> list[NodePort]:
        """Of the client's usable nodes, those its jobs may go to now."""
        if not self.active:
            return ports
        return [port for port in ports if self.may_place(port)]

    def may_place(self, port: NodePort) -> bool:
        if port.host in self.off:
            return False
        cap = self.caps.get(port.host)
        return cap is None or self.running_on(port) < cap

    def running_on(self, port: NodePort) -> int:
        return sum(1 for where in self.session.placed.values() if where[0].port is port)

    # ---------------------------------------------------------- the calls

    def on_call(self, msg: Any, frames: list) -> None:
        if not self.session.options:  # before Session: nothing of the client's to act on
            log.warning("%s: a node call before its session; closing it",
                                     self.session)
            self.session.end("protocol error")
            return
        port = self.port_of(msg.host)
        try:
            if msg.op == "file":
                self.send_file(msg.req_id, port, msg.arg, frames[1:])
                return
            result = -1 if port is None else self._ops[msg.op](port, msg.arg)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            log.warning("%s: bad node call %r on %r: %s", self.session, msg.op, msg.host, exc)
            result = -1
        if asyncio.iscoroutine(result):
            self.session.broker.spawn(self._reply_later(msg.req_id, result))
        else:
            self.reply(msg.req_id, result)

    def reply(self, req_id: Any, result: Any) -> None:
        self.session.tell([P.encode(P.NodeReply, req_id, result)])

    async def _reply_later(self, req_id: Any, work: Any) -> None:
        self.reply(req_id, await work)

    def port_of(self, host: Any) -> NodePort | None:
        """The scheduler's node named ``host`` (its address as the scheduler
        has it, or the name the node reports), ready, or None."""
        if not isinstance(host, str):
            return None
        for port in self.session.broker.ready_nodes():
            name = (port.anchor.info if port.anchor else {}).get("name")
            if port.host == host or name == host:
                return port
        return None

    def allocate(self, port: NodePort, _: Any) -> int:
        """Its jobs go to the node again (dispy's allocate_node)."""
        host = port.host
        self.off.discard(host)
        self.closed.discard(host)
        if not self.session.wants(port):
            self.extra.add(host)
        self.session.open_leg(port)
        self.changed()
        return 0

    def deallocate(self, port: NodePort, _: Any) -> int:
        """No more of its jobs go to the node; those running there finish."""
        self.off.add(port.host)
        self.changed()
        return 0

    def set_cpus(self, port: NodePort, cpus: Any) -> int:
        """At most ``cpus`` of its jobs at once on the node (negative: all
        its CPUs but that many); the number now allowed."""
        cpus = int(cpus)
        allowed = min(port.cpus, cpus) if cpus >= 0 else max(0, port.cpus + cpus)
        if allowed >= port.cpus:
            self.caps.pop(port.host, None)
        else:
            self.caps[port.host] = allowed
        self.changed()
        session = self.session
        session.node_list.touch_host(port.host)  # their entries in its next Ready
        if session.told_cpus:
            session.tell_ready()  # its nodes' CPUs as it may use them
        return allowed

    def cpus_on(self, port: NodePort) -> int:
        """The CPUs of ``port`` this client may use (its Ready's nodes)."""
        cap = self.caps.get(port.host)
        return port.cpus if cap is None else min(cap, port.cpus)

    def close(self, port: NodePort, terminate: Any) -> Any:
        """Its leg on the node ends: its jobs queued for the node are
        cancelled, running ones finish first (killed with ``terminate``)."""
        self._closing(port, terminate)
        self.session.broker.spawn(self._close_when_idle(port, reopen=False))
        return 0

    def resetup(self, port: NodePort, terminate: Any) -> Any:
        """close, then its leg opened again: the setup runs again there."""
        self._closing(port, terminate)
        return self._close_when_idle(port, reopen=True)

    def _closing(self, port: NodePort, terminate: Any) -> None:
        self.off.add(port.host)
        self.closed.add(port.host)
        self.changed()
        self.cancel_pinned(port.host)
        if terminate:
            self.cancel_running(port)

    async def _close_when_idle(self, port: NodePort, reopen: bool) -> int:
        session = self.session
        while not session.ended and self.running_on(port):
            await asyncio.sleep(CLOSE_POLL)
        leg = session.legs.pop(port, None)
        if session.ended:
            return -1
        if leg is not None:
            leg.bye()  # (its close callback does the rest: leg_gone, sync)
        if not reopen:
            session.sync()
            return 0
        self.allocate(port, None)
        return await self._set_up(port)

    async def _set_up(self, port: NodePort) -> int:
        """0 once the client's new leg on ``port`` is open and set up, else -1."""
        session = self.session
        while not session.ended:
            leg = session.legs.get(port)
            if leg is None or leg.closed:
                return -1
            if leg.ready and leg not in session.env.held:
                return 0
            await asyncio.sleep(CLOSE_POLL)
        return -1

    def cancel_pinned(self, host: str) -> None:
        """Its jobs queued for ``host`` only (submit_node) are cancelled."""
        session = self.session
        queued = list(session.pinned.get(host, ()))
        if queued:
            session.on_cancel(P.Cancel(queued), [])

    def cancel_running(self, port: NodePort) -> None:
        ids = [job_id for job_id, where in self.session.placed.items()
               if where[0].port is port]
        if ids:
            self.session.on_cancel(P.Cancel(ids), [])

    def send_file(self, req_id: Any, port: NodePort | None, arg: Any, data: list) -> None:
        """The client's file to its session folder on that node only."""
        leg = None if port is None else self.session.legs.get(port)
        name, mode = arg
        if leg is None or not leg.ready or len(data) != 1 or not isinstance(name, str):
            self.reply(req_id, -1)
            return
        mode = int(mode)  # (a bad one raises before the answer is registered: answered once)
        file_id = next(self._file_ids)
        self.session.env.files[file_id] = [{leg}, None,
                                           lambda error: self.reply(req_id, -1 if error else 0)]
        leg.send([P.encode(P.File, file_id, name, mode), *data])

    def changed(self) -> None:
        self.session.sync()
        self.session.broker.place_soon()

