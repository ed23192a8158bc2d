"""Direct calls over a node's TCP link: the calling thread writes the RUN
record and reads the DONE itself while nothing else is in flight.

::

    user thread                                client loop thread
    ───────────                                ──────────────────
                                               the client goes idle with one
                                               node: it parks that link (stops
                                               reading it; Connection.lend)
    submit, nothing else in flight ──► FUNC (once) + RUN sealed into a record
                                       and written here (LentSocket)
    result() ──► DONE read, its record opened, the future resolved here
                 (no client loop-thread wake-up on either leg)

    anything else takes the link back for the loop thread (it reads again,
    the call in flight becomes one of its jobs, and what the user thread
    read and can't handle is delivered to it): a second job submitted, a
    cancel, a heartbeat tick (every ``liveness.tick`` s: a call longer than
    that is read by the loop thread, which keeps the heartbeats), closing,
    a result(timeout) that times out, done(), add_done_callback, wait(),
    a message other than the call's DONE or a heartbeat, the end of the
    stream or a bad record (the connection then ends as it would have in
    the loop thread: the call is rerun or fails as any job of a lost node).

The record state (sequence numbers of both directions) is the connection's
own: at any time exactly one thread uses it, ``owner`` says which (the lock
guards it): None and parked: nobody (a user thread may take it); USER: a
user thread writes or reads; LOOP: it is being handed back to the loop.
While the link is parked the loop thread touches neither the connection nor
the link's bookkeeping (``fns``, ``in_flight``); every loop-thread path that
would first calls :meth:`TcpLine.reclaim` and, if a user thread holds the
link, :meth:`defer`\\s what it wanted to do until the link is handed back.
"""
from __future__ import annotations

import math
import os
import select
import threading
import time
from typing import Any

from .. import protocol as P
from ..errors import ConnectionClosed, ProtocolError
from ..transport.frames import total_bytes
from ..transport.lent import LentSocket
from .channel import ClientChannel
from .direct import _HeldInterrupts

__all__ = ["TcpLine"]

_USER, _LOOP = "user", "loop"
#: Functions a node keeps for a client; past that the unused ones are forgotten.
NODE_FUNCTIONS = 1024
_HEARTBEAT = P.encode(P.Heartbeat)  # (as it arrives: a fixed frame)

#: A call whose frames pass this many bytes takes the node's path even when
#: the channel is lent: the node streams a large argument on to a worker as
#: it arrives, which a channel's worker reading and opening it itself does at
#: 0.68x the speed, with twice the worker's CPU (docs/performance.md); below
#: it the channel's shorter round trip wins.
CHANNEL_MAX_BYTES = 1 << 20


def _large(frames: list[Any]) -> bool:
    return total_bytes(frames) > CHANNEL_MAX_BYTES


