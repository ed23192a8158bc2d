"""Which worker runs which job of a node session: a pure state machine.

The session (:mod:`dpool.node.runtime`) does the I/O; it tells the
:class:`Dispatcher` what happened (jobs arrived, a worker joined, finished a
job, died, a cancel came) and carries out the actions each call returns
(load a function into a worker, send it jobs, report an outcome the node
made up, kill a worker).  Nothing here reads the clock, sends or sleeps, so
every policy is tested without processes (tests/node/test_dispatch.py).

Policies:

- Jobs wait in the session's queue, in order, until a worker has room.  A
  worker holds ``depth`` jobs at a time (its first one runs, the others wait
  in its socket): 1 for long jobs, so a waiting job goes to whichever worker
  frees first; 2 below ``PREFETCH_JOB`` seconds (the next job is already
  there when one ends); up to ``MAX_DEPTH`` below ``SHORT_JOB`` (tiny jobs
  stream).  Durations are measured (a moving average).
- A job waiting inside a worker (behind the one it runs) is not out of
  reach: ``ask_back`` (a client's Reclaim, a drain) and ``cancel`` ask the
  worker not to start it (:class:`Revoke`); the worker answers with the ones
  it dropped unstarted (:meth:`Dispatcher.revoked`), ahead of the result of
  the job before them, and a job it had started meanwhile just ends as
  usual: a held job first in its worker (the result before it taken) with
  no answer has started.  Until the answer the job counts as
  the worker's (a worker that dies requeues it once, with the rest).
- Each job goes to the worker with the fewest jobs; a worker about to reach
  its ``max_tasks`` gets no more than it will run.
- A worker that dies fails only the job it was running (``WORKER_LOST``, or
  ``KILLED`` when a cancel killed it); the jobs queued behind it go back to
  the front of the queue.
- A cancelled job still in the queue is reported ``CANCELLED``; a running one
  has its worker killed (the jobs held behind it asked back first: with
  ``interrupt`` the job may end before the kill, and the next must not
  start there); so has one asked back once it is first in its worker (it
  may have started: no answer comes then); one waiting inside a worker is reported at once and
  its result, when it comes, dropped (a *ghost*); if the result of the job
  before it comes with no GiveBack of it ahead (the worker had started it),
  it is stopped as a running one too (``stop_started``).
- Jobs in the queue can be handed back (``give_back``): the client moves
  them to a node with a free CPU, or away from a draining node; those
  waiting inside workers follow once the workers drop them (``ask_back``).
"""
from __future__ import annotations

import collections
from typing import Any

from ..errors import WorkerLost
from ..protocol import Outcome
from ..records import Fields, Value

SHORT_JOB = 0.002  # seconds: below this a worker gets several jobs at once
MAX_DEPTH = 32
# Below this (seconds) a worker also holds the job after its current one, so
# that it starts the moment the current one ends, with no wait for the node
# (on a loaded machine the node's turn to run can take milliseconds; 0.05 s
# left out sleep(0.05), which measures a little over).  A job held so can
# be cancelled or taken back unstarted (Revoke), but it can no longer move
# to a CPU that frees elsewhere: a worker reads the node's messages only
# as a job ends, so what it gives back comes when it would start anyway.
PREFETCH_JOB = 0.1

# Why a job is asked back (Dispatcher.revoking): for the client, cancelled
# (reported), cancelled while asked back.
_BACK, _GHOST, _CANCEL = "back", "ghost", "cancel"


class Worker(Fields):
    """What the dispatcher knows of one worker process (records, not
    dataclasses: see dpool.records)."""

    _fields = ("pid", "tasks_left", "outstanding", "fns", "dead", "killing")

    def __init__(self, pid: int = 0, tasks_left: int | None = None,
                 outstanding: collections.deque | None = None, fns: set | None = None,
                 dead: bool = False, killing: Any = None) -> None:
        self.pid = pid
        self.tasks_left = tasks_left  # jobs it will still run (max_tasks), None: no limit
        # the ids of its jobs ([0] runs)
        self.outstanding = collections.deque() if outstanding is None else outstanding
        self.fns = set() if fns is None else fns  # function ids it has loaded
        self.dead = dead
        self.killing = killing  # the job id whose cancel killed it


# ------------------------------------------------------------------- actions

class LoadFunction(Value):
    __slots__ = _fields = ("worker", "fn_id")

    def __init__(self, worker: Worker, fn_id: Any) -> None:
        self.worker = worker
        self.fn_id = fn_id


class Run(Value):
    __slots__ = _fields = ("worker", "jobs")

    def __init__(self, worker: Worker, jobs: list) -> None:
        self.worker = worker
        self.jobs = jobs  # the queued jobs (RunItem, payload frames), in order


