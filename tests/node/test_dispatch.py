"""The node session's dispatcher (dpool/node/dispatch.py), without processes:
worker choice, depth, requeue after a worker death, cancels, give-back."""
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dpool.protocol import Call, Outcome, RunItem
from dpool.errors import WorkerLost
from dpool.node.dispatch import (MAX_DEPTH, Dispatcher, Forget, Kill, LoadFunction, Report,
                                 Revoke, Run, Worker)


def job(job_id, fn_id=1):
    return (RunItem(job_id, fn_id, 1, Call.CALL, 1), [b"payload"])


def ready(workers=2, fns=(1,), max_tasks=None):
    d = Dispatcher()
    d.fns.update(fns)
    ws = [Worker(pid=100 + i, tasks_left=max_tasks) for i in range(workers)]
    for w in ws:
        assert d.add_worker(w) == []
    return d, ws


def runs(actions):
    """{worker: [job ids]} of the Run actions."""
    return {a.worker: [j[0].job_id for j in a.jobs] for a in actions if type(a) is Run}


def test_one_job_per_worker_while_durations_are_unknown():
    d, (a, b) = ready()
    actions = d.submit([job(i) for i in range(5)])
    assert [type(x) for x in actions] == [LoadFunction, LoadFunction, Run, Run]
    assert runs(actions) == {a: [0], b: [1]}
    assert [j[0].job_id for j in d.queue] == [2, 3, 4]


def test_runs_at_once_names_the_worker_a_job_would_start_on_now():
    """(a node streams a large argument only to the worker that runs its
    job at once: see Session.stream_argument)"""
    d, (a, b) = ready()
    assert d.runs_at_once(1) is a
    assert d.runs_at_once(2) is None   # an unknown function: reported as usual
    assert runs(d.submit([job(0)])) == {a: [0]}
    assert d.runs_at_once(1) is b
    assert runs(d.submit([job(1)])) == {b: [1]}
    assert d.runs_at_once(1) is None   # both busy: it would wait
    d.submit([job(2)])
    assert d.done(a, 0, 1.0)
    assert d.runs_at_once(1) is None   # (job 2 waits for it, in the queue)


def test_function_is_loaded_once_per_worker():
    d, (a,) = ready(1)
    assert [type(x) for x in d.submit([job(0)])] == [LoadFunction, Run]
    assert d.done(a, 0, 1.0)
    assert [type(x) for x in d.submit([job(1)])] == [Run]


def test_unknown_function_is_reported_as_an_error():
    d, (a,) = ready(1)
    [report] = d.submit([job(0, fn_id=9)])
    assert report.outcome == Outcome.ERROR and isinstance(report.error, LookupError)
    assert d.pending() == []


def test_the_freed_worker_takes_the_next_job():
    d, (a, b) = ready()
    d.submit([job(i) for i in range(3)])
    assert d.done(b, 1, 1.0)
    assert runs(d.dispatch()) == {b: [2]}


def test_depth_follows_measured_durations():
    d, (a,) = ready(1)
    assert d.depth == 1
    d.submit([job(0)])
    d.done(a, 0, 0.01)
    assert d.depth == 2
    for i in range(1, 40):
        d.submit([job(i)])
        d.done(a, i, 1e-5)
    assert d.depth == MAX_DEPTH
    d.dispatch()
    for i in range(40, 80):
        d.done(a, i, 5.0)
    assert d.depth == 1


def test_short_jobs_go_several_to_a_worker():
    d, (a, b) = ready()
    d.depth = 4
    assert runs(d.submit([job(i) for i in range(6)])) == {a: [0, 2, 4], b: [1, 3, 5]}


def test_max_tasks_caps_what_a_worker_is_given():
    d, (a,) = ready(1, max_tasks=2)
    d.depth = 8
    assert runs(d.submit([job(i) for i in range(5)])) == {a: [0, 1]}


def test_worker_death_fails_its_running_job_and_requeues_the_rest():
    d, (a, b) = ready()
    d.depth = 3
    d.submit([job(i) for i in range(6)])  # a: 0 2 4, b: 1 3 5
    assert d.worker_closed(a) and not d.worker_closed(a)
    assert runs(d.dispatch()) == {}  # a dead worker gets nothing
    [lost] = d.worker_exited(a, "was killed by signal 9")
    assert lost.job_id == 0 and lost.outcome == Outcome.WORKER_LOST
    assert isinstance(lost.error, WorkerLost)
    assert str(lost.error) == ("the worker process (pid 100) running this job "
                               "was killed by signal 9")
    assert [j[0].job_id for j in d.queue] == [2, 4]
    assert a not in d.workers
    c = Worker(pid=200)
    assert runs(d.add_worker(c)) == {c: [2, 4]}


