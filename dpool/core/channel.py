"""The client's side of a channel (docs/performance.md "Round trips via a
node: taking the node off the path"): a second connection to the client's
only node, served by one worker of its session, on which the calling
thread writes a lone call's RUN and reads its DONE (:mod:`.tcpline`), the
node off the call's path.  The main link stays with the loop thread
(heartbeats, every other job).

All of it runs in the loop thread.  :class:`ClientChannel` opens the
channel at an idle moment (the node's ``Ready`` named a token; a TLS
client never tries: a TLS node can't hand its connections on), keeps its
function table (the worker knows only the functions sent on it, and no
``Forget`` goes there: past ``NODE_FUNCTIONS`` a new function takes the
node's path) and does what the node asks on the main link:

* ``Recall``: ``Release`` on the channel once the call in flight is
  answered, then closed; lone calls go via the node until a channel is
  opened again at a later idle moment.
* ``ChannelLost``: its worker died; the call on it fails with WorkerLost,
  as the node reports a job whose worker died.

A call the loop thread takes over from a user thread (a timeout, a
hand-back asked for) is a job in flight on the main link's node for the
scheduler (its CPU counted) whose answer comes on the channel.  The
channel ending under such a call: ``ChannelLost`` fails it, the main
link's end makes it a lost node's job; if the channel was cut by this
client (Ctrl-C in the middle of a record) it is rerun through the node at
once (attempt + 1), and if neither notice comes within the heartbeat
deadline it is rerun too.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from .. import protocol as P
from ..errors import ConnectionClosed, DpoolError, JobCancelled, ProtocolError, WorkerLost
from ..transport import connect
from .job import TERMINATED
from .links import client_hello, describe

__all__ = ["ClientChannel"]

log = logging.getLogger("dpool")

#: What a JobCluster job sends back before its DONE (its worker writes them
#: on the channel; the loop thread hands them to the cluster's handlers).
_PASSED_ON = (P.Provisional, P.SendFile)
#: Seconds before trying again after Busy (or a failed try), doubling up to RETRY_MAX.
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
#: Seconds the client's close waits for a channel being opened (its
#: handshake) before cutting it: cut mid-authentication, the node logs it as
#: a rejected connection (a WARNING at each such shutdown).
OPENING_GRACE = 0.5


class ClientChannel:
    """(loop thread) The channel of a :class:`~dpool.core.tcpline.TcpLine`."""

    def __init__(self, line: Any) -> None:
        self.line = line
        self.client = line.client
        self.loop = line.loop
        self.conn: Any = None       # the channel, once its worker said Ready
        self.link: Any = None       # the main link whose session it belongs to
        self.fns: set[Any] = set()  # the functions sent on it
        self.job: Any = None        # a call taken over by the loop thread, answered here
        self.opening: asyncio.Task[None] | None = None
        self.refused = False        # the node said it never will: not tried again
        self.delay = RETRY_FIRST
        self.next_try = 0.0
        self.recalled = False       # Release once the call in flight is answered
        self.recalled_early = False  # Recall came while opening (before the worker's Ready)
        self.lost: str | None = None  # ChannelLost's text, until acted on
        self.cut = False            # cut by this client in the middle of a record
        self.waiting: asyncio.TimerHandle | None = None  # ended under a call: notice awaited
        self.retry: asyncio.TimerHandle | None = None  # the next try, after Busy or a failure
        self.closing: list[Any] = []  # connections closed here, to wait for at the end
        self.calls = 0              # calls answered on channels (tests, benchmarks)
        self.opened = 0             # channels opened (tests)
        self.pid: Any = None        # the pid of the channel's worker, as it said
        self.halted = False         # Halt sent: its worker is stopped whatever it runs then
        self.serial = 0             # the number of the channel open or being opened (its
        # Channel's): the node's Recall and ChannelLost name it, this client's Halt too

    # ------------------------------------------------------------ opening

    def usable(self, link: Any) -> bool:
        """Whether lone calls may go on the channel now (to be lent)."""
        conn = self.conn
        return conn is not None and self.link is link and not conn.closed \
            and not self.recalled and self.lost is None and self.job is None \
            and not self.halted

    def full(self, fn_id: Any) -> bool:
        """(any thread) Whether ``fn_id`` can't be sent on the channel: a new
        function when it holds its share already (no Forget goes there)."""
        from .tcpline import NODE_FUNCTIONS

        return fn_id not in self.fns and len(self.fns) >= NODE_FUNCTIONS

    def maybe_open(self, link: Any) -> None:
        """The client is idle with ``link`` its only one: open a channel if
        the node offers one and it is time to try."""
        client = self.client
        if self.conn is not None or self.opening is not None or self.refused \
                or self.job is not None or self.line.closed or client.ssl is not None \
                or client._extended and not client.direct_events:
            return  # (TLS: no node hands a connection on; an extension's messages
            # (JobCluster's) reach the loop thread from a channel only with
            # direct_events; a call on the last channel waits for a notice
            # that names that channel)
        token = link.info.get("channel")
        if not isinstance(token, str):
            return
        wait = self.next_try - self.loop.time()
        if wait > 0:  # (too early: then, if the client is idle at that moment)
            if self.retry is None:
                self.retry = self.loop.call_later(wait, self._try_again)
            return
        self.recalled_early = False
        self.serial += 1
        self.opening = self.loop.create_task(self._open(link, token, self.serial))

    async def _open(self, link: Any, token: str, serial: int) -> None:
        conn = None
        try:
            try:
                timeout = self.client.connect_timeout
                host, port = link.address
                async with asyncio.timeout(timeout):
                    conn = await connect(host, port, secret=self.client.secret or b"",
                                         hello=client_hello(), timeout=timeout)
                    if self.line.closed:  # (the client closes: it waited for this much)
                        self._drop(conn)
                        return
                    conn.send([P.encode(P.Channel, token, serial)])
                    msg = P.decode((await conn.recv())[0])
            except (OSError, DpoolError, TimeoutError) as exc:
                log.debug("node %s: no channel: %s", link.name, describe(exc))
                self._later()
                if conn is not None:
                    self._drop(conn)
                return
            if type(msg) is P.Ready and link is self.line.link and link.ready \
                    and not self.line.closed and not conn.closed and not self.recalled_early:
                self._opened(conn, link, msg.info.get("pid"))
                return
            if type(msg) is P.Refused:
                self.refused = True
                log.debug("node %s refuses a channel: %s", link.name, msg.reason)
            else:  # Busy (no worker free now), or no longer wanted
                self._later()
                if type(msg) is P.Ready:
                    _release(conn)
            self._drop(conn)
        except BaseException:  # (cancelled: the client closes)
            if conn is not None and conn is not self.conn:
                conn.abort()
            raise
        finally:
            self.opening = None

    def _opened(self, conn: Any, link: Any, pid: Any) -> None:
        self.conn, self.link, self.fns, self.pid = conn, link, set(), pid
        self.recalled, self.lost, self.cut, self.delay = False, None, False, RETRY_FIRST
        self.halted = False
        conn.set_receiver(lambda frames: self._on_message(conn, frames),
                          lambda exc=None: self._on_closed(conn, exc))
        self.opened += 1
        line = self.line
        if line.holds_link(link):  # (parked meanwhile: the channel is lent instead)
            if not line.reclaim(wake=False):
                line.defer(line.offer)  # (once a user thread hands the link back)
                return
        line.offer()

    def _later(self) -> None:
        """Try again after the backoff, at that moment if the client is idle
        then (lone calls on the parked link are idle moments too: nothing
        else would come to try), else at the next idle moment after it."""
        self.next_try = self.loop.time() + self.delay
        if self.retry is None:
            self.retry = self.loop.call_later(self.delay, self._try_again)
        self.delay = min(self.delay * 2, RETRY_MAX)

    def _try_again(self) -> None:
        self.retry = None
        if self.loop.time() < self.next_try:  # (put off meanwhile)
            self.retry = self.loop.call_later(self.next_try - self.loop.time(), self._try_again)
            return
        line, client = self.line, self.client
        if line.closed or self.conn is not None or not line._alone():
            return  # (the next idle moment with the node alone tries: TcpLine._park)
        if client._unfinished or client._incoming:  # busy now: a moment later
            self.retry = self.loop.call_later(RETRY_FIRST, self._try_again)
            return
        self.maybe_open(line.link)

    def _drop(self, conn: Any, abort: bool = False) -> None:
        conn.abort() if abort else conn.close()
        self.closing = [*self.closing[-7:], conn]  # (long closed by the 8th)

    # --------------------------------------------------- the loop reading it

    def taken_back(self, job: Any, messages: Any, error: BaseException | None,
                   rest: Any) -> None:
        """(the line handed the channel back) ``job`` (the call in flight,
        if any) is the loop thread's now: its answer comes on the channel."""
        conn, client, link = self.conn, self.client, self.link
        if job is not None:
            if client.scheduler.nodes.get(link) is None and not self.line.closed:
                client.directs.resubmit(job)  # the node was lost meanwhile: a lost node's job
            elif client._direct_adopt(job, link, pinned=False):
                self.job = job
        if error is not None:
            self.cut = True
        if conn is not None:
            conn.take_back(messages, error, rest)
        if self.lost is not None:
            self._lost_heard()
        elif self.recalled and self.job is None:
            self.release()

    def _on_message(self, conn: Any, frames: Any) -> None:
        try:
            msg = P.decode(frames[0])
        except ProtocolError:
            msg = None
        job = self.job
        kind = type(msg)
        if conn is self.conn and job is not None and kind is P.Done \
                and len(msg.results) == 1 and msg.results[0][0] == job.id:
            self.job = None
            self._answered(job, frames)
            return
        if conn is self.conn and job is not None and kind in _PASSED_ON \
                and msg.job_id == job.id:  # (dispy's: as if the node had passed it on)
            self.client.net.handlers[kind](self.link, msg, frames)
            return
        log.warning("node %s: unexpected %s on the channel: closed", self.link.name,
                    type(msg).__name__)
        conn.abort()

    def _answered(self, job: Any, frames: Any) -> None:
        client, link = self.client, self.link
        if client.scheduler.finish(link, job.id):  # (cancelled meanwhile: it ended first)
            link.in_flight.discard(job.id)
            client.jobs.pop(job.id, None)
            client._direct_done(job, frames)
            client._act(client.scheduler.dispatch())
        self._next()

    def _cancelling(self, job: Any) -> bool:
        state = self.client.scheduler.jobs.get(job.id)
        return state is not None and state.cancelling

    def _next(self) -> None:
        if self.recalled:
            self.release()
        else:
            self.line.offer()

    def _on_closed(self, conn: Any, exc: BaseException | None) -> None:
        if conn is not self.conn:
            return
        self.conn, self.fns = None, set()
        self._later()
        if self.job is None or self.line.closed:
            self.lost = None  # (a ChannelLost heard: the call's DONE came first)
            if self.waiting is not None:
                self.waiting.cancel()
                self.waiting = None
            return
        if self.lost is not None:
            self._settle_lost()
        elif self.cut:  # (cut here: nothing else will tell)
            self._rerun()
        else:  # ChannelLost (its worker died) or the main link's end will say
            self.waiting = self.loop.call_later(self.client.liveness.deadline, self._rerun)

    def _rerun(self) -> None:
        """The channel ended under a call and no notice came: the call goes
        through the node (a new attempt), as a job given back."""
        self.waiting = None
        job, self.job = self.job, None
        if job is None:
            return
        link, client = self.link, self.client
        link.in_flight.discard(job.id)
        client._act(client.scheduler.given_back(link, [job.id]))

    # --------------------------------------------------- what the node says

    def on_recall(self, serial: int) -> None:
        """The node needs the channel's worker back."""
        if serial != self.serial:
            return  # (about an earlier channel: come late)
        if self.conn is None:
            # (the node lent a worker and wants it back before its Ready came)
            self.recalled_early = self.opening is not None
            return
        self.recalled = True
        line = self.line
        if line.on_chan and not line.reclaim(wake=False):
            return  # a user thread hands it back after its call's answer (taken_back)
        if self.job is None:
            self.release()

    def on_lost(self, why: str, serial: int) -> None:
        """The channel's worker died (the call on it fails with WorkerLost)."""
        if serial != self.serial or self.conn is None and self.job is None:
            return  # (about an earlier channel, come late; or released meanwhile)
        self.lost = why
        line = self.line
        if line.on_chan and not line.reclaim():
            return  # a user thread hands it back (taken_back)
        self._lost_heard()

    def _lost_heard(self) -> None:
        """(ChannelLost heard, the channel not lent) A call on the channel
        is settled once the channel's end is read: a DONE its worker sent
        before it died comes first there (the node closed its copy of the
        socket before saying ChannelLost), and the call keeps its value."""
        conn = self.conn
        if self.job is None or conn is None or conn.closed:
            self._settle_lost()
        elif self.waiting is None:  # (_on_closed settles it; this if the end never comes)
            self.waiting = self.loop.call_later(self.client.liveness.deadline,
                                                self._settle_lost)

    def _settle_lost(self) -> None:
        why, self.lost = self.lost, None
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None
        job, self.job = self.job, None
        if job is not None:
            client, link = self.client, self.link
            cancelling = self._cancelling(job)  # (read before finish forgets it)
            if client.scheduler.finish(link, job.id):
                link.in_flight.discard(job.id)
                client.jobs.pop(job.id, None)
                if cancelling:
                    _killed(client, job)
                else:
                    client._direct_failed(job, WorkerLost(
                        str(why).replace("serving the channel", "running this job")))
                client._act(client.scheduler.dispatch())
        conn, self.conn, self.fns = self.conn, None, set()
        if conn is not None:
            self._drop(conn, abort=True)
            if self.line.holds_link(self.link):  # (halted: lone calls went on the link,
                self._later()                    # and nothing else would try again)
        self.line.offer()

    def halt(self, job: Any) -> None:
        """The user cancelled ``job``, the call on the channel: the node
        stops the channel's worker (ChannelLost then reports it cancelled).
        The node stops it whatever it runs when the Halt comes (the call may
        end first, its DONE on its way): the channel takes no more calls."""
        if self.job is job and self.link is not None and self.link.conn is not None:
            self.halted = True
            try:
                self.link.conn.send([P.encode(P.Halt, self.serial)])
            except ConnectionClosed:
                pass

    # ------------------------------------------------------------ the end

    def release(self) -> None:
        """(not lent) Release the channel and close it."""
        self.recalled = False
        conn, self.conn, self.fns = self.conn, None, set()
        if conn is None:
            return
        self.next_try = max(self.next_try, self.loop.time() + RETRY_FIRST)
        _release(conn)
        self._drop(conn)

    def drop(self, link: Any) -> None:
        """(not lent) ``link``, the channel's session, ended: the call in
        flight is a lost node's job (the scheduler's), the channel closed."""
        if self.link is not link:
            return
        self.job = self.lost = None
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None
        conn, self.conn, self.fns = self.conn, None, set()
        if conn is not None:
            self._drop(conn, abort=True)

    async def close(self) -> None:
        """(the client closing, nothing lent) Release, close, wait for it."""
        if self.opening is not None:  # (let a handshake under way end: see OPENING_GRACE)
            await asyncio.wait([self.opening], timeout=OPENING_GRACE)
        if self.opening is not None:
            self.opening.cancel()
            try:
                await self.opening
            except BaseException:  # (cancelled, or its own error: closing anyway)
                pass
        if self.waiting is not None:
            self.waiting.cancel()
        if self.retry is not None:
            self.retry.cancel()
        self.job = None
        self.release()
        closing, self.closing = self.closing, []
        for conn in closing:
            try:
                await asyncio.wait_for(conn.wait_closed(), 1.0)
            except (TimeoutError, DpoolError, OSError):
                conn.abort()


def _release(conn: Any) -> None:
    try:
        conn.send([P.encode(P.Release)])
    except ConnectionClosed:
        pass


def _killed(client: Any, job: Any) -> None:
    """``job`` was cancelled (dispy's cancel) as it ran: Terminated, as a
    running job the node stops."""
    client.directs.finish(job, TERMINATED, None,
                          JobCancelled("job cancelled: its process was killed"))
