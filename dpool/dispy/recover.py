"""dispy's fault recovery: ``JobCluster(..., recover_file=...)`` and
:func:`recover_jobs`.

::

    JobCluster(recover_file=F)       the recover file F (JSON lines, mode 0600):
      per node session: a random     {"dpool_recover": 1, TLS files}
      token in the SESSION options   {"node": [host, port], "token": T, "secret": S}
      per job: its ids ──────────►   {"job": core id, "id": DispyJob id} per job
      (again if job.id changes;     (an id JSON would change, e.g. a tuple:
      a result received:            {"job": core id, "id_pickle": hex})
                                    {"done": core id})
    client gone without BYE: the node keeps the session (jobs go on, results
      are kept) for --keep-results seconds (see dpool/core/node.py)
    recover_jobs(F): per node, connect, RECOVER T ──► READY {kept, pending}
      ◄── DONE ... until every job is in; BYE ends the session; F is removed

The file holds the cluster's secret (as dispy's does): it is created
exclusively (an existing file or a symbolic link at its path is refused,
never truncated or followed) and readable and writable by its owner only
(0600, whatever the umask); the default name ends in 64 random bits, so it
can't be guessed and planted in advance.
"""
import asyncio
import datetime
import errno
import glob
import json
import logging
import os
import pickle
import secrets
import threading

from .. import liveness
from .. import protocol as P
from ..protocol import Outcome
from .. import serialize
from ..core.client import tls_context
from .model import DispyJob, exception_text, resolve_host
from ..errors import DpoolError

log = logging.getLogger("dpool")

__all__ = ["recover_jobs"]


def default_name():
    """dispy's default recover file name plus a random part:
    ``_dispy_YYYYMMDDHHMMSS_<16 hex digits>`` (in the current folder)."""
    return datetime.datetime.now().strftime("_dispy_%Y%m%d%H%M%S_") + secrets.token_hex(8)


class RecoverFile:
    """Writes a recover file; each record is flushed at once (the client
    may be killed at any moment)."""

    def __init__(self, path, cafile=None, certfile=None, keyfile=None):
        self.path = os.path.abspath(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "the recover file exists already (a "
                                  "cluster's earlier one? collect it with recover_jobs, or "
                                  "remove it); it is never overwritten", self.path) from None
        try:
            os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        self.file = os.fdopen(fd, "w")
        log.info("recover file: %s", self.path)
        self.lock = threading.Lock()
        self.write({"dpool_recover": 1, "cafile": cafile, "certfile": certfile,
                    "keyfile": keyfile})

    def write(self, record):
        line = json.dumps(record, default=str) + "\n"
        with self.lock:
            if self.file is not None:
                self.file.write(line)
                self.file.flush()

    def new_session(self, address, secret):
        """A token for a session with the node at ``address``, recorded."""
        token = secrets.token_hex(16)
        self.write({"node": list(address), "token": token, "secret": (secret or b"").hex()})
        return token

    def job(self, core_id, job_id):
        self.write({"job": core_id, **_encode_id(job_id)})

    def done(self, core_id):
        self.write({"done": core_id})

    def close(self, remove=True):
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None
        if remove:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


_JSON_EXACT = (str, int, float, bool, type(None))


def _encode_id(job_id):
    """A job id as JSON that gives back the same value and type."""
    if type(job_id) in _JSON_EXACT:
        return {"id": job_id}
    try:
        return {"id_pickle": pickle.dumps(job_id, 4).hex()}
    except Exception:
        log.warning("recover file: job id %r can't be pickled; recorded as its str", job_id)
        return {"id": str(job_id)}


def _decode_id(record):
    if "id_pickle" in record:
        try:  # our own file (0600, created exclusively; it holds the secret too)
            return pickle.loads(bytes.fromhex(record["id_pickle"]))
        except Exception:
            return record["id_pickle"]
    return record.get("id")


def _mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _read(path):
    header, nodes, ids, done = None, [], {}, set()
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short when the client was killed
                continue
            if "dpool_recover" in record:
                header = record
            elif "node" in record:
                nodes.append((tuple(record["node"]), record["token"],
                              bytes.fromhex(record.get("secret", ""))))
            elif "job" in record:
                ids[record["job"]] = _decode_id(record)
            elif "done" in record:
                done.add(record["done"])
    if header is None:
        raise ValueError(f"{path} is not a dpool recover file")
    return header, nodes, ids, done


def recover_jobs(recover_file=None, timeout=None, terminate_pending=False):
    """Collect the results of the jobs of a cluster whose client went away.

    ``recover_file`` is the file given to ``JobCluster(recover_file=...)``
    (default: the newest ``_dispy_*`` in the current folder).  Waits for the
    jobs still running (at most ``timeout`` seconds in all; those not done
    by then are left out, and can be recovered by a later call), or with
    ``terminate_pending=True`` kills them (they come back Terminated, or
    Cancelled if they had not started).  Returns the DispyJobs (``id`` as
    given at submit, ``args`` and ``kwargs`` None, as in dispy).  Once every
    job is collected the nodes' sessions end and the file is removed.
    """
    if not recover_file:
        found = sorted(glob.glob("_dispy_*"), key=_mtime)
        if not found:
            log.warning("recover_jobs: no recover file (_dispy_*) in %s", os.getcwd())
            return []
        recover_file = found[-1]
    try:
        header, nodes, ids, done = _read(recover_file)
    except (OSError, ValueError) as exc:
        log.warning("recover_jobs: cannot read %s: %s", recover_file, exc)
        return []
    ssl = tls_context(header.get("cafile"), header.get("certfile"), header.get("keyfile"))
    results = [None] * len(nodes)
    complete = [False] * len(nodes)

    async def main():
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        await asyncio.gather(*(_recover_node(i, address, token, secret, ssl, ids,
                                             terminate_pending, deadline, results, complete)
                               for i, (address, token, secret) in enumerate(nodes)))

    runner = threading.Thread(target=asyncio.run, args=(main(),), name="dpool-recover")
    runner.start()
    runner.join()
    jobs = _once(results, done)
    if all(complete):
        jobs += _lost(ids, done, jobs)
        try:
            os.remove(recover_file)
        except OSError:
            pass
    return jobs


