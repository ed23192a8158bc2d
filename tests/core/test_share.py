"""The fair-share policy (dpool.core.share): which client's job runs next.

Pure: no sockets, no clock.  A small simulated cluster (nodes with CPUs,
each CPU idle or running one job) drives it in the property tests.
"""
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from dpool.core.share import ClientCounts, FairShare, Pick, Removed


def run(policy, cpus, node=None):
    """Fill ``cpus`` free CPUs: the clients picked, in order."""
    picks = [policy.pick(node) for _ in range(cpus)]
    return [p.client for p in picks if p is not None]


# --------------------------------------------------------------- examples

def test_equal_shares_between_two_clients():
    fs = FairShare()
    fs.add_client("a")
    fs.add_client("b")
    fs.submit("a", range(100))
    fs.submit("b", range(100, 200))
    assert sorted(run(fs, 8)) == ["a"] * 4 + ["b"] * 4


def test_weights_split_the_cpus():
    fs = FairShare()
    fs.add_client("a", weight=3)
    fs.add_client("b", weight=1)
    fs.submit("a", range(100))
    fs.submit("b", range(100, 200))
    assert run(fs, 8).count("a") == 6
    assert fs.counts("a") == ClientCounts(3.0, 94, 6, 0)


def test_an_idle_clients_share_goes_to_the_others():
    fs = FairShare()
    for client in "abc":
        fs.add_client(client)
    fs.submit("a", range(10))
    assert run(fs, 8) == ["a"] * 8


def test_a_late_client_gets_the_cpus_that_free():
    """No preemption: the newcomer gets each CPU as it frees until even."""
    fs = FairShare()
    fs.add_client("a")
    fs.submit("a", range(100))
    running = [fs.pick().job for _ in range(4)]
    fs.add_client("b")
    fs.submit("b", range(100, 200))
    for job in running[:2]:
        assert fs.done(job) == "a"
        assert fs.pick().client == "b"
    fs.done(running[2])
    assert fs.pick().client in ("a", "b")  # even now: 2 and 2 before the pick
    assert sorted(c.running for c in fs.status().values()) == [2, 2]


def test_ties_go_to_the_job_submitted_first():
    fs = FairShare()
    fs.add_client("a")
    fs.add_client("b")
    fs.submit("b", [1])
    fs.submit("a", [2])
    assert fs.pick() == Pick("b", 1)


def test_fifo_mode_runs_jobs_in_submission_order_across_clients():
    fs = FairShare(fifo=True)
    fs.add_client("a", weight=100)
    fs.add_client("b")
    fs.submit("a", [1, 2])
    fs.submit("b", [3])
    fs.submit("a", [4])
    assert [fs.pick().job for _ in range(4)] == [1, 2, 3, 4]
    assert fs.pick() is None


def test_requeued_job_keeps_its_place():
    fs = FairShare(fifo=True)
    fs.add_client("a")
    fs.add_client("b")
    fs.submit("a", [1])
    fs.submit("b", [2])
    assert fs.pick().job == 1
    assert fs.requeue(1) and not fs.requeue(1)
    assert fs.pick().job == 1
    assert fs.counts("a").running == 1 and fs.counts("a").done == 0


def test_remove_client_returns_its_queued_and_running_jobs():
    fs = FairShare()
    fs.add_client("a")
    fs.add_client("b")
    fs.submit("a", [1, 2, 3, 4])
    fs.submit("b", [5])
    assert run(fs, 3) == ["a", "b", "a"]
    fs.cancel(4)
    assert fs.remove_client("a") == Removed(queued=[3], running=[1, 2])
    assert fs.done(1) is None  # late news about a removed client's job
    assert fs.remove_client("a") == Removed([], [])
    assert fs.status() == {"b": ClientCounts(1.0, 0, 1, 0)}
    assert fs.pick() is None


def test_cancel_only_drops_queued_jobs():
    fs = FairShare()
    fs.add_client("a")
    fs.submit("a", [1, 2, 3])
    assert fs.pick().job == 1
    assert not fs.cancel(1)  # running: ended by done() when the node says so
    assert fs.cancel(2) and not fs.cancel(2)
    assert fs.pick().job == 3
    assert fs.queued() == 0 and fs.running() == 2


def test_resubmitting_a_cancelled_id_queues_it_once():
    fs = FairShare()
    fs.add_client("a")
    fs.submit("a", [1, 2])
    fs.cancel(1)
    fs.submit("a", [1])
    assert [fs.pick().job for _ in range(2)] == [2, 1]
    assert fs.pick() is None


