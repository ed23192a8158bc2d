"""Message types exchanged after authentication, and their encoding.

A message is a list of frames (see :mod:`dpool.transport`).  Frame 0 is the
header: a pickled tuple ``(op, *fields)`` whose first item is an :class:`Op`
code (a plain int on the wire) and whose fields are those of the message's
record below.  Frames 1.. carry payloads (pickle streams and out-of-band
buffers made by :mod:`dpool.serialize`) and are forwarded by nodes without
being decoded.  :func:`encode` and :func:`decode` are the only places a
header is built or read (a received header becomes its message's record);
items inside a header (the jobs of RUN, the results
of DONE) are plain tuples on the wire, made by :func:`run_item` and
:func:`result`, and read back as records by :func:`run_items` and
:func:`results`, the one RUN and the one DONE decoder of client, node,
worker and recovery.

Headers are only ever decoded on connections whose peer has authenticated
(client <-> node) or is our own child process (node <-> worker).

Client -> node                         Node -> client
  Session  (options)                     Ready    (info)
  Func     (fn_id)       + blob          Refused  (reason)
                                         Busy     (reason)  no free CPU (other
                                            clients hold them all): try later
  Run      (jobs)        + payloads      Done     (results) + payloads
  Cancel   (job_ids)                     Started  (jobs: [(job_id, time)])
  Bye      ()
  Heartbeat ()  both ways (node -> client too), when nothing else was sent
                for the interval the client asked for in Session's
                ``heartbeat`` option (see dpool.liveness)
  Forget   (fn_ids)  functions no job in flight needs; the node drops
                     them and forwards Forget to the workers holding them
  Reclaim  (count,  give back up to count   GiveBack (job_ids)  jobs that did not run
           held)    jobs no worker has taken here (the answer to Reclaim, and unasked
                    (held: those waiting in  while draining)
                    workers too, once dropped)
                                         Draining (grace)  the node stops: no new
                                            jobs; running ones get grace s
  Recover  (token, terminate)            Ready (info + {"recovered": True,
                                           "kept": [job_id], "pending": [job_id]})
                                         or Refused; then Done as usual

Recover, instead of Session, takes over a session opened with the option
``recover_token`` whose client went away without Bye (see node/recovery.py).

  Status   (None)                        Status (info)  then the node closes

A client of a dpool-scheduler (a SharedJobCluster) may also send

  NodeCall (req_id, op, host, arg)       NodeReply (req_id, result)

for one node behind the scheduler (core/nodecalls.py): the scheduler acts
on that client's use of that node only (its legs, its jobs, its share).

Status, instead of Session, asks for the node's status (``dpool status``,
see node/status.py); it takes no CPU.

A client's channel (a second connection, its own handshake, on which one
worker of the session serves lone calls; docs/performance.md "Round trips
via a node: taking the node off the path"; a worker serves a channel it
is given; core/channel.py opens one):

Client -> node (channel)               Node -> client (main link)
  Channel  (token, serial)  instead of     Recall      (serial)  give the channel back
           Session: the token of a live    ChannelLost (why, serial)  its worker died:
           session; serial: the client's      its call fails with WorkerLost
           number for this channel
  Release  ()  the last message on a
           channel (after its last Run)
  Halt     (serial)  (main link) the channel's call was cancelled: its
           worker is stopped as a cancelled running job's; ChannelLost follows
           (serial names the channel each of these concerns: one about an
           earlier channel, come late, is ignored)
           Nothing goes behind Channel before its answer (Ready from the
           worker; Refused, Busy from the node): what does is Refused.
Node -> worker: Channel ('') + the channel's record state (handoff.RecordState),
  its socket with it (SCM_RIGHTS): the worker answers Channel ('') (the
  node closes its copy), says Ready on the channel, runs
  its Runs (Done with their attempts) until Release or its end, then
Worker -> node: Returned () the channel's worker serves the node again

Job environment (dispy's features; only sessions that ask for them):

Client -> node                         Node -> client
  File  (req_id, name, mode) + data      FileDone    (req_id, error or None)
  Setup () + dumps((names, setup,        SetupDone   (info)
         setup_args, cleanup))           SetupFail   ()               + exception
                                         Provisional (job_id)         + payload
                                         SendFile    (job_id, name)   + data
                                         AvailInfo   (info)  every
                                           ``pulse_interval`` s if the
                                           session options ask for it
Node -> worker                         Worker -> node
  Setup   () + the client's frames       SetupDone   (None) + env frames
  Env     () + env frames                SetupFail   ()     + exception
  Cleanup () + the client's frames       CleanupDone (error or None)
                                         Provisional, SendFile as above

``name`` in File is relative to the session folder (no absolute paths, no
``..``); the node refuses anything else.

Node -> worker                         Worker -> node
  Init     (options)     + blobs         InitFail ()          + exception
  Func     (fn_id)       + blob          Done     (results)   + payloads
  Run      (jobs)        + payloads      Started  (jobs: [(job_id, time)])
  Forget   (fn_ids)
  Cancel   (job_ids)  do not start these GiveBack (job_ids)  those dropped
           (jobs waiting in the worker:    unstarted (one that had started
           the node gives them elsewhere)  ends with its Done as usual)

``jobs`` in Run (both legs) is a list of :class:`RunItem` ``(job_id, fn_id,
nframes, star, attempt)``: the payload frames of the jobs follow the header
in that order.  ``star`` is a :class:`Call`; ``attempt`` numbers the client's
dispatches of the job (1, 2, ...); a client of a dpool-scheduler may add a
sixth item, the host of the node behind the scheduler that must run the job
(dispy's ``submit_node``), which the scheduler strips.  ``results`` in Done is a list of
:class:`Result` ``(job_id, outcome, start, end, stdout, stderr, nframes,
attempt)``; the node puts the attempt of the job's Run in the results it
sends the client (the client delivers only its current attempt's).

A new message: a code in :class:`Op`, a record registered with
``@message(Op.X)``; a handler for it where it is received.
"""
import logging
import math
import pickle
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .errors import ProtocolError

