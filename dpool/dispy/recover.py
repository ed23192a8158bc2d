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
      are kept) for --keep-results seconds (see dpool/node/recovery.py)
    recover_jobs(F): a core Client (thread "dpool-recover"), Client.recover:
      per node, connect, RECOVER T ──► READY {kept, pending}: Jobs adopted
      ◄── DONE ... resolves them as any job (DispyJob.finish_from, as JobCluster)
      until every job is in: BYE ends the sessions; F is removed

The file holds the cluster's secret (as dispy's does): it is created
exclusively (an existing file or a symbolic link at its path is refused,
never truncated or followed) and readable and writable by its owner only
(0600, whatever the umask); the default name ends in 64 random bits, so it
can't be guessed and planted in advance.
"""
import collections
import concurrent.futures
import datetime
import errno
import glob
import json
import logging
import os
import pickle
import secrets
import threading
import time

from .. import liveness
from ..core.client import Client, tls_context
from ..errors import BrokenCluster, NodeLost
from .env import JobEnv
from .model import DispyJob, resolve_host

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
    deadline = None if timeout is None else time.monotonic() + timeout
    collected, complete = [], True
    for secret, sessions in _by_secret(nodes).items():
        got, all_in = _collect(sessions, secret, ssl, terminate_pending, deadline)
        collected += got
        complete = complete and all_in
    jobs = _once(collected, ids, done)
    if complete:
        jobs += _lost(ids, done, jobs)
        try:
            os.remove(recover_file)
        except OSError:
            pass
    return [job for _, job in jobs]


def _by_secret(nodes):
    """The sessions of the file, by the secret of their node (one client each)."""
    groups = collections.defaultdict(list)
    for address, token, secret in nodes:
        groups[secret].append((address, token))
    return groups


def _remaining(deadline):
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _collect(sessions, secret, ssl, terminate, deadline):
    """Take the sessions over with a core client and wait for their jobs:
    ([(core Job, node IP)], True if every session was collected whole)."""
    wait = _remaining(deadline)
    connect = liveness.connect_timeout() if wait is None else \
        max(1e-3, min(wait, liveness.connect_timeout()))
    client = Client([], secret=secret, ssl=ssl, connect_timeout=connect, name="dpool-recover")
    try:
        JobEnv(client)  # a dispy session also sends starts, provisional results, load reports
        links = client.recover(sessions, terminate)
        for link in links:
            _log_failure(link)
        concurrent.futures.wait([job.future for link in links for job in link.adopted],
                                _remaining(deadline))
        return client.call(lambda: _settle(client, links))
    finally:
        client.close(wait=False)


def _log_failure(link):
    host, port = link.address
    if link.refusal is not None:
        log.warning("recover_jobs: node %s:%s refused: %s", host, port, link.refusal)
    elif not link.ready:
        log.warning("recover_jobs: node %s:%s: %s", host, port, link.error)


def _settle(client, links):
    """(Loop thread) the jobs whose outcome came from their node; a session
    not collected whole is dropped without BYE, so its node keeps the rest."""
    collected, complete = [], True
    for link in links:
        if link.refusal is not None:
            continue  # nothing kept there (collected before, or expired)
        ip = resolve_host(link.address[0])
        for job in link.adopted:
            if job.future.done() and not isinstance(job.error, (NodeLost, BrokenCluster)):
                collected.append((job, ip))
        if not (link.ready and all(job.future.done() for job in link.adopted)):
            complete = False
            client.close_link(link, bye=False)
    return collected, complete


def _once(collected, ids, done):
    """The recovered jobs, each once, with the id the program last gave it:
    a job whose connection dropped while its node stayed up may be kept
    there and also have run again elsewhere (its result received by the
    client: left out, or recovered twice)."""
    seen, jobs = set(done), []
    for core_job, ip in collected:
        if core_job.id not in seen:
            seen.add(core_job.id)
            jobs.append((core_job.id, DispyJob.recovered(ids.get(core_job.id), core_job, ip)))
    return jobs


def _lost(ids, done, recovered):
    """Jobs submitted but neither received nor kept by any node (e.g. still
    queued in the client when it died): Abandoned, and said so."""
    got = {core_id for core_id, _ in recovered}
    lost = [core_id for core_id in ids if core_id not in done and core_id not in got]
    if lost:
        log.warning("recover_jobs: %d jobs were submitted but no node kept them (still "
                    "queued in the client when it went away, or their node's session "
                    "expired); they come back Abandoned: ids %s", len(lost),
                    ", ".join(repr(ids[core_id]) for core_id in lost[:20]))
    why = ("no node kept this job: it was still queued in the client when the client went "
           "away (or its node's session expired); it did not run")
    return [(core_id, DispyJob.abandoned(ids[core_id], why)) for core_id in lost]
