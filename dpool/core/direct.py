"""Direct calls: the calling thread talks to a worker itself when nothing else is in flight.

::

    user thread                               client loop thread + embedded node
    ───────────                               ──────────────────────────────────
                                              the client goes idle: the node lends
                                              one idle worker (Session.lend: out of
                                              its dispatcher, its socket not read)
    submit, nothing else in flight ──► RUN written to that worker's socket here
    result() ──► its DONE read here, the future resolved here
                 (no loop-thread wake-up on either leg: the round trip is the
                  worker's, plus pickling)

    anything else hands the reading to the loop thread (it watches the socket):
    add_done_callback, concurrent.futures.wait/as_completed, done(), a
    result() that times out, Client.wait/close, a second job submitted (the
    worker then goes back to the dispatcher once this job is done).  A worker
    that dies under a direct call: its job goes back to the node's session,
    which reports it WORKER_LOST exactly as for any job it gave a worker.

One :class:`DirectLine` per client (embedded node only; Executor and Pool,
and JobCluster without callbacks: its "done" event is taken in any
thread, and a job that sends its session something first, a provisional
result or a file, goes on as the session's job from there).  At most one thread
reads the worker's socket at a time: ``owner`` says who (the lock guards it).
"""
from __future__ import annotations

import collections
import math
import select
import signal
import socket
import threading
import time
from typing import Any

from .. import protocol as P
from ..errors import BrokenCluster, ProtocolError
from ..transport.frames import FrameDecoder, encode
from ..transport.lent import send_all as _send_all
from .future import _DONE, Future

__all__ = ["DirectFuture", "DirectLine", "MAX_ARGUMENT"]

#: Arguments up to this many bytes go the direct way (larger ones stream
#: through the node, which writes them as the worker reads).
MAX_ARGUMENT = 256 * 1024
#: Functions the lent worker keeps loaded by direct calls, at most.
MAX_FUNCTIONS = 256

_USER, _LOOP = "user", "loop"  # who reads the worker's socket (``owner``)
_EOF = object()  # the worker's socket ended (or sent something unreadable)


class DirectFuture(Future):
    """The future of a direct call: waiting on it reads the worker's answer
    in the waiting thread; every other way of waiting hands the reading to
    the loop thread first (so the future resolves with nobody in result())."""

    __slots__ = ("_line",)

    def __init__(self, line: DirectLine | None) -> None:
        super().__init__()
        self._line = line

    def _wait(self, timeout: float | None) -> str:
        line = self._line
        if line is not None and self._state not in _DONE:
            start = time.monotonic()
            line.collect(self, timeout)
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - start))
        return super()._wait(timeout)

    def done(self) -> bool:
        if self._state in _DONE:
            return True
        if self._line is not None:
            self._line.handoff(self)
        return self._state in _DONE

    @property
    def _condition(self) -> Any:  # type: ignore[override]
        if self._line is not None and self._state not in _DONE:
            self._line.handoff(self)
        return Future._condition.fget(self)  # type: ignore[attr-defined]

    def add_done_callback(self, fn: Any) -> None:
        if self._line is not None and self._state not in _DONE:
            self._line.handoff(self)
        super().add_done_callback(fn)