if TYPE_CHECKING:
    from typing import NamedTuple
else:  # (the same classes for half the cost to define: issue 13, start-up)
    from .records import NamedTuple


class Op(IntEnum):
    """Message codes (frame 0's first item)."""

    # client <-> node
    SESSION = 1
    FUNC = 2
    RUN = 3
    CANCEL = 4
    BYE = 5
    FILE = 6
    SETUP = 7
    RECOVER = 8
    FORGET = 9
    STATUS = 10  # instead of SESSION: the node answers STATUS with its status
    READY = 11
    REFUSED = 12
    DONE = 13
    STARTED = 14
    FILEDONE = 15
    SETUPDONE = 16
    SETUPFAIL = 17
    PROVISIONAL = 18
    SENDFILE = 19
    AVAILINFO = 20
    # node <-> worker (FUNC, RUN, FORGET, DONE, STARTED and SETUP.. are shared)
    INIT = 21
    INITFAIL = 22
    ENV = 23
    CLEANUP = 24
    CLEANUPDONE = 25
    # client <-> node, both ways: "I am alive" (see dpool.liveness)
    HEARTBEAT = 26
    # the node gives jobs back (Reclaim's answer, or draining); it is stopping; give back
    GIVEBACK = 27
    DRAINING = 28
    RECLAIM = 29
    BUSY = 30  # instead of READY: every CPU is taken by other clients; try again later
    # client <-> dpool-scheduler: one node behind it (a SharedJobCluster's node methods)
    NODECALL = 31
    NODEREPLY = 32
    # a client's channel (see the module's docstring)
    CHANNEL = 33
    RELEASE = 34
    RETURNED = 35
    CHANNELLOST = 36
    RECALL = 37
    HALT = 38


class Call(IntEnum):
    """How a worker calls a job's function (``star`` in a RunItem)."""

    CALL = 0  # fn(*args, **kwargs)
    STARMAP = 1  # the payload is (list_of_arg_tuples, {}); the result [fn(*a) ...]
    MAP = 2  # the payload is (list_of_items, {}); the result [fn(x) ...]


class Outcome(IntEnum):
    """How a job ended (``outcome`` in a Result)."""

    OK = 0  # the payload is the pickled result
    ERROR = 1  # the function raised: the payload is the exception
    WORKER_LOST = 2  # its process died: the payload is a WorkerLost
    CANCELLED = 3  # taken off the queue before it ran; no payload
    KILLED = 5  # its process was killed (a cancel while running); no payload