class TcpLine:
    """The client's direct calls over ``link`` (its only node link)."""

    def __init__(self, client: Any, link: Any) -> None:
        self.client, self.link = client, link
        self.loop = client.loop
        self.lock = threading.Lock()
        self.lent: LentSocket | None = None  # while the link is parked
        self.poller: Any = None
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the loop wants the link
        self.job: Any = None  # the direct call in flight
        self.owner: str | None = None
        self.wanted = False  # the loop thread asked for the link back
        self.closed = False
        self.deferred: list[Any] = []  # loop-thread work waiting for the link
        self._mid_read = False  # a user thread is decoding what it read
        self.counted: Any = None  # the last call whose function was counted in flight
        self.interrupted: Any = None  # the last call made by a submit that was interrupted
        # The node's channel (core/channel.py): lent instead of the link
        # when open (``on_chan``); the link then stays the loop thread's.
        self.chan = ClientChannel(self)
        self.on_chan = False

    # ------------------------------------------------------------ user side

    def free(self) -> bool:
        """(a hint, without the lock) True if a call may go direct now."""
        return self.lent is not None and self.job is None and self.owner is None \
            and not self.closed

    def start(self, job: Any) -> bool:
        """Send ``job`` (a plain call, its future a DirectFuture on this line,
        set running) on the parked link; False if the line is not free or the
        link broke (the caller takes the normal path).  Interrupted
        (KeyboardInterrupt, anywhere), see :meth:`_interrupted`."""
        owned, begun = False, 0
        drop: list[Any] = []
        lent: LentSocket | None = None
        try:
            with self.lock:
                if not self.free() or self.on_chan and (
                        self.chan.full(job.fn_id) or _large(job.frames)):
                    return False
                lent = self.lent
                assert lent is not None
                # (one statement of plain stores: no interrupt can come in between)
                self.job, self.owner, begun, owned = job, _USER, lent.sends, True
            try:
                messages, drop = self._plan(job)
                lent.send(messages)
            except OSError as exc:  # the node is gone (or the socket broke mid-record)
                self._cut_short(lent, exc)
                return False
            self._count(job, drop)
            with self.lock:
                if not (self.wanted or self.closed):
                    self.owner = None
                    return True
                self.owner = _LOOP
            self._in_loop(self._take_back, lent, (), None)
            return True
        except BaseException:  # (KeyboardInterrupt)
            if owned and lent is not None:
                with _HeldInterrupts():
                    self._interrupted(job, lent, begun, drop)
            raise

    def _plan(self, job: Any) -> tuple[list[list[Any]], list[Any]]:
        """(the owner) The messages for ``job`` (FORGET of functions no job
        needs when the node holds too many, FUNC if the node lacks the
        function, RUN) and the functions forgotten; nothing changed yet."""
        fns, fn_id = self.link.fns, job.fn_id
        messages = [[P.encode(P.Run, [P.run_item(job.id, fn_id, len(job.frames), 0, 1)]),
                     *job.frames]]
        if self.on_chan:  # (its own table: no Forget there, see ClientChannel.full)
            if fn_id not in self.chan.fns:
                messages.insert(0, [P.encode(P.Func, fn_id), job.blob])
            return messages, []
        if fn_id in fns:
            return messages, []
        messages.insert(0, [P.encode(P.Func, fn_id), job.blob])
        drop = self.link.forgettable(NODE_FUNCTIONS * 3 // 4) \
            if len(fns) >= NODE_FUNCTIONS else []
        if drop:  # (as the loop thread's sends do)
            messages.insert(0, [P.encode(P.Forget, drop)])
        return messages, drop

    def _count(self, job: Any, drop: list[Any]) -> None:
        """(the owner, ``job`` sent) Its function is in flight on the link,
        as the loop thread counts them; ``drop`` forgotten.  Done again
        after an interrupt, it changes nothing more."""
        fns, fn_id = self.link.fns, job.fn_id
        if self.on_chan:  # (a set: adding again changes nothing)
            self.chan.fns.add(fn_id)
            self.counted = job
            return
        for dropped in drop:
            fns.pop(dropped, None)
        if self.counted is not job:  # (one statement: counted and marked, or neither)
            fns[fn_id], self.counted = fns.get(fn_id, 0) + 1, job
        fns.move_to_end(fn_id)

    def _interrupted(self, job: Any, lent: LentSocket, begun: int, drop: list[Any]) -> None:
        """(a second Ctrl-C held) start() was interrupted.  If it still held
        the line, the send's outcome says whether the call was made: if none
        of it went, no call was made and the line goes on; if part or all of
        it went, the call was made (the rest of its records, already sealed,
        is written by the loop thread: the stream stays whole, no connection
        cut).  A call made is the loop thread's (the link handed back once:
        a hand-back names the lent socket it returns), kept until it ends
        and cancelled: the caller never got its future."""
        error = None
        with self.lock:
            mine = self.job is job and self.owner == _USER
            again = self.owner == _LOOP and self.lent is lent  # (handing back already)
        if mine:
            made, rest = lent.outcome(begun)
        else:  # released or handed back once sent and counted, or cut short
            made, rest = self.counted is job, None
            if not made:
                error = ConnectionClosed(f"a direct call to node {self.link.name} was cut short")
        if mine:
            if made and self.counted is not job:
                self._count(job, drop)
            with self.lock:
                if not made:
                    self.job = None
                again = made or self.wanted or self.closed
                self.owner = _LOOP if again else None
        if again:
            self._in_loop(self._take_back, lent, (), error, rest)
        if made:
            self.interrupted = job
            self.client.cancel(job)

    def unreturned(self, job: Any) -> None:
        """The submit that made ``job``'s call was interrupted after
        :meth:`start` (as it returned): nobody has its future, so the call
        is cancelled and counted until it ends, as in :meth:`_interrupted`."""
        with _HeldInterrupts():
            if self.counted is job and self.interrupted is not job:
                self.interrupted = job
                self.client.cancel(job)

    def _cut_short(self, lent: LentSocket, exc: BaseException) -> None:
        """(the owner) The RUN did not go in full: the stream is cut in the
        middle of a record, the connection ends (its jobs move on as for a
        lost node); no call was made."""
        with self.lock:
            self.job, self.owner = None, _LOOP
        self._in_loop(self._take_back, lent, (), ConnectionClosed(
            f"a direct call to node {self.link.name} was cut short: {exc!r}"))

    def collect(self, future: Any, timeout: float | None) -> None:
        """Read the answer to ``future``'s job here, within ``timeout``
        (after which the loop thread reads on); nothing if it can't."""
        held = None  # the lent socket, once this thread took it
        try:
            with self.lock:
                job = self.job
                if job is None or job.future is not future or self.owner is not None:
                    return
                # (one statement of plain stores: no interrupt can come in between)
                self.owner, held = _USER, self.lent
                if self.wanted or self.closed:
                    self.owner = _LOOP
                    job = None
            if job is None:
                self._in_loop(self._take_back, held, (), None)
                return
            self._read(job, timeout)
        except BaseException:  # (KeyboardInterrupt, maybe before _read took over)
            if held is not None:
                self._let_go(held, job)
            raise

    def _let_go(self, held: LentSocket, job: Any) -> None:
        """collect() was interrupted: if the link it took is still held for
        ``job`` (its read never began) or being handed back, it goes back
        to the loop thread (a hand-back repeated does nothing)."""
        with _HeldInterrupts():
            with self.lock:
                stuck = self.lent is held and (
                    self.owner == _LOOP or self.owner == _USER and self.job is job)
                if stuck:
                    self.owner = _LOOP
            if stuck:
                self._in_loop(self._take_back, held, (), None)

    def _read(self, job: Any, timeout: float | None) -> None:
        """(the owner) Read until ``job``'s DONE and finish it here, or hand
        the link to the loop thread with what was read (a timeout, a request
        for the link, anything else).  A SIGINT that lands once bytes are
        read is delivered when they are handled (the DONE in its future, or
        handed on), as on the local path: else they would be lost."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = self.poller
        handled = False
        try:
            while not handled:
                if deadline is None:
                    ms = -1
                else:
                    ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
                events = poller.poll(ms)
                with _HeldInterrupts():
                    handled = self._handle(job, events, deadline is not None and ms == 0)
        except BaseException:  # (KeyboardInterrupt) mid-decode: the stream's state is lost
            if not handled:
                error = ConnectionClosed("interrupted while reading a direct call's "
                                         "answer") if self._mid_read else None
                self._mid_read = False
                self._hand_back((), error)
            raise

    def _handle(self, job: Any, events: list[Any], timed_out: bool) -> bool:
        """(the owner) What poll found: False to wait on, True once the line
        is settled (``job`` finished here, or the link handed back)."""
        if not events:
            if timed_out:
                self._hand_back((), None)
            return timed_out
        if any(fd == self.wake for fd, _ in events):
            self._hand_back((), None)
            return True
        lent = self.lent
        assert lent is not None
        self._mid_read = True
        try:
            messages = lent.receive()
        except BlockingIOError:
            self._mid_read = False
            return False
        except (OSError, ProtocolError) as exc:
            self._mid_read = False
            self._hand_back((), exc if isinstance(exc, ProtocolError) else None)
            return True
        self._mid_read = False
        if messages is None:  # the end: the loop thread reads it too
            self._hand_back((), None)
            return True
        found = self._sort(job, messages)
        if found is None:
            return False
        kind, frames, rest = found
        if kind != "done":
            self._hand_back(frames, rest)
            return True
        self._finish(job, frames, rest)
        return True

    def _hand_back(self, messages: Any, error: BaseException | None) -> None:
        """(the owner) The loop thread takes the link, ``messages`` and ``error``."""
        with self.lock:
            self.owner = _LOOP
        self._in_loop(self._take_back, self.lent, messages, error)

    def _finish(self, job: Any, frames: Any, rest: Any) -> None:
        """(the owner) ``job``'s DONE read: its future resolved here; the
        link handed back if asked for, or with what came after the DONE."""
        if not self.on_chan:
            fns = self.link.fns
            count = fns.get(job.fn_id)
            if count:
                fns[job.fn_id] = count - 1
        else:
            self.chan.calls += 1
        with self.lock:
            self.job = None
            handback = bool(rest) or self.wanted or self.closed
            self.owner = _LOOP if handback else None
        lent = self.lent
        self.client._direct_done(job, frames)
        if handback:
            self._in_loop(self._take_back, lent, rest, None)

    @staticmethod
    def _sort(job: Any, messages: list[Any]) -> tuple[str, Any, Any] | None:
        """Heartbeats dropped (their bytes are counted); the DONE of ``job``
        alone: done; anything else goes to the loop thread, in order."""
        kept = [frames for frames in messages if frames[0] != _HEARTBEAT]
        if not kept:
            return None
        first = kept[0]
        try:
            msg = P.decode(first[0])
        except ProtocolError:
            return "other", kept, None
        if type(msg) is P.Done and len(msg.results) == 1 and msg.results[0][0] == job.id:
            return "done", first, kept[1:]
        return "other", kept, None

    def handoff(self, future: Any) -> None:
        """Make sure ``future`` resolves with nobody reading in a user
        thread: the loop thread takes the link back (any thread)."""
        with self.lock:
            job = self.job
            if job is None or job.future is not future:
                return
            if self.owner is not None:
                self.wanted = True  # its owner hands it over when done
                if self.owner == _USER:
                    os.eventfd_write(self.wake, 1)
                return
            self.owner = _LOOP
        self._in_loop(self._take_back, self.lent, (), None)

    # ------------------------------------------------------------ loop side

    def offer(self) -> None:
        """(loop thread, the client going idle) Park the link once the
        message being handled and those read with it are done."""
        if self.lent is None and not self.closed:
            self.loop.call_soon(self._park)

    def _park(self) -> None:
        """(loop thread) Park the link if the client is idle, the link its
        only one and nothing is waiting on it."""
        client = self.client
        if self.lent is not None or self.closed or client._unfinished or client._incoming \
                or self.deferred or not self._alone():
            return
        chan = self.chan
        on_chan = chan.usable(self.link)
        if not on_chan:
            chan.maybe_open(self.link)
        conn = chan.conn if on_chan else self.link.conn
        try:
            sock = conn.lend()
        except OSError:  # no descriptor left for the duplicate
            return
        if sock is None:
            return
        self.on_chan = on_chan  # (before the line is lent: read by user threads under the lock)
        self.lent = LentSocket(conn, sock)
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self.poller.register(self.wake, select.POLLIN)
        try:
            os.eventfd_read(self.wake)  # (an old request)
        except BlockingIOError:
            pass
        self.wanted = False

    def _alone(self) -> bool:
        link, net = self.link, self.client.net
        state = self.client.scheduler.nodes.get(link)  # (None: not admitted, or gone)
        return link.ready and not link.draining and link.conn is not None \
            and not link.conn.closed and len(net.links) == 1 and net.links[0] is link \
            and not net.rejoins and link.conn._budget is None \
            and state is not None and state.cpus > 0

    def reclaim(self, wake: bool = True) -> bool:
        """(loop thread) The link is the loop thread's again: True at once,
        or False if a user thread holds it (asked to hand it back; what the
        caller wanted waits for that: :meth:`defer`).  ``wake=False``: a
        user thread reading an answer hands it back once it has it."""
        with self.lock:
            if self.lent is None:
                return True
            if self.owner is not None:
                if self.owner == _USER:
                    self.wanted = True
                    if wake:
                        os.eventfd_write(self.wake, 1)
                return False
            self.owner = _LOOP
        self._take_back(self.lent, (), None)
        return True

    def defer(self, fn: Any) -> None:
        """(loop thread) Call ``fn`` once the link is handed back."""
        self.deferred.append(fn)

    def cancel(self) -> None:
        """(loop thread) Cancel the direct call in flight: as any job once
        the link is the loop thread's (the call is one of its jobs then)."""
        job = self.job
        if job is None:
            return
        if self.reclaim():
            self.client._cancel(job)
        else:
            self.defer(lambda: self.client._cancel(job))

    def holds_link(self, link: Any) -> bool:
        """(loop thread) Whether ``link``'s connection is lent to the line
        (not when the channel is: the link then stays the loop thread's)."""
        return self.lent is not None and not self.on_chan and self.link is link

    def link_lost(self, link: Any) -> None:
        """(loop thread) ``link``'s session ended: its channel too (a call
        on it is then a lost node's job)."""
        if self.on_chan and self.link is link and not self.reclaim():
            self.defer(lambda: self.chan.drop(link))
            return
        self.chan.drop(link)

    def close(self) -> None:
        """(loop thread, the client shutting down) No more direct calls."""
        self.closed = True
        self.reclaim()

    async def settle(self, timeout: float = 5.0) -> None:
        """(loop thread, closing) Wait until no user thread holds the link
        (it was asked to hand it back; that takes a moment, except for a
        user thread blocked writing to a node that stopped reading: then the
        connection is aborted, its jobs failed as the node's)."""
        import asyncio

        end = self.loop.time() + timeout
        while self.lent is not None and self.loop.time() < end:
            self.reclaim()
            if self.lent is not None:
                await asyncio.sleep(0.001)
        if self.lent is not None:
            (self.chan.conn if self.on_chan else self.link.conn).abort()
        await self.chan.close()
        os.close(self.wake)

    def __del__(self) -> None:
        if not self.closed:
            try:
                os.close(self.wake)
            except OSError:
                pass

    def _take_back(self, lent: LentSocket | None, messages: Any, error: BaseException | None,
                   rest: Any = None) -> None:
        """(loop thread, owner _LOOP) The link is the loop thread's again:
        a call in flight becomes its job, ``messages`` (read by a user
        thread) are delivered, ``rest`` (wire bytes of an interrupted write)
        is sent first, ``error`` ends the connection.  Nothing if ``lent``
        was taken back already (a hand-back repeated after an interrupt)."""
        with self.lock:
            if lent is None or self.lent is not lent:
                return
            job, self.job = self.job, None
            self.lent = None
            self.owner, self.wanted = None, False
            deferred, self.deferred = self.deferred, []
            self.poller = None
            on_chan, self.on_chan = self.on_chan, False
        lent.sock.close()
        if on_chan:
            self.chan.taken_back(job, messages, error, rest)
        else:
            if job is not None:
                self.client._direct_adopt(job, self.link, pinned=False)
            self.link.conn.take_back(messages, error, rest)
        for fn in deferred:
            self.loop.call_soon(fn)

    def _in_loop(self, fn: Any, *args: Any) -> None:
        """Call ``fn(*args)`` in the loop thread (closed loop: the client's
        shutdown fails what is left)."""
        if self.client.in_loop_thread():
            fn(*args)
            return
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the client closed meanwhile
            pass
