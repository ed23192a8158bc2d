"""The client side of dispy's job environment, an extension of the core
client registered by JobCluster (the node side is :mod:`dpool.node.env`).

::

    JobCluster ── JobEnv(client) registers ──► Client handlers for
      FileDone     a depends/send_file write: its waiter, or the node left out
      SetupDone    the node's setup ran: admit it (jobs may go there now)
      SetupFail    the node is left out
      Provisional  ──► event "provisional" (job, value)
      SendFile     ──► event "file" (job, name, data)
      AvailInfo    ──► event "avail" (link): link.info["avail_info"] updated
"""
import itertools
import logging
from concurrent.futures import Future

from .. import protocol as P
from .. import serialize
from ..errors import BrokenCluster

log = logging.getLogger("dpool")


class JobEnv:
    def __init__(self, client):
        self.client = client
        self.waiters = {}  # FILE request id -> (NodeLink, Future of None or the node's error)
        self.ids = itertools.count(1)
        client.register({P.SetupDone: self.on_setup_done, P.SetupFail: self.on_setup_fail,
                         P.FileDone: self.on_file_done, P.Provisional: self.on_provisional,
                         P.SendFile: self.on_sendfile, P.AvailInfo: self.on_avail_info})
        self.listening = False  # on the client's events: from the first send_file on

    # ------------------------------------------------------------ loop thread

    def on_setup_done(self, link, msg, frames):
        link.hold = False
        if link.ready:
            self.client.admit(link)

    def on_setup_fail(self, link, msg, frames):
        self.client.leave_out(link, "setup failed", frames)

    def on_file_done(self, link, msg, frames):
        sent_to, waiter = self.waiters.get(msg.req_id, (link, None))
        if sent_to is not link:  # request numbers are guessable: another node's
            self.client.distrust(link, f"an answer to file request {msg.req_id}, not sent to it")
            return
        self.waiters.pop(msg.req_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg.error)
        elif msg.error is not None:  # a dependency sent before the session was ready
            link.error = BrokenCluster(msg.error)
            link.retry = False  # not a node to re-join
            log.error("node %s: %s (the node is left out)", link.name, msg.error)
            link.conn.abort()

    def on_provisional(self, link, msg, frames):
        if not self.client.trusted(link, [msg.job_id], "a provisional result"):
            return
        job = self.client.jobs.get(msg.job_id)
        if job is not None:
            try:
                value = serialize.loads(frames[1:])
            except Exception as exc:
                log.warning("a provisional result of job %s could not be loaded: %r", job.id, exc)
                return
            self.client.emit("provisional", (job, value))

    def on_event(self, kind, obj):
        """A node whose connection went down answers none of its file
        requests: fail their waiters now instead of leaving them forever."""
        if kind != "node" or obj.ready:
            return
        for req_id, (sent_to, waiter) in list(self.waiters.items()):
            if sent_to is obj:
                del self.waiters[req_id]
                if not waiter.done():
                    waiter.set_result(f"node {obj.name} went away before it wrote the file"
                                      f" ({obj.error})")

    def on_avail_info(self, link, msg, frames):
        link.info["avail_info"] = msg.info
        self.client.emit("avail", link)

    def on_sendfile(self, link, msg, frames):
        if not self.client.trusted(link, [msg.job_id], "a file"):
            return
        self.client.emit("file", (self.client.jobs.get(msg.job_id), msg.name, frames[1]))

    # ------------------------------------------------------------ user thread

    def send_file(self, link, name, data, mode=0o644):
        """Write ``data`` as ``name`` in the node's session folder; returns a
        Future of None (written) or the node's error text."""
        waiter = Future()
        req_id = next(self.ids)
        self.waiters[req_id] = (link, waiter)

        def send():
            if not self.listening:  # (not before: a listener costs a call per job)
                self.listening = True
                self.client.listeners.append(self.on_event)
            if not link.ready or link.conn.closed:
                self.waiters.pop(req_id, None)
                waiter.set_result(f"node {link.name} is not connected")
                return
            if not self.client.claim(link):  # a user thread holds it (a direct call)
                self.client._direct.defer(send)  # (once it is handed back)
                return
            link.conn.send([P.encode(P.File, req_id, name, mode), data])
        self.client.call_soon(send)
        return waiter