def test_clients_limited_to_nodes():
    fs = FairShare()
    fs.add_client("a", nodes=["n1"])
    fs.add_client("b")
    fs.submit("a", [1, 2])
    assert fs.pick("n2") is None and not fs.has_work("n2") and fs.has_work("n1")
    fs.submit("b", [3])
    assert fs.pick("n2") == Pick("b", 3)
    assert fs.pick("n1") == Pick("a", 1)


def test_bad_input_is_refused_and_changes_nothing():
    fs = FairShare()
    for weight in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="weight"):
            fs.add_client("a", weight=weight)
    fs.add_client("a")
    with pytest.raises(KeyError):
        fs.submit("nobody", [1])
    fs.submit("a", [1])
    with pytest.raises(ValueError, match="unique"):
        fs.submit("a", [2, 1])
    with pytest.raises(ValueError, match="unique"):
        fs.submit("a", [3, 3])
    assert fs.counts("a").queued == 1 and fs.client_of(2) is None
    assert fs.done(99) is None and not fs.requeue(99) and not fs.cancel(99)


def test_a_weight_that_is_not_a_number_gets_a_clear_error_and_changes_nothing():
    """Review of issue 11: a weight of the wrong type (a string from a
    config file, None) raised Python's bare "'>' not supported between
    instances of 'str' and 'int'", naming neither the weight nor the value."""
    fs = FairShare()
    for weight in ("2", None, [1], 1j):
        with pytest.raises(TypeError, match=r"weight must be a number > 0, not "):
            fs.add_client("a", weight=weight)
    assert "a" not in fs.status()
    fs.add_client("a", weight=2)
    for weight in ("3", None):
        with pytest.raises(TypeError, match="weight"):
            fs.set_weight("a", weight)
        with pytest.raises(TypeError, match="weight"):
            fs.add_client("a", weight=weight, nodes=["n1"])
    assert fs.counts("a").weight == 2.0 and fs.has_work("n2") is False


# ------------------------------------------------------ properties (hypothesis)

NODES = {"n1": 2, "n2": 3, "n3": 1}
CLIENTS = ["a", "b", "c", "d"]