class DirectLine:
    """The client's end of a worker the embedded node lent it (see module doc).

    ``client`` is the core Client (its ``_direct_*`` methods finish jobs),
    ``session`` the embedded node's Session, ``link`` its NodeLink."""

    def __init__(self, client: Any, session: Any, link: Any) -> None:
        self.client, self.session, self.link = client, session, link
        self.loop = client.loop
        self.lock = threading.Lock()
        self.worker: Any = None  # the lent WorkerHandle, None: no lease
        self.sock: socket.socket | None = None  # our duplicate of its socket
        self.poller: Any = None
        self.decoder: FrameDecoder | None = None
        self.fns: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.job: Any = None  # the Job in flight on the line
        self.owner: str | None = None  # who reads (or writes) the socket now
        self.dead = False  # the worker is gone: no more direct calls on this lease
        self.wanted = False  # the loop thread was asked to read while a user thread held the line
        self.closed = False
        self.watched: int | None = None  # the fd the loop thread watches, if any
        # A call _pass_on let go that the loop thread has not handed to the
        # session yet (_hand_over), and whether a cancel came meanwhile.
        self.passing: Any = None
        self.passing_cancelled = False

    # ------------------------------------------------------------ user side

    def free(self) -> bool:
        """(a hint, without the lock) True if a call may go direct now."""
        return self.worker is not None and self.job is None and self.owner is None \
            and not self.dead and not self.closed

    def start(self, job: Any) -> bool:
        """Send ``job`` (a plain call, its future a DirectFuture on this
        line, set running) to the lent worker; False if the line is not
        free (the caller takes the normal path)."""
        try:
            with self.lock:
                if not self.free():
                    return False
                self.job, self.owner = job, _USER
            try:
                self._send(job)
            except OSError:  # the worker is gone: the loop thread takes it back
                with self.lock:
                    self.job, self.owner, self.dead = None, None, True
                return False
            with self.lock:
                self.owner = None
                wanted, self.wanted = self.wanted, False
            if wanted:  # a hand-off, reclaim or cancel came meanwhile: the loop thread reads
                self.handoff(job.future)
        except BaseException:  # (KeyboardInterrupt, anywhere in here)
            with _HeldInterrupts():
                self._interrupted(job)
            raise
        return True

    def _interrupted(self, job: Any) -> None:
        """start() was interrupted: if it still holds the line, the call's
        stream may end mid-frame, so its worker is killed (and replaced as
        any dead worker); if it had handed the call over, the loop thread
        reads its answer (nobody else may)."""
        with self.lock:
            mine = self.job is job and self.owner == _USER
            if mine:
                self.job, self.owner, self.dead = None, None, True
            worker = self.worker
        if mine:
            worker.zygote.kill(worker.pid)
            self._in_loop(self.reclaim)
        else:
            self.handoff(job.future)

    def collect(self, future: DirectFuture, timeout: float | None) -> None:
        """Read the answer to ``future``'s job here, within ``timeout``
        (then the loop thread reads on); nothing if someone else reads."""
        took, job = False, None
        try:
            with self.lock:
                job = self.job
                if job is None or job.future is not future or self.owner is not None:
                    return
                self.owner, took = _USER, True
            self._answer(job, timeout)
        finally:
            if took and self.job is job and self.owner == _USER:
                with _HeldInterrupts():  # timed out or interrupted: the loop thread reads on
                    with self.lock:
                        took = self.job is job and self.owner == _USER
                        if took:
                            self.owner = None
                    if took:
                        self.handoff(future)

    def handoff(self, future: DirectFuture) -> None:
        """Make sure ``future`` resolves with nobody reading in a user
        thread: the loop thread watches the worker's socket (any thread)."""
        with self.lock:
            job = self.job
            if job is None or job.future is not future or self.owner is not None:
                if job is not None and job.future is future:
                    self.wanted = True  # its owner hands it over when done
                return
            closed = self.closed
            if not closed:
                self.owner = _LOOP
        if not closed:
            try:
                self.loop.call_soon_threadsafe(self._watch)
                return
            except RuntimeError:  # the loop is gone: the client closed
                pass
        with self.lock:  # (closing: the session's end kills the worker)
            self.closed = True
            if self.job is not job:
                return
            self.job = self.owner = None
            sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        self.client._direct_failed(job, BrokenCluster("the client was closed"))

    # ------------------------------------------------------------ loop side

    def offer(self) -> None:
        """(loop thread, the client idle) Borrow an idle worker, if any."""
        if self.worker is not None or self.closed:
            return
        try:
            lease = self.session.lend()
        except OSError:  # no descriptor left for the duplicate: no direct calls now
            return
        if lease is None:
            return
        worker, sock = lease
        decoder, poller = FrameDecoder(), select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        with self.lock:  # a user thread may submit now: it sees the whole line or none
            self.sock, self.decoder, self.poller = sock, decoder, poller
            self.fns.clear()
            self.dead = self.wanted = False
            self.worker = worker
        self._arm()

    def reclaim(self) -> None:
        """(loop thread) Other jobs came: the worker goes back to the
        dispatcher, at once if idle, else once the direct call is answered
        (the loop thread reads it unless a user thread already does)."""
        with self.lock:
            if self.worker is None or self.closed:
                return
            if self.job is not None:
                if self.owner is not None:  # its writer or reader calls reclaim again
                    self.wanted = True
                    return
                self.owner = _LOOP
                watch = True
            else:
                watch, dead = False, self.dead
                worker, sock = self._end_lease()
        if watch:
            self._watch()
        else:
            self._disarm()
            self.session.take_back(worker, gone=dead or _ended(sock))
            sock.close()

    def cancel(self) -> None:
        """(loop thread) Cancel the direct call in flight, as the node
        cancels a running job: its worker is killed, and the call, the
        session's again (see _convert), is reported KILLED."""
        with self.lock:
            job, worker = self.job, self.worker
            if job is None and self.passing is not None:
                self.passing_cancelled = True  # (cancelled once the session has it)
            if job is None or self.closed:
                return
            watch = self.owner is None
            if watch:
                self.owner = _LOOP
            else:
                self.wanted = True
            # (under the lock: an answer read from now on is dropped, and the
            # line gives the worker up, _end; read before, it leaves no job)
            worker.killing = job.id
        self.session._stop(worker)
        if watch:
            self._watch()

    def close(self) -> None:
        """(loop thread, the client shutting down) No more direct calls; a
        call no user thread is reading fails as the client's other jobs do
        (the session's end kills the lent worker)."""
        self._disarm()
        with self.lock:
            self.closed = True
            if self.owner == _USER:
                self.wanted = True
                return  # its reader (or writer) sees the end, and closes the socket
            job, self.job = self.job, None
            sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        if job is not None:
            self.client._direct_failed(job, BrokenCluster("the client was closed"))

    def _arm(self) -> None:
        """(loop thread) Watch the lent worker while no call uses it: one
        that dies idle is given back (and replaced) at once, not found dead
        by the next call.  The watch ends at its first event: a direct call's
        answer is its reader's (no loop-thread wake-up per call)."""
        if self.sock is not None and self.watched is None:
            self.watched = self.sock.fileno()
            self.loop.add_reader(self.watched, self._idle_event)

    def _disarm(self) -> None:
        if self.watched is not None:
            self.loop.remove_reader(self.watched)
            self.watched = None

    def _idle_event(self) -> None:
        self._disarm()
        with self.lock:
            free = self.worker is not None and self.job is None and self.owner is None
            sock = self.sock
        if free and sock is not None and _has_input(sock):  # the end, or news
            self.reclaim()

    def _watch(self) -> None:
        if self.owner == _LOOP and self.sock is not None and not self.closed:
            self.watched = self.sock.fileno()
            self.loop.add_reader(self.watched, self._readable)

    def _readable(self) -> None:
        job = self.job
        messages = self._read_some()
        if messages is None:
            return
        self._disarm()
        self._end(job, messages)

    def _convert(self, job: Any, worker: Any, sock: Any) -> None:
        """(loop thread) The worker's socket ended under a direct call: the
        job becomes the session's (which reports it WORKER_LOST, or KILLED
        after a cancel, once the worker's exit is known), the worker goes
        back to it (the lease ended when the end was read)."""
        self._disarm()
        sock.close()
        item = P.RunItem(job.id, job.fn_id, 0, 0, 1)
        if self.client._direct_adopt(job, self.link):
            self.session.take_back(worker, item, gone=True)
        else:
            self.session.take_back(worker, gone=True)

    def _end_lease(self) -> tuple[Any, Any]:
        """(under the lock) The lease is over: (worker, socket)."""
        worker, sock = self.worker, self.sock
        self.worker = self.sock = self.poller = self.decoder = None
        self.job = self.owner = None
        return worker, sock

    # --------------------------------------------------------------- common

    def _end(self, job: Any, messages: Any) -> None:
        """The owner has the answer (or the end of the socket, or what the
        worker sends its session first: see _pass_on)."""
        msg, frames = None, messages
        if messages is not _EOF:
            frames = messages[0]
            try:
                msg = P.decode(frames[0])
            except Exception:  # (the answer's check reports it)
                msg = None
            if msg is not None and type(msg) is not P.Done:
                self._pass_on(job, messages)
                return
        lease: tuple[Any, Any] = (None, None)
        with self.lock:
            self.job = self.owner = None
            self.wanted = False
            closing = self.closed
            cancelled = self._cancelled(job, frames)
            if cancelled is not None:
                frames = _EOF
            if frames is _EOF or (self.worker is not None and self.worker.killing is not None):
                self.dead = True  # (a cancel's kill came after the answer: gone too)
            dead = self.dead
            sock = self.sock if closing else None
            if closing:
                self.sock = None
            elif frames is _EOF:
                lease = self._end_lease()
        if sock is not None:
            sock.close()
        if cancelled is not None:
            cancelled.zygote.kill(cancelled.pid)
        client = self.client
        if frames is not _EOF:
            client._direct_done(job, frames, msg)
        elif closing:
            client._direct_failed(job, BrokenCluster("the client was closed"))
        elif not self._in_loop(self._convert, job, *lease):  # the client closed meanwhile
            lease[1].close()
            client._direct_failed(job, BrokenCluster("the client was closed"))
            return
        else:
            return
        if not closing and (dead or client._unfinished or client._incoming):
            self._in_loop(self.reclaim)  # others are waiting for this CPU

    def _cancelled(self, job: Any, frames: Any) -> Any:
        """(under the lock) The worker, if ``frames`` answer a call its
        cancel is killing (:meth:`cancel`; with the session's ``interrupt``
        the job may end first): the answer is dropped and the worker killed,
        as the node does with its own jobs (Session.on_worker_message), and
        the call, the session's again, is reported KILLED (_convert)."""
        worker = self.worker
        if frames is _EOF or worker is None or worker.killing is None \
                or worker.killing != job.id:
            return None
        return worker

    def _pass_on(self, job: Any, messages: list[Any]) -> None:
        """(the owner) The worker sent its session something before the
        call's answer (JobCluster: dispy's provisional result, a file): the
        call goes on as a job of the session's, which gets these messages
        (a message begun read whole first), then the answer, as any job's."""
        gone = self._read_whole(messages)
        with self.lock:
            self.job = self.owner = None
            self.wanted = False
            closing = self.closed
            if closing:
                worker, sock = None, self.sock
                self.sock = None
            else:
                worker, sock = self._end_lease()
                self.passing, self.passing_cancelled = job, False
        if not closing and self._in_loop(self._hand_over, job, worker, sock, messages, gone):
            return
        if sock is not None:
            sock.close()
        self.client._direct_failed(job, BrokenCluster("the client was closed"))

    def _read_whole(self, messages: list[Any]) -> bool:
        """(the owner) Read on until no message is read in part, adding
        those read to ``messages``; True if the socket ended."""
        decoder = self.decoder
        while decoder is not None and decoder.partial:
            self.poller.poll()
            more = self._read_some()
            if more is _EOF:
                return True
            if more:
                messages.extend(more)
        return False

    def _hand_over(self, job: Any, worker: Any, sock: Any, messages: list[Any],
                   gone: bool) -> None:
        """(loop thread) The call is the session's job now (_pass_on)."""
        self._disarm()
        sock.close()
        with self.lock:
            cancelled = self.passing_cancelled
            self.passing, self.passing_cancelled = None, False
        item = P.RunItem(job.id, job.fn_id, 0, 0, 1)
        if self.client._direct_adopt(job, self.link):
            self.session.take_back(worker, item, gone=gone, messages=messages)
            if cancelled:  # (a cancel that found it neither here nor there)
                self.client.cancel(job)
        else:
            self.session.take_back(worker, gone=gone)

    def _in_loop(self, fn: Any, *args: Any) -> bool:
        """Call ``fn(*args)`` in the loop thread; False if its loop is gone."""
        if self.client.in_loop_thread():
            fn(*args)
            return True
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the client closed meanwhile
            return False
        return True

    def _send(self, job: Any) -> None:
        messages = []
        fn_id = job.fn_id
        if fn_id in self.fns:
            self.fns.move_to_end(fn_id)
        else:
            if len(self.fns) >= MAX_FUNCTIONS:
                drop = [self.fns.popitem(last=False)[0] for _ in range(MAX_FUNCTIONS // 4)]
                self.worker.fns.difference_update(drop)
                messages.append([P.encode(P.Forget, drop)])
            messages.append([P.encode(P.Func, fn_id), job.blob])
            self.fns[fn_id] = None
            self.worker.fns.add(fn_id)
        messages.append([P.encode(P.Run, [P.run_item(job.id, fn_id, len(job.frames), 0, 1)]),
                         *job.frames])
        parts = [part for message in messages for part in encode(message)]
        _send_all(self.sock, parts)

    def _answer(self, job: Any, timeout: float | None) -> None:
        """(the owner) Read the answer to ``job`` and end it; return
        without it after ``timeout``.  What is read off the socket reaches
        the future before a Ctrl-C that lands meanwhile is raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = self.poller
        while True:
            if deadline is None:
                ms = -1
            else:
                left = deadline - time.monotonic()
                ms = max(0, math.ceil(left * 1000))
            if poller.poll(ms):
                with _HeldInterrupts():
                    messages = self._read_some()
                    if messages is not None:
                        self._end(job, messages)
                        return
            elif deadline is not None and ms == 0:
                return

    def _read_some(self) -> Any:
        decoder, sock = self.decoder, self.sock
        if decoder is None or sock is None:
            return _EOF
        try:
            n = sock.recv_into(decoder.get_buffer())
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return _EOF
        if not n:
            return _EOF
        try:
            messages = decoder.buffer_updated(n)
        except ProtocolError:
            return _EOF
        return messages or None  # (one job: one answer, unless it sends its session more)


class _HeldInterrupts:
    """In the main thread, a SIGINT, SIGTERM or SIGALRM that lands inside
    the ``with`` block is delivered (Python's handler called) at its end,
    not in the middle: the line's state changes hands there (bytes read off
    the socket but not yet decoded, an answer decoded but not yet in its
    future), and an exception raised inside (KeyboardInterrupt, or what the
    program's own handler raises: SystemExit on SIGTERM, a timeout on
    SIGALRM) would lose the answer or leave the line owned by nobody.  The
    held signals' handlers are called in the order the signals came, each
    once, after all were put back (one that raises: the next ones are still
    called, their exceptions chained to it).  Nothing in other threads
    (Python runs signal handlers in the main thread only); nothing for a
    signal whose handler is not Python's (SIG_IGN, SIG_DFL, one set outside
    Python), or outside the main interpreter.  Not held: other signals with
    a Python handler (SIGHUP, SIGUSR1, ...): a handler of theirs that
    raises inside the block can still lose an answer (looking at each more
    signal costs ~550 instructions a block).

    Costs three ``getsignal`` (no system call) and, for SIGINT, two
    ``rt_sigaction`` a block, through ``_signal``'s C functions:
    ``signal.signal`` and ``signal.getsignal`` wrap them in enum
    conversions that raise and catch two exceptions (with the handler's
    repr) per ``signal`` call and one per ``getsignal`` for any callable
    handler: 87k instructions a block (callgrind, CPython 3.11), against
    7.3k this way (5.5k holding SIGINT only; bench/callgrind_held.py).
    A handler the program sets inside the block (another signal's handler,
    a finalizer) is kept: the block's end puts back only its own catcher's
    (one more ``getsignal`` a signal held, ~0.55k)."""

    __slots__ = ("previous", "others", "caught")

    def __enter__(self) -> _HeldInterrupts:
        self.previous: Any = None
        self.others: list[tuple[int, Any]] | None = None
        self.caught: list[tuple[int, Any]] | None = None
        if threading.get_ident() != _MAIN_THREAD:
            return self
        try:
            previous = _getsignal(_SIGINT)
            if callable(previous):
                self.previous = previous  # (before the swap: a signal may come between)
                try:
                    _setsignal(_SIGINT, self._catch)
                except ValueError:  # (not the main interpreter)
                    self.previous = None
                    return self
            if type(_getsignal(_SIGTERM)) is not int or type(_getsignal(_SIGALRM)) is not int:
                self._hold_others()  # (not SIG_DFL or SIG_IGN, as they mostly are)
        except BaseException:  # a signal's own handler raised meanwhile: all put back
            self.__exit__()
            raise
        return self

    def _hold_others(self) -> None:
        """(rare: the program has a handler of its own for them)"""
        held = self.others = []
        for signum in _ALSO_HELD:
            handler = _getsignal(signum)
            if type(handler) not in _NOT_PYTHON:
                held.append((signum, handler))
                try:
                    _setsignal(signum, self._catch)
                except ValueError:  # (not the main interpreter)
                    held.pop()
                    return

    def _catch(self, signum: int, frame: Any) -> None:
        if self.caught is None:
            self.caught = [(signum, frame)]
        elif all(seen != signum for seen, _ in self.caught):
            self.caught.append((signum, frame))

    def __exit__(self, *exc: Any) -> None:
        previous, others = self.previous, self.others
        if previous is None and others is None:
            return
        try:
            try:  # (a handler set inside the block, not our catcher, is kept)
                if previous is not None and getattr(_getsignal(_SIGINT), "__self__", None) is self:
                    _setsignal(_SIGINT, previous)
                if others is not None:
                    for signum, handler in others:
                        if getattr(_getsignal(signum), "__self__", None) is self:
                            _setsignal(signum, handler)
            except BaseException:  # a signal came, its handler (one put back) raised
                _put_back([(_SIGINT, previous)] if previous is not None else [], others, self)
                raise
        finally:
            if self.caught is not None:
                handlers = dict(others or ())
                handlers[_SIGINT] = previous
                _deliver([(handlers[signum], signum, frame) for signum, frame in self.caught])


def _put_back(held: list[tuple[int, Any]], others: list[tuple[int, Any]] | None,
              block: _HeldInterrupts) -> None:
    """Put each ``(signum, handler)`` back where ``block``'s catcher still
    is, every one even if a signal comes meanwhile and a handler put back
    already raises (``signal.signal`` runs pending signals' handlers before
    it swaps: that swap is done again); the first such exception is raised
    once all are back."""
    error = None
    for signum, handler in held + (others or []):
        while True:
            try:
                if getattr(_getsignal(signum), "__self__", None) is block:
                    _setsignal(signum, handler)
                break
            except BaseException as exc:
                error = error or exc
    if error is not None:
        raise error


def _deliver(calls: list[tuple[Any, int, Any]]) -> None:
    """Call each held signal's handler (default SIGINT: raises
    KeyboardInterrupt); one that raises does not stop the next ones."""
    handler, signum, frame = calls[0]
    try:
        handler(signum, frame)
    finally:
        if len(calls) > 1:
            _deliver(calls[1:])


try:  # the C functions under signal.signal/getsignal (see _HeldInterrupts)
    from _signal import getsignal as _getsignal, signal as _setsignal  # type: ignore[import-not-found]
except ImportError:  # (not CPython)
    _getsignal, _setsignal = signal.getsignal, signal.signal
_SIGINT = int(signal.SIGINT)
_SIGTERM, _SIGALRM = int(signal.SIGTERM), int(signal.SIGALRM)
_ALSO_HELD = (_SIGTERM, _SIGALRM)
_NOT_PYTHON = (int, type(None), signal.Handlers)  # SIG_DFL, SIG_IGN; set outside Python
_MAIN_THREAD = threading.main_thread().ident


def _ended(sock: Any) -> bool:
    """True if the peer closed its end (a lent worker that died while idle)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _has_input(sock: Any) -> bool:
    """True if the peer sent something or closed its end."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return True

