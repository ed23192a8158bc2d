"""Message types exchanged after authentication, and their encoding.

A message is a list of frames (see :mod:`dpool.transport`).  Frame 0 is the
header: a pickled tuple whose first item is an op code from the tables
below.  Frames 1.. carry payloads (pickle streams and out-of-band buffers made
by :mod:`dpool.serialize`) and are forwarded by nodes without being decoded.

Headers are only ever decoded on connections whose peer has authenticated
(client <-> node) or is our own child process (node <-> worker).

Client -> node                         Node -> client
  SESSION  (op, options)                 READY    (op, info)
  FUNC     (op, fn_id)       + blob      REFUSED  (op, reason)
  RUN      (op, jobs)        + payloads  DONE     (op, results)   + payloads
  CANCEL   (op, job_ids)                 STARTED  (op, [(job_id, time)])
  BYE      (op,)
  FORGET   (op, fn_ids)  functions no job in flight needs; the node drops
                         them and forwards FORGET to the workers holding them
  RECOVER  (op, token, terminate)        READY (op, {"recovered": True,
                                           "kept": [job_id], "pending": [job_id]})
                                         or REFUSED; then DONE as usual

RECOVER, instead of SESSION, takes over a session opened with the option
``recover_token`` whose client went away without BYE (see node.py).

Job environment (dispy's features; only sessions that ask for them):

Client -> node                         Node -> client
  FILE  (op, req_id, name, mode) + data  FILEDONE    (op, req_id, error or None)
  SETUP (op,) + dumps((names, setup,     SETUPDONE   (op, info)
         setup_args, cleanup))           SETUPFAIL   (op,)              + exception
                                         PROVISIONAL (op, job_id)       + payload
                                         SENDFILE    (op, job_id, name) + data
                                         AVAILINFO   (op, info)  every
                                           ``pulse_interval`` s if the
                                           session options ask for it
Node -> worker                         Worker -> node
  SETUP   (op,) + the client's frames    SETUPDONE   (op,) + env frames
  ENV     (op,) + env frames             SETUPFAIL   (op,) + exception
  CLEANUP (op,) + the client's frames    CLEANUPDONE (op, error or None)
                                         PROVISIONAL, SENDFILE as above

``name`` in FILE is relative to the session folder (no absolute paths, no
``..``); the node refuses anything else.

Node -> worker                         Worker -> node
  INIT     (op, options)     + blobs     INITFAIL (op,)           + exception
  FUNC     (op, fn_id)       + blob      DONE     (op, results)   + payloads
  RUN      (op, jobs)        + payloads  STARTED  (op, job_id, time)
  FORGET   (op, fn_ids)

``jobs`` in RUN is a list of ``(job_id, fn_id, nframes, star)``: the payload frames
of the jobs follow the header in that order.  ``star`` is CALL (``fn(*args,
**kwargs)``), STARMAP (the payload is ``(list_of_arg_tuples, {})``, the
result the list of ``fn(*a)``) or MAP (``(list_of_items, {})``, the result
the list of ``fn(x)``): a chunk of a map is one job.  ``results`` in DONE is a list
of result tuples ``(job_id, status, start, end, stdout, stderr, nframes)``.
"""
import pickle

# client <-> node
SESSION, FUNC, RUN, CANCEL, BYE = 1, 2, 3, 4, 5
READY, REFUSED, DONE, STARTED = 11, 12, 13, 14
# node <-> worker (FUNC, RUN, DONE and STARTED are shared with the above)
INIT, INITFAIL = 21, 22
# job environment (see above); SETUP.. are shared by all three parties
FILE, SETUP = 6, 7
RECOVER = 8
# client -> node -> worker: drop these function ids (no job of theirs is left)
FORGET = 9
FILEDONE, SETUPDONE, SETUPFAIL, PROVISIONAL, SENDFILE = 15, 16, 17, 18, 19
AVAILINFO = 20
ENV, CLEANUP, CLEANUPDONE = 23, 24, 25

# How a worker calls a job's function (``star`` in RUN).
CALL, STARMAP, MAP = 0, 1, 2

# Job outcome codes carried in DONE.
# CANCELLED: taken off the queue before it ran; KILLED: its process was killed.
OK, ERROR, WORKER_LOST, CANCELLED, KILLED = 0, 1, 2, 3, 5

_dumps = pickle.dumps
_loads = pickle.loads


def encode(*header):
    """Frame 0 of a message: the header tuple, pickled."""
    return _dumps(header, 5)


def decode(frame):
    """Inverse of :func:`encode`; only for authenticated peers."""
    return _loads(frame)
