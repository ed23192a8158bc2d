"""A node session's liveness: heartbeats to its client while it is quiet,
and the client held to its lease (see :mod:`dpool.liveness`, the timing,
and :class:`dpool.node.runtime.Session`)."""
import asyncio
import logging

from .. import liveness
from .. import protocol as P

log = logging.getLogger("dpool.node")


class SessionLiveness:
    """The heartbeat and lease timer of one session (on its ``conn``)."""

    def __init__(self, session):
        self.session = session
        self._heartbeat = self._ticker = None

    def watch(self, settings):
        """Send heartbeats and hold the client to its lease (``settings``)."""
        self.unwatch()
        conn = self.session.conn
        conn.set_deadline(settings.deadline)
        loop = asyncio.get_running_loop()
        self._heartbeat = liveness.Heartbeat(settings, loop.time(), conn.bytes_received,
                                             conn.bytes_sent)
        self._ticker = loop.call_later(settings.tick, self._tick)

    def unwatch(self):
        if self._ticker is not None:
            self._ticker.cancel()
        self._heartbeat = self._ticker = None

    @property
    def settings(self):
        """The liveness settings the session is watched with (None: not watched)."""
        return self._heartbeat.settings if self._heartbeat is not None else None

    def _tick(self):
        conn, hb = self.session.conn, self._heartbeat
        if self.session.ended or conn.closed or hb is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.session.holds_client_back():
            hb.heard_at = now   # (its silence is the node's doing: not reading it)
        verdict = hb.tick(now, conn.bytes_received, conn.bytes_sent)
        if verdict is liveness.LOST:
            log.warning("session %s: client %s sent nothing for %.1f s (lease %s s): "
                        "treating it as gone", self.session.sid, conn.peer, hb.silence(now),
                        hb.settings.deadline)
            conn.abort()  # on_close ends (or detaches) the session
            return
        if verdict is liveness.SEND:
            conn.send([P.encode(P.Heartbeat)])
        self._ticker = loop.call_later(hb.settings.tick, self._tick)

    def on_heartbeat(self, msg, frames):
        """Nothing to do: its bytes already counted as a sign of life."""