class Report(Value):
    """An outcome the node makes up itself (no result from a worker)."""
    __slots__ = _fields = ("job_id", "outcome", "error")

    def __init__(self, job_id: Any, outcome: Outcome, error: BaseException | None = None) -> None:
        self.job_id = job_id
        self.outcome = outcome
        self.error = error


class Revoke(Value):
    """Ask ``worker`` not to start these jobs, which wait in it behind the
    one it runs (it answers with those it dropped: Dispatcher.revoked)."""
    __slots__ = _fields = ("worker", "job_ids")

    def __init__(self, worker: Worker, job_ids: list) -> None:
        self.worker = worker
        self.job_ids = job_ids


class Kill(Value):
    __slots__ = _fields = ("worker",)

    def __init__(self, worker: Worker) -> None:
        self.worker = worker


class Forget(Value):
    __slots__ = _fields = ("worker", "fn_ids")

    def __init__(self, worker: Worker, fn_ids: list) -> None:
        self.worker = worker
        self.fn_ids = fn_ids


class Dispatcher:
    """One session's queue and workers.  A job is ``(item, frames)``: a
    :class:`dpool.protocol.RunItem` (``job_id``, ``fn_id``...) and its
    payload frames, carried along."""

    def __init__(self):
        self.queue = collections.deque()  # jobs not given to a worker yet
        self.workers = []  # the workers that may take jobs
        self.fns = set()  # function ids the session can load into workers
        self.given = {}  # job id -> (worker, job) for jobs given to a worker (see dispatch)
        self.ghosts = set()  # cancelled after being given: drop their results
        # Jobs a Revoke asked a worker not to start, not answered yet, and
        # why: _BACK to the client (ask_back), _GHOST cancelled (reported),
        # _CANCEL cancelled while asked back (reported with the answer).
        self.revoking = {}
        self.ema = None  # moving average of job durations, seconds
        self.depth = 1

    # ---------------------------------------------------------------- events

    def submit(self, jobs):
        self.queue.extend(jobs)
        return self.dispatch()

    def add_worker(self, worker):
        self.workers.append(worker)
        return self.dispatch()

    def forget(self, fn_ids, lent=()):
        """The client needs these functions no more (``lent``: workers out of
        the dispatcher's hands that will serve it again, told too)."""
        self.fns.difference_update(fn_ids)
        actions = []
        for worker in [*self.workers, *lent]:
            gone = [fn_id for fn_id in fn_ids if fn_id in worker.fns]
            if gone and not worker.dead:
                worker.fns.difference_update(gone)
                actions.append(Forget(worker, gone))
        return actions

    def dispatch(self):
        """Give queued jobs to workers with room: at most one Run per worker."""
        actions, batches = [], {}
        queue = self.queue
        while queue:
            worker = self._free_worker()
            if worker is None:
                break
            job = queue.popleft()
            job_id, fn_id = job[0].job_id, job[0].fn_id
            if fn_id not in worker.fns:
                if fn_id not in self.fns:
                    actions.append(Report(job_id, Outcome.ERROR,
                                          LookupError(f"unknown function id {fn_id}")))
                    continue
                worker.fns.add(fn_id)
                actions.append(LoadFunction(worker, fn_id))
            batch = batches.get(worker)
            if batch is None:
                batch = batches[worker] = []
            batch.append(job)
            # A job the worker runs first fails with the worker if it dies
            # (worker_exited): its payload is not kept, so that a large
            # argument is freed here once it has been sent.  Jobs waiting
            # behind it are kept whole, to be requeued.
            kept = job if worker.outstanding else (job[0], ())
            worker.outstanding.append(job_id)
            self.given[job_id] = (worker, kept)
        actions.extend(Run(worker, jobs) for worker, jobs in batches.items())
        return actions

    def cancel(self, job_ids):
        ids = set(job_ids)
        actions = []
        kept = collections.deque()
        for job in self.queue:
            if job[0].job_id in ids:
                actions.append(Report(job[0].job_id, Outcome.CANCELLED))
            else:
                kept.append(job)
        self.queue = kept
        for job_id in job_ids:
            worker = self.given.get(job_id, (None,))[0]
            if worker is None or job_id in self.ghosts:
                continue
            revoking = self.revoking.get(job_id)
            if revoking is not None and worker.outstanding[0] != job_id:
                # Asked back unanswered: whether it started is not known
                # yet.  Dropped by the worker, it is reported cancelled
                # then (revoked); if it ran, its result comes as usual.
                if revoking is _BACK:
                    self.revoking[job_id] = _CANCEL
            elif worker.outstanding[0] == job_id:
                # (asked back too, and the job before it ended with no
                # GiveBack of it ahead of its result: the worker started it,
                # so it is stopped as a running one)
                if revoking is _BACK:
                    self.revoking[job_id] = _CANCEL
                if worker.dead:  # its exit reports it (worker_exited)
                    continue
                if worker.killing is None:
                    # The jobs held behind it must not start in a worker
                    # about to be killed (with ``interrupt`` the job may end
                    # first): asked back (requeued if it dies first).
                    held = self._held(worker)
                    if held:
                        self.revoking.update(dict.fromkeys(held, _BACK))
                        actions.append(Revoke(worker, held))
                    worker.killing = job_id  # reported KILLED when the worker is gone
                    actions.append(Kill(worker))
            else:
                # Waiting inside the worker: reported cancelled now; the
                # worker is asked not to start it, and its result, if it
                # did start it, is dropped.
                self.ghosts.add(job_id)
                actions.append(Report(job_id, Outcome.CANCELLED))
                if not worker.dead:
                    self.revoking[job_id] = _GHOST
                    actions.append(Revoke(worker, [job_id]))
        return actions

    def cancelled_unanswered(self, worker):
        """True if ``worker``'s first job was cancelled while it waited
        there and the worker has not answered the Revoke: once the result
        before it is taken, it has started (a worker sends its GiveBack
        ahead of that result; the Cancel came after the worker's check)."""
        outstanding = worker.outstanding
        return bool(outstanding) and self.revoking.get(outstanding[0]) in (_GHOST, _CANCEL)

    def stop_started(self, worker):
        """``worker`` gave no GiveBack for its first job, cancelled while it
        waited there (:meth:`cancelled_unanswered`), with the result of the
        job before it: it started it, so it is stopped as a running one
        (the worker killed, the jobs held behind it asked back), reported
        cancelled once (now, unless it was already)."""
        if worker.dead or worker.killing is not None or not self.cancelled_unanswered(worker):
            return []
        job_id = worker.outstanding[0]
        actions = []
        if self.revoking.pop(job_id) is _CANCEL:
            self.ghosts.add(job_id)
            actions.append(Report(job_id, Outcome.CANCELLED))
        held = self._held(worker)
        if held:
            self.revoking.update(dict.fromkeys(held, _BACK))
            actions.append(Revoke(worker, held))
        worker.killing = job_id
        actions.append(Kill(worker))
        return actions

    def done(self, worker, job_id, duration):
        """A worker's result for ``job_id``: True if it goes to the client.
        Call :meth:`dispatch` once after a batch of results."""
        if worker.outstanding and worker.outstanding[0] == job_id:
            worker.outstanding.popleft()
        if worker.tasks_left is not None:
            worker.tasks_left -= 1
        ghosts = self.ghosts
        deliver = self.given.pop(job_id, None) is not None and job_id not in ghosts
        if ghosts:
            ghosts.discard(job_id)
        if self.revoking:
            self.revoking.pop(job_id, None)  # (it had started: the Revoke came late)
        self._learn(duration)
        return deliver

    def ask_back(self, n=None):
        """Ask workers not to start up to ``n`` (all if None) of the jobs
        waiting in them behind the one they run, the last given first:
        Revoke actions; :meth:`revoked` hands them back as the workers
        answer."""
        actions = []
        n = len(self.given) if n is None else n
        revoking = self.revoking
        for worker in self.workers:
            if n <= 0:
                break
            if len(worker.outstanding) < 2 or worker.dead or worker.killing is not None:
                continue
            ids = self._held(worker)[-n:]
            if ids:
                revoking.update(dict.fromkeys(ids, _BACK))
                actions.append(Revoke(worker, ids))
                n -= len(ids)
        return actions

    def _held(self, worker):
        """The jobs waiting in ``worker`` behind its running one, not asked
        back or cancelled yet."""
        revoking, ghosts = self.revoking, self.ghosts
        return [job_id for job_id in list(worker.outstanding)[1:]
                if job_id not in revoking and job_id not in ghosts]

    def revoked(self, worker, job_ids):
        """``worker`` dropped these jobs unstarted (its answer to Revoke):
        returns ``(back, actions)``, the jobs (item, payload) to go back to
        the client, in order, and the reports of those cancelled meanwhile."""
        back, actions = [], []
        for job_id in job_ids:
            entry = self.given.get(job_id)
            if entry is None or entry[0] is not worker or job_id not in worker.outstanding:
                continue
            del self.given[job_id]
            worker.outstanding.remove(job_id)
            why = self.revoking.pop(job_id, None)
            if why is _GHOST or job_id in self.ghosts:  # (reported when cancelled,
                self.ghosts.discard(job_id)          # or when stopped: stop_started)
            elif why is _CANCEL:
                actions.append(Report(job_id, Outcome.CANCELLED))
            else:
                back.append(entry[1])
        return back, actions

    def revoke_pending(self, job_id):
        """True while a Revoke of ``job_id`` is unanswered: whether it
        starts is not known yet."""
        return job_id in self.revoking

    def started(self, job_id):
        """True if the client is to hear that ``job_id`` started."""
        return job_id not in self.ghosts

    def live(self, job_id):
        """True while ``job_id`` runs or waits in a worker, not cancelled."""
        return job_id in self.given and job_id not in self.ghosts

    def worker_closed(self, worker):
        """The worker's connection closed; True the first time (its exit
        status comes later, with :meth:`worker_exited`)."""
        if worker.dead:
            return False
        worker.dead = True
        return True

    def worker_exited(self, worker, how):
        """The dead worker's exit is known (``how`` says it in words): its
        running job fails, the jobs behind it go back to the queue."""
        if worker in self.workers:
            self.workers.remove(worker)
        if not worker.outstanding:
            return []
        actions = []
        if worker.killing is not None and worker.killing != worker.outstanding[0] \
                and self.revoking.get(worker.outstanding[0]) is _BACK:
            # Killed for a job it gave back after all (stop_started, a
            # GiveBack after the result before it: a worker of ours sends it
            # ahead; kept as a defence): its first job now is one held behind that one
            # and asked back for the kill, not cancelled: requeued as they are.
            return self._requeue_held(worker, actions)
        running = worker.outstanding.popleft()
        self.given.pop(running, None)
        why = self.revoking.pop(running, None)
        if running in self.ghosts:  # (reported when cancelled; see stop_started)
            self.ghosts.discard(running)
        elif worker.killing == running:
            actions.append(Report(running, Outcome.KILLED))
        elif why is _CANCEL:  # (started or not: cancelled, and gone)
            actions.append(Report(running, Outcome.CANCELLED))
        else:
            actions.append(Report(running, Outcome.WORKER_LOST, WorkerLost(
                f"the worker process (pid {worker.pid}) running this job {how}")))
        return self._requeue_held(worker, actions)

    def _requeue_held(self, worker, actions):
        """The jobs left in the dead ``worker`` go back to the front of the
        queue, but for the cancelled ones (reported, if not yet)."""
        for job_id in reversed(worker.outstanding):
            _, job = self.given.pop(job_id)
            why = self.revoking.pop(job_id, None)
            if job_id in self.ghosts:
                self.ghosts.discard(job_id)
            elif why is _CANCEL:
                actions.append(Report(job_id, Outcome.CANCELLED))
            else:  # (one asked back too: requeued here, once)
                self.queue.appendleft(job)
        worker.outstanding.clear()
        return actions

    def give_back(self, n=None):
        """Take up to ``n`` (all if None) jobs no worker has, from the back
        of the queue; returns their ids (the client runs them elsewhere)."""
        n = len(self.queue) if n is None else min(n, len(self.queue))
        return [self.queue.pop()[0].job_id for _ in range(n)][::-1]

    def clear(self):
        self.queue.clear()
        self.workers.clear()
        self.revoking.clear()

    # --------------------------------------------------------------- queries

    def pending(self):
        """Ids of the jobs not finished: queued, then given to workers."""
        return [job[0].job_id for job in self.queue] + [job_id for job_id in self.given
                                                 if job_id not in self.ghosts]

    def runs_at_once(self, fn_id):
        """The worker a job of ``fn_id`` submitted now would run on at once
        (nothing queued, a worker without jobs), or None."""
        if self.queue or fn_id not in self.fns:
            return None
        worker = self._free_worker()
        return worker if worker is not None and not worker.outstanding else None

    def running(self):
        """How many jobs workers hold (not cancelled)."""
        return sum(1 for job_id in self.given if job_id not in self.ghosts)

    # --------------------------------------------------------------- private

    def _free_worker(self):
        best = None
        for worker in self.workers:
            n = len(worker.outstanding)
            if n >= self.depth or worker.dead or worker.killing is not None:
                continue
            if worker.tasks_left is not None and n >= worker.tasks_left:
                continue
            if best is None or n < len(best.outstanding):
                best = worker
                if n == 0:
                    break
        return best

    def _learn(self, duration):
        ema = self.ema = duration if self.ema is None else 0.8 * self.ema + 0.2 * duration
        if ema < SHORT_JOB:  # (once per job: no builtin calls where a test does)
            depth = MAX_DEPTH if ema <= SHORT_JOB / MAX_DEPTH else int(SHORT_JOB / ema)
            self.depth = depth if depth > 2 else 2
        elif ema < PREFETCH_JOB:
            self.depth = 2  # the next job waits in the worker's socket: no gap
        else:
            self.depth = 1