# ---------------------------------------------------------------- items

class RunItem(NamedTuple):
    """One job of a Run message (client -> node and node -> worker)."""

    job_id: int
    fn_id: int
    nframes: int  # its payload frames, after those of the jobs before it
    star: int  # a Call
    attempt: int  # the client's dispatch number of this job (1, 2, ...)


class Result(NamedTuple):
    """One job's outcome in a Done message (worker -> node -> client).

    ``start``, ``end`` (time.time()), ``stdout`` and ``stderr`` are None for a
    job that did not run to its end (cancelled, killed, its worker lost).
    """

    job_id: int
    outcome: int  # an Outcome
    start: Optional[float]
    end: Optional[float]
    stdout: Optional[str]
    stderr: Optional[str]
    nframes: int  # its payload frames, after those of the results before it
    attempt: Optional[int]  # the job's attempt (node -> client; None from a worker)


def run_item(job_id: int, fn_id: int, nframes: int, star: int, attempt: int = 1) -> tuple:
    """A RunItem as it goes on the wire."""
    return (job_id, fn_id, nframes, star, attempt)


def result(job_id: int, outcome: int, nframes: int = 0, start: Optional[float] = None,
           end: Optional[float] = None, stdout: Optional[str] = None,
           stderr: Optional[str] = None, attempt: Optional[int] = None) -> tuple:
    """A Result as it goes on the wire (the outcome a plain int)."""
    return (job_id, int(outcome), start, end, stdout, stderr, nframes, attempt)


# Items are made with tuple.__new__ (what NamedTuple._make does, without its
# length check): they are on the hot path, once per job on each leg.
_new = tuple.__new__


def _items_decoder(cls, doc, records=True):
    """The decoder of a message whose one field is a list of ``cls`` items,
    each followed by its ``nframes`` payload frames; with ``records=False``
    the items stay the plain tuples they came as (for code that only passes
    them on: no record is made)."""
    k = cls._fields.index("nframes")

    def decode(msg: tuple, frames: Sequence) -> list[tuple[Any, Sequence]]:
        # A list, not a generator: a Done from a worker holds one result,
        # and making a generator costs more than the list (measured).
        out = []
        i = 1
        for record in msg[0]:
            n = record[k]
            out.append((_new(cls, record) if records else record, frames[i:i + n]))
            i += n
        return out
    decode.__doc__ = doc
    return decode


run_items = _items_decoder(RunItem, "The jobs of a Run message, each with its payload frames.")
results = _items_decoder(Result, "The results of a Done message, each with its payload frames.")
raw_results = _items_decoder(
    Result, "The results of a Done message as they came (plain tuples, read with the "
    "RESULT_* indices or unpacked in Result's field order), each with its payload "
    "frames: for a node, which only passes them on, and the client, which reads "
    "each once (no record per job).", records=False)
# Where a Result's fields are in its plain tuple (see raw_results).
RESULT_JOB_ID, RESULT_START, RESULT_END, RESULT_NFRAMES = (
    Result._fields.index(name) for name in ("job_id", "start", "end", "nframes"))


# ------------------------------------------------------------- messages

_RECORDS: dict[int, Any] = {}  # op -> (message record class, its header's length)
_CODES: dict[Any, tuple[int, int]] = {}  # message record class -> (op, its field count)


def message(op: Op):
    """Register a NamedTuple class as the record of message ``op``."""
    def register(cls):
        if op in _RECORDS:
            raise ValueError(f"{op!r} already has a record: {_RECORDS[op][0].__name__}")
        _RECORDS[int(op)] = (cls, 1 + len(cls._fields))
        _CODES[cls] = (int(op), len(cls._fields))
        return cls
    return register


@message(Op.SESSION)
class Session(NamedTuple):
    options: dict  # capture, notify_start, max_tasks, cwd, cleanup, cpus, ...


@message(Op.FUNC)
class Func(NamedTuple):
    fn_id: int  # the function's blob follows


@message(Op.RUN)
class Run(NamedTuple):
    jobs: list  # RunItem tuples (see run_items)


@message(Op.CANCEL)
class Cancel(NamedTuple):
    job_ids: list


@message(Op.BYE)
class Bye(NamedTuple):
    pass