def test_cancel_queued_running_and_waiting_jobs():
    d, (a,) = ready(1)
    d.depth = 2
    d.submit([job(i) for i in range(3)])  # a: 0 (running), 1 (waiting); 2 queued
    actions = d.cancel([2, 1, 0])
    assert Report(2, Outcome.CANCELLED) in actions and Report(1, Outcome.CANCELLED) in actions
    assert Kill(a) in actions and a.killing == 0
    assert d.cancel([0]) == []  # already being killed
    d2, (w,) = ready(1)
    d2.depth = 2
    d2.submit([job(0), job(1)])
    d2.cancel([1])
    assert d2.done(w, 0, 0.1)
    assert not d2.done(w, 1, 0.1)  # ...is dropped
    assert d2.pending() == []


def test_a_killed_worker_reports_killed_and_drops_its_ghosts():
    d, (a,) = ready(1)
    d.depth = 3
    d.submit([job(0), job(1), job(2)])
    d.cancel([1])  # waiting: a ghost
    d.cancel([0])  # running: kill
    d.worker_closed(a)
    actions = d.worker_exited(a, "was killed by signal 9")
    assert actions == [Report(0, Outcome.KILLED)]
    assert [j[0].job_id for j in d.queue] == [2]


def test_cancel_of_a_running_job_whose_worker_is_dead_waits_for_its_exit():
    d, (a,) = ready(1)
    d.submit([job(0)])
    d.worker_closed(a)
    assert d.cancel([0]) == []
    [lost] = d.worker_exited(a, "exited with code 3")
    assert lost.outcome == Outcome.WORKER_LOST


def test_forget_tells_only_the_workers_that_loaded_the_function():
    d, (a, b) = ready(fns=(1, 2))
    d.submit([job(0, 1)])
    assert d.forget([1, 2]) == [Forget(a, [1])]
    assert not a.fns and 1 not in d.fns


def test_give_back_takes_queued_jobs_from_the_back():
    d, (a,) = ready(1)
    d.submit([job(i) for i in range(5)])
    assert d.give_back(2) == [3, 4]
    assert d.give_back(9) == [1, 2]
    assert d.give_back() == []
    assert d.pending() == [0]


def test_pending_lists_queued_then_given():
    d, (a,) = ready(1)
    d.submit([job(i) for i in range(3)])
    assert d.pending() == [1, 2, 0]
    assert d.running() == 1


# ------------------------------------------------------------ property

@settings(max_examples=150, stateful_step_count=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
class DispatcherNeverLosesJobs(RuleBasedStateMachine):
    """Random submit/done/cancel/worker death/give-back/ask-back sequences:
    every job ends exactly once (a result delivered, a Report, or given
    back); a worker runs its jobs in order and holds at most ``depth`` of
    them; no job waits in the queue while a live worker is idle.  A worker
    asked not to start a job (Revoke) either drops it (``drop``, if it has
    not started it) or runs it (``finish``)."""

    @initialize(workers=st.integers(1, 3), fns=st.sets(st.integers(1, 3), min_size=1))
    def start(self, workers, fns):
        self.d = Dispatcher()
        self.d.fns.update(fns)
        self.pids = iter(range(1000, 10**6))
        self.held = {}  # worker -> job ids it was sent, in order
        self.ended = {}
        self.jobs = set()
        self.next_id = 0
        self.asked = {}  # worker -> job ids a Revoke asked it not to start
        self.began = set()  # jobs a worker started (it can no longer drop them)
        for _ in range(workers):
            self.add_worker()

    def apply(self, actions):
        for action in actions:
            kind = type(action)
            if kind is Run:
                assert not action.worker.dead
                for item, _ in action.jobs:
                    assert item.fn_id in action.worker.fns
                    assert item.job_id not in self.ended
                    self.held[action.worker].append(item.job_id)
                assert len(action.worker.outstanding) <= max(self.d.depth, 1)
            elif kind is Report:
                self.end(action.job_id, action.outcome)
            elif kind is Revoke:
                assert not action.worker.dead
                for job_id in action.job_ids:
                    assert job_id in self.held[action.worker]
                    assert job_id not in self.began
                    self.asked.setdefault(action.worker, set()).add(job_id)
            elif kind in (LoadFunction, Kill, Forget):
                pass
            else:
                raise AssertionError(action)

    def end(self, job_id, how):
        assert job_id in self.jobs
        assert job_id not in self.ended, f"job {job_id} ended twice"
        self.ended[job_id] = how

    @rule()
    def add_worker(self):
        worker = Worker(pid=next(self.pids))
        self.held[worker] = []
        self.apply(self.d.add_worker(worker))

    @rule(n=st.integers(1, 4), fn=st.integers(1, 4))
    def submit(self, n, fn):
        ids = range(self.next_id, self.next_id + n)
        self.next_id += n
        self.jobs.update(ids)
        self.apply(self.d.submit([job(i, fn) for i in ids]))

    def busy(self):
        return [w for w in self.d.workers if w.outstanding and not w.dead]

    @precondition(lambda self: self.busy())
    @rule(data=st.data(), duration=st.sampled_from([1e-5, 0.01, 1.0]))
    def finish(self, data, duration):
        worker = data.draw(st.sampled_from(self.busy()))
        job_id = worker.outstanding[0]
        if worker.killing == job_id:
            return
        assert self.held[worker][0] == job_id  # in the order sent
        self.held[worker].pop(0)
        self.began.add(job_id)
        if self.d.done(worker, job_id, duration):
            self.end(job_id, "done")
        else:
            assert job_id in self.ended  # a ghost: cancelled before
        self.apply(self.d.dispatch())

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data):
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        self.apply(self.d.cancel([job_id]))

    @precondition(lambda self: [w for w in self.d.workers if not w.dead])
    @rule(data=st.data())
    def die(self, data):
        worker = data.draw(st.sampled_from([w for w in self.d.workers if not w.dead]))
        assert self.d.worker_closed(worker)
        self.apply(self.d.worker_exited(worker, "died"))
        self.held[worker] = []
        self.asked.pop(worker, None)
        self.apply(self.d.dispatch())

    @rule(n=st.one_of(st.none(), st.integers(0, 3)))
    def ask_back(self, n):
        self.apply(self.d.ask_back(n))

    def droppable(self):
        return [(w, j) for w, ids in self.asked.items() for j in sorted(ids)
                if not w.dead and j in self.held[w] and j not in self.began]

    @precondition(lambda self: self.droppable())
    @rule(data=st.data())
    def drop(self, data):
        worker, job_id = data.draw(st.sampled_from(self.droppable()))
        self.held[worker].remove(job_id)
        self.asked[worker].discard(job_id)
        back, actions = self.d.revoked(worker, [job_id])
        for item, _ in back:
            self.end(item.job_id, "given back")
        self.apply(actions)
        self.apply(self.d.dispatch())

    @rule(n=st.integers(0, 3))
    def give_back(self, n):
        for job_id in self.d.give_back(n):
            self.end(job_id, "given back")

    @invariant()
    def every_job_accounted_for(self):
        if not hasattr(self, "d"):
            return
        pending = self.d.pending()
        assert len(pending) == len(set(pending))
        assert set(pending) | set(self.ended) == self.jobs
        assert not set(pending) & set(self.ended)

    @invariant()
    def no_idle_worker_while_jobs_wait(self):
        if not hasattr(self, "d"):
            return
        if self.d.queue:
            assert all(w.outstanding or w.dead for w in self.d.workers)