class Cluster(RuleBasedStateMachine):
    """Clients come and go, submit and finish jobs, nodes join and leave,
    and after every step each idle CPU asks the policy for a job.

    Checked: no CPU idles while a job it may run is queued; every pick goes
    to the client furthest below its share; once every job that ran before
    the last change of who has work has ended, shares are within one job of
    even (``running_i / w_i <= (running_j + 1) / w_j`` for backlogged ``j``);
    in FIFO mode jobs start in submission order.
    """

    def __init__(self):
        super().__init__()
        self.policy: FairShare
        self.cpus = {}  # node -> [job or None per CPU]
        self.next_job = 0
        self.old = set()  # jobs running since before the last change
        self.order = []  # FIFO mode: submission order of jobs not yet started
        self.limited = False

    @initialize(fifo=st.booleans(), weights=st.lists(st.sampled_from([1, 1, 2, 3, 0.5]),
                                                    min_size=2, max_size=3))
    def start(self, fifo, weights):
        self.policy = FairShare(fifo=fifo)
        self.cpus = {node: [None] * n for node, n in NODES.items()}
        for client, weight in zip(CLIENTS, weights):
            self.policy.add_client(client, weight)

    # ------------------------------------------------------------ events

    @rule(client=st.sampled_from(CLIENTS), weight=st.sampled_from([1, 1, 2, 3, 0.5]),
          limit=st.sampled_from([None, None, None, ("n1",), ("n2", "n3")]))
    def add_client(self, client, weight, limit):
        if client in self.policy.clients:
            return
        self.policy.add_client(client, weight, nodes=limit)
        self.limited |= limit is not None
        self._changed()

    @rule(client=st.sampled_from(CLIENTS))
    def remove_client(self, client):
        known = client in self.policy.clients
        held = {j for j in self._all_jobs() if self.policy.client_of(j) == client}
        removed = self.policy.remove_client(client)
        assert known or removed == Removed([], [])
        assert set(removed.queued) | set(removed.running) == held
        for cpus in self.cpus.values():  # the driver kills its running jobs
            for i, job in enumerate(cpus):
                if job in removed.running:
                    cpus[i] = None
        self.order = [j for j in self.order if j not in removed.queued]
        self._changed()

    @rule(data=st.data(), n=st.integers(1, 20))
    @precondition(lambda self: self.policy.clients)
    def submit(self, data, n):
        self._submit(data.draw(st.sampled_from(sorted(self.policy.clients))), n)

    @rule(n=st.integers(5, 20))
    def everyone_submits(self, n):
        for client in sorted(self.policy.clients):
            self._submit(client, n)

    @rule(data=st.data(), count=st.integers(1, 6))
    @precondition(lambda self: self._running())
    def complete(self, data, count):
        """Some jobs end, one after another; each freed CPU is refilled."""
        for _ in range(count):
            if self._running():
                self._end(data.draw(st.sampled_from(self._running())))
                self._fill()

    @rule(data=st.data())
    @precondition(lambda self: self.old)
    def settle(self, data):
        """Every job that ran before the last change ends, in any order."""
        old = [(node, i) for node, i in self._running() if self.cpus[node][i] in self.old]
        for node, i in data.draw(st.permutations(old)):
            self._end((node, i))
            self._fill()

    @rule(node=st.sampled_from(sorted(NODES)))
    def node_lost(self, node):
        """Its jobs come back unstarted; it comes back empty at once (so the
        CPU count stays fixed and shares stay comparable)."""
        for i, job in enumerate(self.cpus[node]):
            if job is not None:
                assert self.policy.requeue(job)
                self.cpus[node][i] = None
                self.order.append(job)
        self.order.sort()  # job ids are in submission order
        self._changed()

    @rule(data=st.data())
    @precondition(lambda self: self.policy.queued())
    def cancel(self, data):
        job = data.draw(st.sampled_from(self.order)) if self.order else None
        if job is not None and self.policy.cancel(job):
            self.order.remove(job)
            self._changed()

    # ------------------------------------------------- the driver's loop

    def _submit(self, client, n):
        jobs = list(range(self.next_job, self.next_job + n))
        self.next_job += n
        idle = not self.policy.counts(client).queued
        self.policy.submit(client, jobs)
        self.order.extend(jobs)
        if idle:  # one more client with work: it catches up as jobs end
            self._changed()

    def _end(self, where):
        node, i = where
        job = self.cpus[node][i]
        self.cpus[node][i] = None
        assert self.policy.done(job) is not None
        self.old.discard(job)

    def _fill(self):
        for node, cpus in self.cpus.items():
            for i, job in enumerate(cpus):
                if job is None:
                    self._pick(node, i)

    def _pick(self, node, i):
        policy = self.policy
        before = {client: policy.counts(client) for client in policy.clients}
        got = policy.pick(node)
        if got is None:
            assert not policy.has_work(node)
            return
        allowed = [c for c in before if before[c].queued and self._allows(c, node)]
        assert got.client in allowed
        if policy.fifo:
            first = next(j for j in self.order if self._allows(policy.client_of(j), node))
            assert got.job == first
        else:
            share = {c: (before[c].running + 1) / before[c].weight for c in allowed}
            assert share[got.client] == min(share.values())
        self.order.remove(got.job)
        self.cpus[node][i] = got.job

    def _allows(self, client, node):
        limit = self.policy.clients[client].nodes
        return limit is None or node in limit

    # ---------------------------------------------------------- checks

    @invariant()
    def no_cpu_idles_while_work_is_queued(self):
        self._fill()
        for node, cpus in self.cpus.items():
            if None in cpus:
                assert not self.policy.has_work(node)

    @invariant()
    def counts_add_up(self):
        status = self.policy.status()
        assert sum(c.running for c in status.values()) == len(self._running()) \
            == self.policy.running()
        assert sum(c.queued for c in status.values()) == self.policy.queued() == len(self.order)

    @invariant()
    def shares_within_one_job_once_settled(self):
        if self.policy.fifo or self.limited or self.old:
            return
        status = self.policy.status()
        for i, ci in status.items():
            for j, cj in status.items():
                if cj.queued:
                    assert ci.running / ci.weight <= (cj.running + 1) / cj.weight + 1e-9, \
                        (i, ci, j, cj)

    # ---------------------------------------------------------- helpers

    def _changed(self):
        """Who has work (or how many CPUs) may have changed: shares are
        checked again once the jobs running now have ended."""
        self._fill()
        self.old = {job for cpus in self.cpus.values() for job in cpus if job is not None}

    def _running(self):
        return [(node, i) for node, cpus in self.cpus.items()
                for i, job in enumerate(cpus) if job is not None]

    def _all_jobs(self):
        return set(self.order) | {job for cpus in self.cpus.values() for job in cpus
                                  if job is not None}


Cluster.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
TestCluster = Cluster.TestCase
