"""The scheduler as a pure state machine: events in, actions out.

No sockets, no clock, no sleeps: nodes are plain strings, times are numbers.
"""
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from dpool.core.client import SCHEDULER_DEPTH
from dpool.core.scheduler import (RECLAIM_MIN, Cancelled, CancelRemote, Fail, Reclaim,
                                  Scheduler, Send)
from dpool.errors import NodeLost


def sends(actions):
    """{node: [job ids]} of the Send actions (and nothing else is allowed)."""
    out = {}
    for action in actions:
        assert isinstance(action, Send), action
        out.setdefault(action.node, []).extend(action.jobs)
    return out


def only(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


# ------------------------------------------------------------ in-flight limits

def test_no_node_no_send():
    s = Scheduler()
    assert s.submit([1, 2, 3]) == []
    assert s.pending() == 3 and s.queued() == 3


def test_queued_jobs_share_one_record_until_dispatched():
    """A million queued jobs are not a million GC-tracked records: the
    unpinned ones share one read-only record; each gets its own as it is
    dispatched, with its attempts counted from there."""
    s = Scheduler()
    s.submit(range(100))
    shared = {id(job) for job in s.jobs.values()}
    assert len(shared) == 1
    record = s.jobs[0]
    try:
        record.tries = 5
    except AttributeError:
        pass
    else:
        raise AssertionError("the shared record was written")
    assert record.tries == 0 and record.node is None
    assert sends(s.add_node("a", 1)) == {"a": [0, 1]}
    assert s.jobs[0] is not record and s.attempt(0) == 1 and s.jobs[2] is record
    assert sends(s.given_back("a", [1])) == {"a": [1]}  # (a new attempt)
    assert s.finish("a", 0, attempt=1) and s.attempt(1) == 2
    assert sends(s.dispatch()) == {"a": [2]}
    assert s.attempt(2) == 1 and s.jobs[3] is record
    assert s.cancel(3) == [Cancelled(3)] and s.queued() == 96
    assert record.tries == 0 and record.node is None and not record.cancelling


def test_read_ahead_is_two_per_cpu_before_any_job_is_timed():
    s = Scheduler()
    assert s.add_node("a", 2) == []
    assert sends(s.submit(range(10))) == {"a": [0, 1, 2, 3]}
    assert s.queued() == 6 and s.pending() == 10


def test_a_dpool_scheduler_holds_its_depth_per_cpu_and_a_node_still_two():
    """A scheduler (the client gives it a larger depth) queues jobs beyond
    what its nodes hold, to refill them as jobs end; long jobs keep it there."""
    s = Scheduler()
    s.add_node("sched", 2, depth=SCHEDULER_DEPTH)
    s.add_node("node", 2)
    out = sends(s.submit(range(40)))
    assert (len(out["sched"]), len(out["node"])) == (2 * SCHEDULER_DEPTH, 4)
    s.done("sched", 0, duration=1.0)
    assert len(s.nodes["sched"].inflight) == s.nodes["sched"].limit() == 2 * SCHEDULER_DEPTH


def test_node_added_after_submit_gets_the_queue_in_order():
    s = Scheduler()
    s.submit(range(5))
    assert sends(s.add_node("a", 1)) == {"a": [0, 1]}


def test_long_jobs_are_not_piled_up():
    """With long jobs the limit stays two per CPU: one running, one waiting."""
    s = Scheduler()
    s.add_node("a", 2)
    s.submit(range(10))
    assert sends(s.done("a", 0, duration=1.0)) == {"a": [4]}  # limit stays 4
    assert sends(s.done("a", 1, duration=1.0)) == {"a": [5]}
    assert len(s.nodes["a"].inflight) == s.nodes["a"].limit() == 4


def test_short_jobs_stream_deeper():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit(range(100))
    out = sends(s.done("a", 0, duration=0.0001))
    assert len(s.nodes["a"].inflight) == s.nodes["a"].limit() == 65
    assert out["a"][0] == 2 and len(out["a"]) == 64


def test_done_without_dispatch_then_dispatch():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit(range(6))
    assert s.done("a", 0, dispatch=False) == []
    assert s.done("a", 1, dispatch=False) == []
    assert sends(s.dispatch()) == {"a": [2, 3]}


def test_set_cpus_grows_the_limit():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit(range(10))
    assert sends(s.set_cpus("a", 3)) == {"a": [2, 3, 4, 5]}
    assert s.set_cpus("unknown", 3) == []


# ------------------------------------------------------------ two nodes

def test_dispatch_across_two_nodes():
    s = Scheduler()
    s.add_node("a", 1)
    s.add_node("b", 1)
    out = sends(s.submit(range(5)))
    assert sorted(out) == ["a", "b"]
    assert sorted(out["a"] + out["b"]) == [0, 1, 2, 3]
    assert len(out["a"]) == len(out["b"]) == 2
    node = "a" if 0 in out["a"] else "b"
    assert sends(s.done(node, 0)) == {node: [4]}


def test_the_emptier_node_is_filled_first():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit([1, 2])            # a is full
    s.add_node("b", 2)
    assert sends(s.submit([3, 4, 5])) == {"b": [3, 4, 5]}


# ------------------------------------------------------------ no idle CPU

def test_one_job_per_free_cpu_everywhere_before_any_read_ahead():
    """6 jobs on 3 nodes of 2 CPUs: two each, none queued behind another
    (issue 9: one node idled while another ran four)."""
    s = Scheduler()
    for node in "abc":
        s.add_node(node, 2)
    assert {n: len(ids) for n, ids in sends(s.submit(range(6))).items()} == \
        {"a": 2, "b": 2, "c": 2}
    assert all(state.waiting() == 0 for state in s.nodes.values())


def test_read_ahead_goes_out_only_after_every_cpu_has_a_job():
    s = Scheduler()
    s.add_node("a", 1)
    s.add_node("b", 2)
    # 0, 1, 2 one per CPU (the node with more free CPUs first), then two per CPU
    assert sends(s.submit(range(7))) == {"b": [0, 1, 3, 4], "a": [2, 5]}


def test_a_free_cpu_reclaims_a_job_waiting_on_another_node():
    s = Scheduler()
    s.add_node("a", 1)
    s.add_node("b", 1)
    s.submit(range(4))                      # a: 0 runs, 2 waits; b: 1 runs, 3 waits
    assert sends(s.done("b", 1, duration=1.0)) == {}  # b runs 3: nothing to move
    assert s.done("b", 3, duration=1.0) == [Reclaim("a", 1)]
    assert s.dispatch() == []               # asked once, until the answer
    assert sends(s.given_back("a", [2])) == {"b": [2]}
    assert s.nodes["a"].inflight == {0} and s.nodes["b"].inflight == {2}
    assert s.done("a", 0) == [] and s.done("b", 2) == []
    assert s.pending() == 0


def test_a_given_back_job_is_not_a_retry():
    s = Scheduler(max_retries=1)
    s.add_node("a", 1)
    s.add_node("b", 1)
    s.submit(range(3))                      # a: 0, 2; b: 1
    assert s.done("b", 1, duration=1.0) == [Reclaim("a", 1)]
    assert sends(s.given_back("a", [2])) == {"b": [2]}
    assert s.attempt(2) == 2  # a new attempt, but not a retry:
    assert sends(s.remove_node("b")) == {"a": [2]}  # a retry left


def test_a_short_answer_stops_reclaims_until_a_job_ends_there():
    s = Scheduler()
    s.add_node("b", 1)
    s.submit([0, 1, 2])                     # b: 0 runs, 1 waits; 2 queued here
    assert sends(s.add_node("a", 1)) == {"a": [2]}
    assert s.done("a", 2, duration=1.0) == [Reclaim("b", 1)]
    assert s.given_back("b", []) == []      # it had started it: ask no more
    assert s.dispatch() == []
    assert s.done("b", 0, duration=1.0) == []  # nothing waits there now
    assert s.pending() == 1


def test_tiny_jobs_are_not_reclaimed():
    s = Scheduler()
    s.add_node("a", 1)
    s.add_node("b", 1)
    s.submit(range(4))
    s.done("a", 0, duration=RECLAIM_MIN / 10)
    s.done("b", 1, duration=1.0)
    assert only(s.done("b", 3, duration=1.0), Reclaim) == []


def test_pinned_jobs_are_not_reclaimed():
    s = Scheduler()
    s.add_node("a", 1)
    s.add_node("b", 1)
    s.submit([0, 1], pin="a")
    assert s.dispatch() == []


def test_a_cancelled_job_given_back_is_cancelled():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit([0, 1])
    assert s.cancel(1) == [CancelRemote("a", [1])]
    assert s.given_back("a", [1]) == [Cancelled(1)]
    assert s.pending() == 1


def test_adopted_jobs_stay_on_their_node_whatever_their_attempt():
    """Jobs taken over with a node's session (recover_jobs) were sent by
    another client: any attempt of theirs is current, they go nowhere else,
    and they fail if that node is lost or gives them back."""
    s = Scheduler()
    s.add_node("a", 0)                      # no CPU for new jobs
    s.add_node("b", 1)
    s.adopt("a", [7, 8, 9])
    assert s.current("a", 7, attempt=3) and not s.current("b", 7)
    assert s.done("a", 7, attempt=3) == [] and s.pending() == 2
    assert [fail.job for fail in only(s.given_back("a", [8]), Fail)] == [8]
    lost = only(s.remove_node("a"), Fail)
    assert [fail.job for fail in lost] == [9] and isinstance(lost[0].error, NodeLost)
    assert s.pending() == 0 and s.stale == 0


def test_a_draining_node_gets_nothing_new_and_its_jobs_move():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit(range(3))                      # a: 0, 1; 2 queued
    assert s.drain("a") == []
    s.add_node("b", 1)                      # b takes 2 (and reads ahead nothing more)
    assert sends(s.given_back("a", [1])) == {"b": [1]}
    assert s.done("a", 0, duration=1.0) == []  # nothing new for a
    assert s.pending() == 2


# ------------------------------------------------------------ node loss

def test_node_loss_requeues_in_flight_jobs_in_order_at_the_front():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit(range(4))                       # a runs 0, 1; 2, 3 wait
    assert s.remove_node("a") == []
    assert s.queued() == 4
    assert sends(s.add_node("b", 2)) == {"b": [0, 1, 2, 3]}


def test_node_loss_moves_jobs_to_the_other_node():
    s = Scheduler()
    s.add_node("a", 1)
    s.add_node("b", 1)
    assert sends(s.submit(range(3))) == {"a": [0, 2], "b": [1]}
    assert s.done("b", 1, duration=0.001) == []  # tiny jobs: not worth reclaiming
    assert sends(s.remove_node("a")) == {"b": [0, 2]}
    assert s.nodes["b"].inflight == {0, 2}


def test_retries_then_node_lost():
    s = Scheduler(max_retries=2)
    s.submit([7])
    for i in range(3):
        assert sends(s.add_node(f"n{i}", 1)) == {f"n{i}": [7]}
        actions = s.remove_node(f"n{i}", reason=f"n{i} went away")
        if i < 2:
            assert actions == [] and s.queued() == 1
    (fail,) = actions
    assert isinstance(fail, Fail) and fail.job == 7
    assert isinstance(fail.error, NodeLost) and "n2 went away" in str(fail.error)
    assert s.pending() == 0
    assert s.add_node("n9", 1) == []


def test_max_retries_zero_fails_at_the_first_loss():
    s = Scheduler(max_retries=0)
    s.add_node("a", 1)
    s.submit([1])
    (fail,) = s.remove_node("a")
    assert fail.job == 1 and isinstance(fail.error, NodeLost)


def test_removing_an_unknown_node_is_harmless():
    s = Scheduler()
    assert s.remove_node("ghost") == []


# ------------------------------------------------------------ pinned jobs

def test_pinned_jobs_wait_for_their_node():
    s = Scheduler()
    s.add_node("a", 4)
    assert s.submit([1, 2], pin="b") == []
    assert sends(s.submit([3])) == {"a": [3]}
    assert sends(s.add_node("b", 1)) == {"b": [1, 2]}


def test_pinned_jobs_fail_with_their_node():
    s = Scheduler()
    s.add_node("a", 1)
    s.add_node("b", 1)
    s.submit([1, 2, 3], pin="b")            # b runs 1, 2; 3 waits for b
    actions = s.remove_node("b")
    failed = sorted(a.job for a in only(actions, Fail))
    assert failed == [1, 2, 3]
    assert all(isinstance(a.error, NodeLost) for a in only(actions, Fail))
    assert not only(actions, Send)          # never moved to a
    assert s.pending() == 0


# ------------------------------------------------------------ cancel

def test_cancel_queued_job():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit(range(4))                      # 0, 1 sent; 2, 3 queued
    assert s.cancel(2) == [Cancelled(2)]
    assert s.cancel(2) == []                # once only
    assert sends(s.done("a", 0)) == {"a": [3]}  # 2 is skipped


def test_cancel_sent_job_asks_its_node():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit([1])
    assert s.cancel(1) == [CancelRemote("a", [1])]
    assert s.pending() == 1                 # until the node says it is done
    assert s.done("a", 1) == []
    assert s.pending() == 0
    assert s.cancel(1) == [] and s.cancel(99) == []


def test_cancelled_job_is_not_rerun_when_its_node_is_lost():
    s = Scheduler()
    s.add_node("a", 1)
    s.add_node("b", 1)
    out = sends(s.submit([1]))
    node = next(iter(out))
    assert s.cancel(1) == [CancelRemote(node, [1])]
    actions = s.remove_node(node)
    assert not only(actions, Send), actions
    assert only(actions, Cancelled) == [Cancelled(1)] or \
        [a.job for a in only(actions, Fail)] == [1]


def test_fail_queued():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit(range(4))                      # 0, 1 on a
    s.submit([10], pin="b")
    error = RuntimeError("no node left")
    actions = s.fail_queued(error)
    assert sorted(a.job for a in actions) == [2, 3, 10]
    assert all(isinstance(a, Fail) and a.error is error for a in actions)
    assert s.pending() == 2 and s.queued() == 0
    assert s.done("a", 0) == [] and s.done("a", 1) == []
    assert s.pending() == 0


# ------------------------------------------------------------ property

NODES = ["a", "b", "c"]


@settings(max_examples=150, stateful_step_count=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
class SchedulerNeverLosesJobs(RuleBasedStateMachine):
    """Random submit/add_node/remove_node/done/cancel sequences: every job
    ends exactly once, by Send and then done, Fail, or Cancelled."""

    @initialize(retries=st.integers(0, 2))
    def start(self, retries):
        self.s = Scheduler(max_retries=retries)
        self.next_id = 0
        self.present = {}       # node -> cpus
        self.where = {}         # job -> node, for jobs in flight
        self.ended = {}         # job -> how it ended
        self.jobs = set()
        self.asked = {}         # node -> jobs a Reclaim asked back
        self.draining = set()

    # -- driving the scheduler and checking each action --------------------

    def apply(self, actions):
        for action in actions:
            if isinstance(action, Send):
                assert action.node in self.present, action
                assert action.node not in self.draining, action
                assert action.jobs, action
                for job in action.jobs:
                    assert job in self.jobs and job not in self.ended, (job, action)
                    assert job not in self.where, f"job {job} sent while in flight"
                    self.where[job] = action.node
            elif isinstance(action, Fail):
                self.end(action.job, "fail")
                assert job_not_running(self, action.job)
            elif isinstance(action, Cancelled):
                assert action.job not in self.where
                self.end(action.job, "cancelled")
            elif isinstance(action, CancelRemote):
                for job in action.jobs:
                    assert self.where.get(job) == action.node
            elif isinstance(action, Reclaim):
                assert action.node in self.present and action.node not in self.draining
                assert action.node not in self.asked, "asked again before the answer"
                assert 0 < action.count <= sum(1 for n in self.where.values()
                                               if n == action.node)
                self.asked[action.node] = action.count
            else:
                raise AssertionError(f"unknown action {action!r}")

    def end(self, job, how):
        assert job in self.jobs, job
        assert job not in self.ended, f"job {job} ended twice ({self.ended.get(job)}, {how})"
        self.ended[job] = how
        self.where.pop(job, None)

    # -- rules ---------------------------------------------------------------

    @rule(n=st.integers(1, 5), pinned=st.booleans(), data=st.data())
    def submit(self, n, pinned, data):
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        self.jobs.update(ids)
        pin = None
        if pinned and self.present:
            pin = data.draw(st.sampled_from(sorted(self.present)))
        self.apply(self.s.submit(ids, pin=pin))

    @rule(node=st.sampled_from(NODES), cpus=st.integers(1, 3))
    def add_node(self, node, cpus):
        if node in self.present:
            return
        self.present[node] = cpus
        self.apply(self.s.add_node(node, cpus))

    @precondition(lambda self: self.present)
    @rule(data=st.data(), cpus=st.integers(0, 3))
    def set_cpus(self, data, cpus):
        """A node's CPU count changes (JobCluster's set_node_cpus, close_node: 0)."""
        node = data.draw(st.sampled_from(sorted(self.present)))
        self.present[node] = cpus
        self.apply(self.s.set_cpus(node, cpus))

    @precondition(lambda self: self.present)
    @rule(data=st.data())
    def remove_node(self, data):
        node = data.draw(st.sampled_from(sorted(self.present)))
        del self.present[node]
        self.draining.discard(node)
        self.asked.pop(node, None)
        lost = [job for job, where in self.where.items() if where == node]
        for job in lost:
            del self.where[job]  # requeued or failed: either way not in flight
        self.apply(self.s.remove_node(node))

    @precondition(lambda self: self.where)
    @rule(data=st.data(), duration=st.floats(0, 2))
    def done(self, data, duration):
        job = data.draw(st.sampled_from(sorted(self.where)))
        node = self.where.pop(job)
        self.ended[job] = "done"
        if self.asked.get(node):
            self.asked.pop(node)  # (its answer may be lost: a job ended here)
        self.apply(self.s.done(node, job, duration=duration))

    @precondition(lambda self: self.where)
    @rule(data=st.data(), durations=st.lists(st.floats(0, 2), min_size=1, max_size=4))
    def done_batch(self, data, durations):
        """As the client takes a DONE batch: finish without syncing the
        indexes, then sync once and dispatch (the invariants hold after)."""
        node = data.draw(st.sampled_from(sorted(set(self.where.values()), key=str)))
        jobs = sorted(job for job, where in self.where.items() if where == node)
        for job, duration in zip(jobs, durations):
            del self.where[job]
            self.ended[job] = "done"
            assert self.s.finish(node, job, None, duration, sync=False)
        if self.asked.get(node):
            self.asked.pop(node)  # (its answer may be lost: a job ended here)
        self.s.sync(node)
        self.apply(self.s.dispatch())

    @precondition(lambda self: self.where)
    @rule(data=st.data(), between=st.sampled_from(["dispatch", "submit", "set_cpus", "remove",
                                                   "cancel"]))
    def done_batch_then_more(self, data, between):
        """A DONE batch finished without syncing, then something else before
        the sync (what the results' handlers may do on the loop thread:
        dispatch, submit, close the node...): the invariants hold after."""
        node = data.draw(st.sampled_from(sorted(set(self.where.values()), key=str)))
        jobs = sorted(job for job, where in self.where.items() if where == node)
        for job in jobs[:data.draw(st.integers(1, len(jobs)))]:
            del self.where[job]
            self.ended[job] = "done"
            assert self.s.finish(node, job, None, 1.0, sync=False)
        if self.asked.get(node):
            self.asked.pop(node)
        if between == "dispatch":
            self.apply(self.s.dispatch())
        elif between == "submit":
            self.submit(data.draw(st.integers(1, 5)), False, data)
        elif between == "set_cpus":
            cpus = data.draw(st.integers(0, 3))
            self.present[node] = cpus
            self.apply(self.s.set_cpus(node, cpus))
        elif between == "remove":
            del self.present[node]
            self.draining.discard(node)
            self.asked.pop(node, None)
            for job in [job for job, where in self.where.items() if where == node]:
                del self.where[job]
            self.apply(self.s.remove_node(node))
        elif self.jobs:
            self.cancel(data)
        self.s.sync(node)
        self.apply(self.s.dispatch())

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data):
        job = data.draw(st.sampled_from(sorted(self.jobs)))
        self.apply(self.s.cancel(job))

    def give_back(self, node, data, most):
        here = sorted(j for j, n in self.where.items() if n == node)
        back = data.draw(st.lists(st.sampled_from(here), unique=True, max_size=most)) \
            if here else []
        for job in back:
            del self.where[job]
        self.apply(self.s.given_back(node, back))

    @precondition(lambda self: self.asked)
    @rule(data=st.data())
    def answer_reclaim(self, data):
        node = data.draw(st.sampled_from(sorted(self.asked)))
        count = self.asked.pop(node)
        if node in self.present:
            self.give_back(node, data, count)

    @precondition(lambda self: set(self.present) - self.draining)
    @rule(data=st.data())
    def drain(self, data):
        node = data.draw(st.sampled_from(sorted(set(self.present) - self.draining)))
        self.draining.add(node)
        self.apply(self.s.drain(node))
        self.asked.pop(node, None)
        self.give_back(node, data, 100)

    @rule()
    def fail_queued(self):
        self.apply(self.s.fail_queued(RuntimeError("no nodes")))

    # -- invariants ----------------------------------------------------------

    @invariant()
    def bookkeeping_agrees(self):
        if not hasattr(self, "s"):
            return
        assert self.s.pending() == len(self.jobs) - len(self.ended)
        for node, state in self.s.nodes.items():
            assert state.inflight == {j for j, n in self.where.items() if n == node}
        assert set(self.s.nodes) == set(self.present)

    @invariant()
    def indexes_agree_with_a_scan(self):
        """The scheduler's indexes (free-CPU heap and total, nodes with room,
        nodes holding unstarted jobs) say what a scan of every node says."""
        if not hasattr(self, "s"):
            return
        s, nodes = self.s, self.s.nodes
        assert s._free_total == sum(state.free_cpus() for state in nodes.values())
        assert set(s._open) == {n for n, state in nodes.items() if state.room() > 0}
        assert set(s._waiting) == {n for n, state in nodes.items() if state.waiting() > 0}
        valid = {(node, -free) for free, seq, node in s._free_heap
                 if node in nodes and nodes[node].seq == seq and nodes[node].heap_free == -free}
        assert valid == {(n, state.free_cpus()) for n, state in nodes.items()
                         if state.free_cpus() > 0}

    def teardown(self):
        if not hasattr(self, "s"):
            return
        # Draining nodes go; give the unpinned queue a node, then finish
        # everything in flight.
        for node in sorted(self.draining):
            del self.present[node]
            for job in [j for j, n in self.where.items() if n == node]:
                del self.where[job]
            self.apply(self.s.remove_node(node))
        self.draining.clear()
        for node in sorted(n for n, cpus in self.present.items() if not cpus):
            self.present[node] = 1
            self.apply(self.s.set_cpus(node, 1))
        if not self.present:
            self.present["final"] = 1
            self.apply(self.s.add_node("final", 1))
        for _ in range(10 * len(self.jobs) + 10):
            if not self.where:
                break
            job = min(self.where)
            node = self.where.pop(job)
            self.ended[job] = "done"
            self.asked.pop(node, None)  # (a job ended there: it may be asked again)
            self.apply(self.s.done(node, job, duration=0.5))
        assert not self.where
        assert self.s.pending() == 0
        assert set(self.ended) == self.jobs, sorted(self.jobs - set(self.ended))


def job_not_running(machine, job):
    return job not in machine.where


TestSchedulerNeverLosesJobs = SchedulerNeverLosesJobs.TestCase


def test_adding_a_node_it_holds_again_keeps_its_jobs_in_flight():
    """add_node on a node already held (an extension admitting a node again,
    a recovered session's node admitted) changes its CPUs only: before, a
    new NodeState emptied its in-flight set, so its jobs were neither moved
    when it was lost nor counted against its limit."""
    s = Scheduler(max_retries=2)
    s.submit(range(4))
    assert sends(s.add_node("a", 1)) == {"a": [0, 1]}
    assert sends(s.add_node("a", 1)) == {}  # still full: nothing more goes there
    actions = s.remove_node("a")  # its two jobs go back to the queue
    assert not only(actions, Fail) and s.queued() == 4
    assert sends(s.add_node("b", 2)) == {"b": [0, 1, 2, 3]}
