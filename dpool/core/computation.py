"""What of a scheduler's client goes to every node its jobs may run on
(``dpool-scheduler``, see broker.py): dispy's job environment, relayed.

::

    client ── File(None) (depends), Setup ──► preamble: sent to each leg now,
                                              and to each leg opened later
           ── File(req_id) (send_file) ────► every open leg; FileDone back
                                              once each has answered
    legs ──── SetupDone / SetupFail ───────► SetupDone to the client once no
                                              leg is left to set up (some did),
                                              SetupFail if none could

Nothing here is unpickled: the client's frames go to the nodes as they came.
A leg whose setup has not finished is *held*: no job goes there.
"""
from __future__ import annotations

import logging
from typing import Any

from .. import protocol as P
from .. import serialize
from ..errors import NodeLost
from .nodeport import Link

log = logging.getLogger("dpool.scheduler")


class Computation:
    def __init__(self, session: Any) -> None:
        self.session = session  # a broker.ClientSession
        self.preamble: list[list] = []  # File(None) and Setup messages, in order
        self.held: set[Link] = set()  # legs whose setup has not finished
        self.state: str | None = None  # None, "done", "failed"
        self.set_up = 0  # legs whose setup ran
        self.failure: list | None = None  # a leg's SetupFail frames
        # file request -> [legs to answer, first error, fn(error) answering the client]
        self.files: dict[int, list] = {}

    @property
    def needs_setup(self) -> bool:
        return bool(self.session.options.get("setup"))

    def leg_opening(self, leg: Link) -> None:
        if self.needs_setup:
            self.held.add(leg)

    def leg_gone(self, leg: Link) -> None:
        """A leg closed (or never opened): it answers nothing more."""
        self.held.discard(leg)
        for req_id in list(self.files):
            self.answered(req_id, leg, f"node {leg.port} went away")
        self.check()

    # ------------------------------------------------------------ from the client

    def on_file(self, msg: Any, frames: list) -> None:
        if msg.req_id is None:  # a dependency: every node gets it, new ones too
            self.on_setup(msg, frames)
            return
        legs = [leg for leg in self.session.legs.values() if leg.ready]
        if not legs:
            self.session.tell([P.encode(P.FileDone, msg.req_id, "no node is connected")])
            return
        self.files[msg.req_id] = [set(legs), None, lambda error: self.session.tell(
            [P.encode(P.FileDone, msg.req_id, error)])]
        for leg in legs:
            leg.send(list(frames))

    def on_setup(self, msg: Any, frames: list) -> None:
        self.preamble.append(list(frames))
        for leg in self.session.legs.values():
            if leg.conn is not None:  # (one still connecting sends the preamble)
                leg.send(list(frames))

    # ------------------------------------------------------------ from the legs

    def on_leg_message(self, leg: Link, kind: type, msg: Any, frames: list) -> None:
        if kind is P.SetupDone:
            self.held.discard(leg)
            self.set_up += 1
            self.session.recheck(leg.port)
            self.session.sync_soon()
            self.check()
        elif kind is P.SetupFail:
            self.failure = list(frames)
            log.warning("%s: setup failed on node %s (left out)", self.session, leg.port)
            leg.bye()
        elif kind is P.FileDone:
            if msg.req_id is None:
                if msg.error is not None:
                    log.warning("%s: node %s could not write a dependency: %s", self.session,
                                leg.port, msg.error)
            else:
                self.answered(msg.req_id, leg, msg.error)

    def answered(self, req_id: int, leg: Link, error: str | None) -> None:
        state = self.files.get(req_id)
        if state is None or leg not in state[0]:
            return
        state[0].discard(leg)
        state[1] = state[1] or error
        if not state[0]:
            del self.files[req_id]
            state[2](state[1])  # the answer: FileDone, or a node call's NodeReply

    def check(self) -> None:
        """Once no leg is left to set up: SetupDone for the client if some
        node ran its setup (so its first jobs spread over all of them), else
        SetupFail."""
        if self.state is not None or not self.needs_setup or self.held:
            return
        if self.set_up:
            self.state = "done"
            self.session.tell([P.encode(P.SetupDone,
                                        {"cpus": self.session.broker.total_cpus()})])
        elif not self.session.legs:
            self.state = "failed"
            self.session.tell(self.failure or [
                P.encode(P.SetupFail),
                *serialize.dump_exception(NodeLost("no node could run the setup"))])
