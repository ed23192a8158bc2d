"""A client's channel: a second connection that one worker of its session
serves itself, the node off a lone call's path (docs/performance.md "Round
trips via a node: taking the node off the path").

The session's Ready names a token (:attr:`SessionChannel.token`).  A new
connection whose first message is ``Channel(token)`` (after the full
handshake of any connection) is handed, socket and record state
(transport/handoff.py), to an idle worker of that session, which then owns
it (node/worker.py ``on_channel``): the node never reads or writes that
record stream again.  While it is lent, the worker is out of the
dispatcher's hands.  The node gets it back through the client: it sends
``Recall`` on the main link when it needs the worker (jobs queued there,
draining); the client writes ``Release`` on the channel after its last
call and the worker says ``Returned``.  A lent worker that dies is told to
the client on the main link (``ChannelLost``): the call it ran fails with
WorkerLost.  The session's end kills the lent worker with the others.

A JobCluster session (dispy's job environment) gets a channel too, once
its setup is done and until its cleanup begins: its workers were forked
from the setup process and run in the session's folder, so a lent one
runs a job as it would for the node; what a job sends back before its
end (provisional results, files) goes on the channel ahead of its DONE
(worker.py ``on_channel``).  A lent worker the client's end (its Bye, or
its death) finds on a channel comes back when the channel ends and runs
the user's cleanup if no other worker took it.
"""
import logging
import secrets

from .. import protocol as P
from ..transport.handoff import hand_off, sealed

log = logging.getLogger("dpool.node")


def open_channel(node, conn, token, serial):
    """``conn`` (a new connection) asked to be the channel of the session
    ``token`` names (``serial``: the client's number for it): True once a
    worker of that session has it; else the answer (Refused: no such
    session, a TLS connection, messages sent behind Channel, a serial not
    an int; Busy: none of its workers is free now, or its job environment
    is being set up or cleaned up) is sent on ``conn`` and False returned."""
    session = node.channels.get(token) if isinstance(token, str) else None
    if session is None:
        log.warning("a channel asked by %s names no session here; refused", conn.peer)
        conn.send([P.encode(P.Refused, "no session of this node has that channel token")])
        return False
    if not sealed(conn):  # (TLS: its state can't go to a worker, now or later)
        conn.send([P.encode(P.Refused, "this node's connections (TLS) can't be handed to "
                                       "a worker: no channel")])
        return False
    if conn.mid_read:  # (read with it, past the records the worker would go on from)
        log.warning("%s sent messages behind Channel before its answer; refused", conn.peer)
        conn.send([P.encode(P.Refused, "a channel takes no message before its Ready")])
        return False
    if type(serial) is not int:
        log.warning("%s asked for a channel numbered %.40r; refused", conn.peer, serial)
        conn.send([P.encode(P.Refused, "a channel's serial is an int")])
        return False
    if not session.channel.lend(conn, serial):
        conn.send([P.encode(P.Busy, "no worker of the session is free for a channel now")])
        return False
    return True


def _env_busy(env):
    """Whether dispy's job environment (a JobCluster session's) keeps its
    workers from a channel now: its setup not done yet, or its cleanup
    begun.  Once set up, a worker serves a channel as it serves the node
    (forked from the setup process, in the session's folder; what a job
    sends back, provisional results and files, goes on the channel ahead
    of its DONE)."""
    return env is not None and (env.state not in (None, "done") or env.cleaning)


class SessionChannel:
    """One session's channel: its token and the worker it is lent to."""

    def __init__(self, session):
        self.session = session
        self.token = secrets.token_urlsafe(16)
        self.worker = None     # the worker serving the channel
        self.sock = None       # the node's copy of its socket, until the worker has it
        self.recalled = False  # Recall sent, Returned not yet
        self.serial = None     # the lent channel's number (the client's, in its Channel)

    def lendable(self):
        """An idle worker of the session that may serve a channel now, or None."""
        session = self.session
        if self.worker is not None or session.ended or session.draining \
                or _env_busy(session.env) or session.dispatcher.queue \
                or session.options.get("max_tasks") or session.conn.closed \
                or session.arg_relay is not None:
            return None
        for worker in session.workers:
            if worker.fns and not worker.outstanding and not worker.dead \
                    and worker.killing is None and worker.relay is None \
                    and not worker.conn.relaying and not worker.conn.closed:
                return worker
        return None

    def lend(self, conn, serial):
        """Hand ``conn``, the channel numbered ``serial``, to an idle worker
        (True), or leave it (False)."""
        worker = self.lendable()
        if worker is None:
            return False
        handed = hand_off(conn)
        if handed is None:
            return False
        sock, state = handed
        self.session.workers.remove(worker)
        self.worker, self.sock, self.recalled, self.serial = worker, sock, False, serial
        worker.conn.send_with([P.encode(P.Channel, ""), state.pack()], sock.fileno())
        return True

    def on_worker_message(self, worker, msg):
        """Channel (the worker has the socket) or Returned from the lent worker."""
        if worker is not self.worker:
            return
        if type(msg) is P.Channel:
            self._close_copy()
            return
        self._close_copy()
        self.worker, self.recalled = None, False
        session = self.session
        if not session.ended and not worker.dead:
            session.workers.append(worker)
            env = session.env
            if env is not None and env.cleaning and env.cleanup_worker is None:
                env.send_cleanup(worker)  # (the client went while it was lent: none ran it)
            session.dispatch()
            if session.draining:
                session._end_if_drained()

    def recall(self):
        """The node needs the lent worker: the client is asked to release it."""
        session = self.session
        if self.worker is not None and not self.recalled and not session.conn.closed:
            self.recalled = True
            session.conn.send([P.encode(P.Recall, self.serial)])

    def worker_exited(self, worker, how):
        """True if ``worker`` was the lent one: the client hears ChannelLost."""
        if worker is not self.worker:
            return False
        self._close_copy()
        self.worker, self.recalled = None, False
        session = self.session
        if not session.ended and not session.conn.closed:
            why = f"the worker process (pid {worker.pid}) serving the channel {how}"
            session.conn.send([P.encode(P.ChannelLost, why, self.serial)])
        return True

    def end(self):
        """The session ends: the lent worker, if any, to be killed with the rest."""
        self._close_copy()
        worker, self.worker = self.worker, None
        self.session.node.channels.pop(self.token, None)
        return worker

    def _close_copy(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
