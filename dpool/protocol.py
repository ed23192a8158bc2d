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

Node -> worker                         Worker -> node
  INIT     (op, options)     + blobs     INITFAIL (op,)           + exception
  FUNC     (op, fn_id)       + blob      DONE     (op, result)    + payload
  RUN  (op, job_id, fn_id, star) + payload STARTED (op, job_id, time)

``jobs`` in RUN is a list of ``(job_id, fn_id, nframes, star)``: the payload frames
of the jobs follow the header in that order.  ``star`` true means the payload
is ``(list_of_arg_tuples, {})`` and the result the list of ``fn(*args)``
(a chunk of a map).  ``results`` in DONE is a list
of result tuples ``(job_id, status, start, end, stdout, stderr, nframes)``.
"""
import pickle

# client <-> node
SESSION, FUNC, RUN, CANCEL, BYE = 1, 2, 3, 4, 5
READY, REFUSED, DONE, STARTED = 11, 12, 13, 14
# node <-> worker (FUNC, RUN, DONE and STARTED are shared with the above)
INIT, INITFAIL = 21, 22

# Job outcome codes carried in DONE.
# CANCELLED: taken off the queue before it ran; KILLED: its process was killed.
OK, ERROR, WORKER_LOST, CANCELLED, SETUP_FAILED, KILLED = 0, 1, 2, 3, 4, 5

_dumps = pickle.dumps
_loads = pickle.loads


def encode(*header):
    """Frame 0 of a message: the header tuple, pickled."""
    return _dumps(header, 5)


def decode(frame):
    """Inverse of :func:`encode`; only for authenticated peers."""
    return _loads(frame)