@message(Op.FILE)
class File(NamedTuple):
    req_id: Optional[int]  # None: a dependency sent before the session was ready
    name: str  # relative to the session folder
    mode: int


@message(Op.SETUP)
class Setup(NamedTuple):
    pass


@message(Op.RECOVER)
class Recover(NamedTuple):
    token: str
    terminate: bool


@message(Op.HEARTBEAT)
class Heartbeat(NamedTuple):
    pass


@message(Op.FORGET)
class Forget(NamedTuple):
    fn_ids: list


@message(Op.STATUS)
class Status(NamedTuple):
    info: Optional[dict]  # client -> node: None; node -> client: its status (dpool status)


@message(Op.RECLAIM)
class Reclaim(NamedTuple):
    count: int  # give back at most this many jobs no worker has taken
    # and those waiting in workers behind their running job too (asked
    # back: shutdown(cancel_futures=True); a scheduler's session always)
    held: bool = False


@message(Op.READY)
class Ready(NamedTuple):
    info: dict


@message(Op.REFUSED)
class Refused(NamedTuple):
    reason: str


@message(Op.BUSY)
class Busy(NamedTuple):
    """The node's CPUs are all taken by other clients' sessions: the client
    may try again (it does, up to its connect timeout); the node closes."""
    reason: str


@message(Op.NODECALL)
class NodeCall(NamedTuple):
    """Client -> dpool-scheduler: change this client's own use of one node
    behind the scheduler (a SharedJobCluster's node methods); NodeReply
    answers with the method's return value."""
    req_id: int
    op: str  # allocate, deallocate, close, resetup, cpus, file
    host: str  # the node, as the scheduler names it (its Ready's nodes)
    arg: Any  # close, resetup: terminate_pending; cpus: the count; file: (name, mode) + data


@message(Op.NODEREPLY)
class NodeReply(NamedTuple):
    req_id: int
    result: Any  # 0, -1, or (cpus) the CPUs of the node the client may use now


@message(Op.CHANNEL)
class Channel(NamedTuple):
    """Instead of Session, on a client's second connection: make it the
    channel of the session whose Ready named this token.  ``serial``: the
    client's number for this channel (each one it asks for a new one),
    named by the Recall, ChannelLost and Halt that concern it, so a late
    one about an earlier channel is ignored (node <-> worker: 0)."""
    token: str
    serial: int = 0


@message(Op.RELEASE)
class Release(NamedTuple):
    """Client -> worker, the last message on a channel: no Run after it."""


@message(Op.RETURNED)
class Returned(NamedTuple):
    """Worker -> node: its channel was released (or ended); it serves the node again."""


@message(Op.CHANNELLOST)
class ChannelLost(NamedTuple):
    """Node -> client: the channel's worker died; its call fails with WorkerLost."""
    why: str
    serial: int  # the channel's (its Channel's serial)


@message(Op.RECALL)
class Recall(NamedTuple):
    """Node -> client: the node needs the channel's worker back (Release it)."""
    serial: int  # the channel's (its Channel's serial)


@message(Op.HALT)
class Halt(NamedTuple):
    """Client -> node (main link): the call on the channel was cancelled:
    stop the channel's worker as a cancelled running job's (ChannelLost follows)."""
    serial: int  # the channel's (its Channel's serial): another's is ignored


@message(Op.DONE)
class Done(NamedTuple):
    results: list  # Result tuples (see results)


_DONE = int(Op.DONE)


@message(Op.STARTED)
class Started(NamedTuple):
    jobs: list  # [(job_id, start time)]


@message(Op.GIVEBACK)
class GiveBack(NamedTuple):
    job_ids: list  # jobs that did not run here: the client runs them elsewhere


@message(Op.DRAINING)
class Draining(NamedTuple):
    grace: float  # the node stops: no new jobs; running ones get this many seconds


@message(Op.FILEDONE)
class FileDone(NamedTuple):
    req_id: Optional[int]
    error: Optional[str]


@message(Op.SETUPDONE)
class SetupDone(NamedTuple):
    info: Optional[dict]  # node -> client: {"cpus": n}; worker -> node: None


@message(Op.SETUPFAIL)
class SetupFail(NamedTuple):
    pass