def _once(results, done):
    """The recovered jobs, each once: a job whose connection dropped while
    its node stayed up may be kept there and also have run again elsewhere
    (its result received by the client: left out, or recovered twice)."""
    seen, jobs = set(done), []
    for node_jobs in results:
        for core_id, job in node_jobs or ():
            if core_id not in seen:
                seen.add(core_id)
                jobs.append(job)
    return jobs


def _lost(ids, done, recovered):
    """Jobs submitted but neither received nor kept by any node (e.g. still
    queued in the client when it died): Abandoned, and said so."""
    got = {job._core_id for job in recovered}
    lost = [core_id for core_id in ids if core_id not in done and core_id not in got]
    if lost:
        log.warning("recover_jobs: %d jobs were submitted but no node kept them (still "
                    "queued in the client when it went away, or their node's session "
                    "expired); they come back Abandoned: ids %s", len(lost),
                    ", ".join(repr(ids[core_id]) for core_id in lost[:20]))
    jobs = []
    for core_id in lost:
        job = DispyJob(None, None, None)
        job.id, job.args, job.kwargs, job._core_id = ids[core_id], None, None, core_id
        job.exception = ("no node kept this job: it was still queued in the client when "
                         "the client went away (or its node's session expired); it did not run")
        job._status = DispyJob.Abandoned
        job._set_done()
        jobs.append(job)
    return jobs


async def _recover_node(i, address, token, secret, ssl, ids, terminate, deadline,
                        results, complete):
    from ..core.client import client_hello
    from ..transport import connect

    host, port = address
    loop = asyncio.get_running_loop()
    jobs = results[i] = []

    def remaining():
        return None if deadline is None else max(0.0, deadline - loop.time())

    conn = None
    try:
        conn = await asyncio.wait_for(connect(host, port, secret=secret, hello=client_hello(),
                                              ssl=ssl),
                                      10.0 if deadline is None else min(10.0, remaining()))
        conn.send([P.encode(P.Recover, token, bool(terminate))])
        msg = P.decode((await asyncio.wait_for(conn.recv(), remaining()))[0])
        if type(msg) is not P.Ready:
            log.warning("recover_jobs: node %s:%s refused: %s", host, port,
                        getattr(msg, "reason", msg))
            complete[i] = True  # nothing kept there (collected before, or expired)
            return
        expected = set(msg.info["kept"]) | set(msg.info["pending"])
        ip = resolve_host(host)
        while expected:
            frames = await _recv_alive(conn, remaining())
            msg = P.decode(frames[0])
            if type(msg) is not P.Done:
                continue  # STARTED, AVAILINFO, provisional results: not kept
            for res, payload in P.results(msg, frames):
                if res.job_id in expected:
                    expected.discard(res.job_id)
                    jobs.append((res.job_id, _job(ids.get(res.job_id), res.job_id, ip, res,
                                                  payload)))
        conn.send([P.encode(P.Bye)])
        complete[i] = True
    except (TimeoutError, OSError, DpoolError) as exc:
        log.warning("recover_jobs: node %s:%s: %s", host, port,
                    "timed out" if isinstance(exc, TimeoutError) else exc)
    finally:
        if conn is not None:
            conn.close()
            await conn.wait_closed()


async def _recv_alive(conn, timeout):
    """The next message, sending heartbeats while waiting (the node ends a
    session whose client is silent past its lease)."""
    interval = liveness.HEARTBEAT_INTERVAL
    while True:
        wait = interval if timeout is None else min(interval, timeout)
        try:
            return await asyncio.wait_for(conn.recv(), wait)
        except TimeoutError:
            if timeout is not None:
                timeout -= wait
                if timeout <= 0:
                    raise
            conn.send([P.encode(P.Heartbeat)])


def _job(job_id, core_id, ip, res, payload):
    job = DispyJob(None, None, None)
    job.id, job.args, job.kwargs, job._core_id = job_id, None, None, core_id
    job.ip_addr, job.start_time, job.end_time = ip, res.start, res.end
    job.stdout, job.stderr = res.stdout or "", res.stderr or ""
    status = res.outcome
    if status == Outcome.OK:
        try:
            job.result = serialize.loads(payload)
            job._status = DispyJob.Finished
        except Exception as exc:
            job.exception, job._status = exception_text(exc), DispyJob.Terminated
    elif status == Outcome.CANCELLED:
        job._status = DispyJob.Cancelled
    elif status == Outcome.KILLED:
        job.exception, job._status = "job terminated (recover_jobs terminate_pending)", \
            DispyJob.Terminated
    else:
        job.exception = exception_text(serialize.load_exception(payload))
        job._status = DispyJob.Terminated if status == Outcome.ERROR else DispyJob.Abandoned
    job._set_done()
    return job
