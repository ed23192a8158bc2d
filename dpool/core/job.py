"""A client's record of one job, its states and outcome, and the table
of the functions it serialized (see :mod:`dpool.core.client`)."""
import collections
import itertools
import pickle
import threading
import time
import weakref
from typing import Any

from .. import serialize
from ..errors import JobCancelled
from ..protocol import Outcome
from .future import Future

_loads = pickle.loads

# Outcomes as the plain ints they arrive as (once per job: no enum lookups).
_OK, _ERROR, _CANCELLED, _KILLED = map(int, (Outcome.OK, Outcome.ERROR, Outcome.CANCELLED,
                                             Outcome.KILLED))

# Job states (dispy's names; the dispy adapter exposes them as DispyJob.X).
CREATED, RUNNING, FINISHED, CANCELLED, TERMINATED, ABANDONED = (
    "Created", "Running", "Finished", "Cancelled", "Terminated", "Abandoned")


def count_killed(link: Any, job: "Job") -> None:
    """``job`` was cancelled as it ran on ``link``'s node: done there, as
    dispy counts a Terminated job (print_status), with its time up to now
    when its start was told (notify_start)."""
    link.jobs_done += 1
    if job.start_time is not None:
        job.end_time = time.time()
        link.cpu_time += max(0.0, job.end_time - job.start_time)


def outcome_of(outcome, payload):
    """A job's ``(status, value, error)`` from its Result's outcome and payload."""
    if outcome == _OK:
        try:  # (serialize.loads, inline for the common lone frame: every job's path)
            if len(payload) == 1:
                return FINISHED, _loads(payload[0]), None
            return FINISHED, serialize.loads(payload), None
        except KeyboardInterrupt as exc:
            if threading.current_thread() is threading.main_thread():
                raise  # (a Ctrl-C while a direct call's answer was read)
            return TERMINATED, None, exc  # (the loop thread must go on)
        except BaseException as exc:  # e.g. the result's class is not importable
            # here, or its __reduce__ calls sys.exit: the job's error either way
            return TERMINATED, None, exc
    if outcome == _CANCELLED:
        return CANCELLED, None, JobCancelled("job cancelled before it ran")
    if outcome == _KILLED:
        return TERMINATED, None, JobCancelled("job cancelled: its process was killed")
    error = serialize.load_exception(payload)
    return (TERMINATED if outcome == _ERROR else ABANDONED), None, error


class Job:
    """The client's record of one job.  Fields are written by the loop thread
    before the future resolves, so they are safe to read after it has."""

    __slots__ = ("id", "fn_id", "_frames", "future", "status", "node", "submit_time",
                 "start_time", "end_time", "stdout", "stderr", "sent", "tag", "star",
                 "value", "error", "cancelled", "blob", "where", "place", "pin",
                 "__weakref__")

    def __init__(self, job_id, fn_id, frames, tag=None, star=False, future=None):
        self.id = job_id
        self.fn_id = fn_id
        self.star = star
        # One frame (the common case) is kept as it is, not in a tuple: one
        # GC-allocated object less per queued job (see ``frames``).
        self._frames = frames[0] if frames is not None and len(frames) == 1 \
            and type(frames[0]) is bytes else frames
        self.blob = None  # the function, serialized (set by Client.submit)
        self.future = Future() if future is None else future
        self.status = CREATED
        self.node = None
        self.where = None  # the host that ran it, when a scheduler (the node) says so
        self.place = None  # the host it must run on, behind a scheduler (submit's place)
        self.pin = None  # the only NodeLink it may run on (submit's pin)
        self.submit_time = time.time()
        self.start_time = self.end_time = None
        self.stdout = self.stderr = None
        self.sent = False
        self.tag = tag  # whatever the adapter wants to keep with the job
        # The outcome, also readable without the future's lock once "done"
        # was emitted: value or error, or cancelled by the user's future.cancel().
        self.value = self.error = None
        self.cancelled = False  # True: the user's future.cancel() won before it ran

    @property
    def frames(self):
        """The call's frames, a sequence (None once done).  A queued job
        holds a lone frame without a tuple: each GC-allocated object alive
        per queued job brings the collector's next pass nearer, and with it
        the full passes over every queued job."""
        frames = self._frames
        return (frames,) if type(frames) is bytes else frames

    @frames.setter
    def frames(self, frames):
        self._frames = frames


class _FunctionTable:
    """Function -> (id, blob): each function is serialized once per client.

    The table remembers the last ``size`` functions; a job keeps its own
    reference to its function's blob until it is done, so a function that
    falls out of the table (many lambdas made per call) is still there to
    send to whichever node runs the job.
    """

    def __init__(self, size=4096):
        self.size = size
        self.table = collections.OrderedDict()  # id(fn) -> (weakref to fn, fn_id, blob)
        self.ids = itertools.count(1)
        self.lock = threading.Lock()

    def get(self, fn):
        """(fn_id, blob).  The table holds functions by weak reference only:
        a callable the caller dropped (a bound method, a partial holding
        data) is freed, not kept alive by dpool; one that can't be weakly
        referenced is serialized on each call."""
        entry = self.table.get(id(fn))
        if entry is not None and entry[0]() is fn:
            return entry[1], entry[2]
        blob = serialize.dumps_function(fn)
        with self.lock:
            fn_id = next(self.ids)
            try:
                ref = weakref.ref(fn)
            except TypeError:
                return fn_id, blob
            self.table[id(fn)] = (ref, fn_id, blob)
            while len(self.table) > self.size:
                self.table.popitem(last=False)
        return fn_id, blob