TestDispatcherNeverLosesJobs = DispatcherNeverLosesJobs.TestCase


def test_a_job_that_runs_first_is_not_kept_with_its_payload():
    """A large argument is held by the node only until it is sent to the
    worker (issue 15): the job a worker runs first is lost with the worker if
    it dies, so its payload need not be kept; a job waiting behind it is kept
    whole, to be requeued."""
    import gc
    import weakref

    class Frame:
        pass

    d, (a,) = ready(1)
    d.depth = 2
    first, behind = Frame(), Frame()
    refs = weakref.ref(first), weakref.ref(behind)
    jobs = [(RunItem(i, 1, 1, Call.CALL, 1), [frame]) for i, frame in enumerate((first, behind))]
    actions = d.submit(jobs)
    assert runs(actions) == {a: [0, 1]}
    del first, behind, jobs, actions
    gc.collect()
    assert refs[0]() is None and refs[1]() is not None
    assert d.worker_exited(a, "was killed")[0].outcome == Outcome.WORKER_LOST
    assert [j[0].job_id for j in d.queue] == [1] and d.queue[0][1] == [refs[1]()]


def test_ask_back_takes_jobs_held_in_workers_the_last_first():
    d, (a, b) = ready()
    d.depth = 2
    d.submit([job(i) for i in range(5)])  # a: 0 2, b: 1 3; 4 queued
    assert d.give_back(2) == [4]
    assert d.ask_back(1) == [Revoke(a, [2])]
    assert d.ask_back(1) == [Revoke(b, [3])]
    assert d.ask_back() == []  # nothing more held
    back, _ = d.revoked(b, [3])
    assert [item.job_id for item, _ in back] == [3]
    assert d.pending() == [0, 1, 2]


def test_a_job_held_behind_a_stopped_one_whose_giveback_came_late_is_requeued_not_lost():
    """stop_started killed the worker (no GiveBack ahead of the result before
    the cancelled job: a worker of ours sends it so; this is a defence),
    but the worker had dropped the cancelled job and gone on to the next, not
    cancelled, whose Revoke the kill made: the late GiveBack leaves that one
    first in the dying worker.  It is requeued as the other held jobs are,
    not failed WORKER_LOST (nor reported killed): its cancel was not asked."""
    d, (a,) = ready(1)
    d.depth = 3
    d.submit([job(0), job(1), job(2)])  # a: 0 runs, 1 and 2 wait
    d.cancel([1])  # waiting: reported, a Revoke
    assert d.done(a, 0, 0.5)
    actions = d.stop_started(a)  # (no GiveBack ahead of 0's result)
    assert Kill(a) in actions and Revoke(a, [2]) in actions
    assert d.revoked(a, [1]) == ([], [])  # the late GiveBack: dropped unstarted
    d.worker_closed(a)
    assert d.worker_exited(a, "was killed by signal 9") == []
    assert [j[0].job_id for j in d.queue] == [2]
    assert d.pending() == [2] and not d.revoking and not d.ghosts