@message(Op.PROVISIONAL)
class Provisional(NamedTuple):
    job_id: int


@message(Op.SENDFILE)
class SendFile(NamedTuple):
    job_id: int
    name: str


@message(Op.AVAILINFO)
class AvailInfo(NamedTuple):
    info: dict


@message(Op.INIT)
class Init(NamedTuple):
    options: dict  # capture, cwd, notify_start, max_tasks


@message(Op.INITFAIL)
class InitFail(NamedTuple):
    pass


@message(Op.ENV)
class Env(NamedTuple):
    pass


@message(Op.CLEANUP)
class Cleanup(NamedTuple):
    pass


@message(Op.CLEANUPDONE)
class CleanupDone(NamedTuple):
    error: Optional[str]


_dumps = pickle.dumps
_loads = pickle.loads


def encode(kind: type, *fields) -> bytes:
    """Frame 0 of a message of type ``kind`` (its record class, e.g.
    ``encode(Run, items)``): ``(op, *fields)``, pickled, the fields in the
    record's order.  (No record is made on the way out: a message is sent
    once per job on some legs.)"""
    code, count = _CODES[kind]
    if len(fields) != count:
        fields = _with_defaults(kind, fields)
    if len(fields) != count:
        raise TypeError(f"{kind.__name__} takes {count} fields ({', '.join(kind._fields)}), "
                        f"not {len(fields)}")
    return _dumps((code, *fields), 5)


def done_frame(results: list) -> bytes:
    """``encode(Done, results)``, for a worker's result after each job."""
    return _dumps((_DONE, results), 5)


def _with_defaults(kind: type, fields: tuple) -> tuple:
    """``fields`` followed by the defaults of the record's later fields
    (a field added with a default, e.g. Reclaim's ``held``)."""
    defaults = kind._field_defaults  # type: ignore[attr-defined]
    missing = kind._fields[len(fields):]  # type: ignore[attr-defined]
    if all(name in defaults for name in missing):
        return (*fields, *(defaults[name] for name in missing))
    return fields


def decode(frame) -> Any:
    """Inverse of :func:`encode`: the message's record.  Only for
    authenticated peers; raises ProtocolError for an unknown op or a
    header of the wrong shape."""
    header = _loads(frame)
    try:
        cls, length = _RECORDS[header[0]]
        if len(header) == length:
            return _new(cls, header[1:])
    except (KeyError, TypeError, IndexError):
        raise ProtocolError(f"not a dpool message header: {_short(header)}") from None
    raise ProtocolError(f"bad {Op(header[0]).name} header: {_short(header)}")


def op_of(msg: tuple) -> Op:
    """The Op of a message record (for logs)."""
    return Op(_CODES[type(msg)][0])


def _short(obj, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def session_cpus(options: Any) -> int:
    """A Session's ``cpus`` option: a whole number > 0, or 0 for none
    asked (absent, None, 0); else ValueError/TypeError naming it and the
    value (both the node and the scheduler check it before acting)."""
    if not isinstance(options, dict):
        raise TypeError(f"options: a dict, not {type(options).__name__}")
    cpus = options.get("cpus") or 0
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) \
            or not 0 <= cpus < math.inf or cpus != int(cpus):
        raise ValueError(f"cpus={cpus!r}: a whole number > 0")
    return int(cpus)


class Served:
    """A session that serves one client's messages (the node's Session, the
    scheduler's ClientSession): :meth:`on_message` calls the handler its
    ``handlers`` holds for each message's record class.  A message that does
    not decode, or that a client does not send, ends the session
    (``end("protocol error")``) with one warning on ``log`` naming it
    (``str(self)``)."""

    ended = False
    handlers: dict
    log: logging.Logger

    def end(self, why: str) -> None:
        raise NotImplementedError

    def on_message(self, frames: list) -> None:
        if self.ended:
            return
        msg = None
        try:
            msg = decode(frames[0])
            handler = self.handlers[type(msg)]
        except Exception as exc:  # an authenticated peer sent nonsense
            if isinstance(exc, KeyError) and msg is not None:
                exc = ProtocolError(f"{op_of(msg).name} is not a message a client sends")
            self.log.warning("%s: bad message (%s); closing it", self, exc)
            self.end("protocol error")
            return
        handler(msg, frames)
