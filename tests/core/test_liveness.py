"""Heartbeat timing, re-join backoff and attempt numbers: pure, no sleeping."""
import math

import pytest

from dpool import liveness
from dpool.core.scheduler import Scheduler, Send
from dpool.liveness import LOST, SEND, Backoff, Heartbeat, Settings


def test_heartbeat_sends_when_nothing_was_sent_for_an_interval():
    hb = Heartbeat(Settings(1.0, 10.0), now=0.0)
    assert hb.tick(0.5, rx=0, tx=0) is None
    assert hb.tick(1.0, rx=0, tx=0) == SEND
    assert hb.tick(1.5, rx=0, tx=0) is None  # just sent one
    assert hb.tick(2.0, rx=0, tx=0) == SEND


def test_other_traffic_replaces_heartbeats():
    hb = Heartbeat(Settings(1.0, 10.0), now=0.0)
    for t in range(1, 20):
        assert hb.tick(float(t) - 0.1, rx=t, tx=t) is None  # something sent each time


def test_silence_past_the_deadline_is_lost_and_any_byte_is_life():
    hb = Heartbeat(Settings(1.0, 10.0), now=0.0)
    assert hb.tick(9.0, rx=0, tx=0) == SEND
    assert hb.tick(9.9, rx=5, tx=0) is None  # a byte arrived (part of a long frame)
    assert hb.silence(12.0) == pytest.approx(2.1)
    assert hb.tick(19.9, rx=5, tx=1) is None
    assert hb.tick(20.0, rx=5, tx=1) == LOST


def test_lost_is_noticed_within_deadline_plus_one_tick():
    settings = Settings(0.2, 1.0)
    hb = Heartbeat(settings, now=0.0)
    t, verdict = 0.0, None
    while verdict != LOST:
        t += settings.tick
        verdict = hb.tick(t, rx=0, tx=int(t * 100))
    assert settings.deadline < t <= settings.deadline + settings.tick + 1e-9


@pytest.mark.parametrize("bad", [(0, 10), (1, 1.5), (-1, 5), (1, 1e9), ("a", 3), (1,), "x",
                                 "15", b"\x01\x0a"])
def test_bad_heartbeat_settings_are_refused_clearly(bad):
    """(A two-digit string or two bytes is not (interval, deadline): "15"
    must not be taken as (1, 5).)"""
    with pytest.raises(ValueError, match="heartbeat"):
        liveness.settings(bad)


def test_heartbeat_from_the_environment(monkeypatch):
    monkeypatch.setenv(liveness.HEARTBEAT_ENV, "0.5,3")
    assert liveness.settings() == Settings(0.5, 3.0)
    monkeypatch.setenv(liveness.HEARTBEAT_ENV, "0.5")
    with pytest.raises(ValueError, match="DPOOL_HEARTBEAT"):
        liveness.settings()
    monkeypatch.delenv(liveness.HEARTBEAT_ENV)
    assert liveness.settings() == Settings(liveness.HEARTBEAT_INTERVAL,
                                           liveness.HEARTBEAT_DEADLINE)


def test_peer_settings_are_clamped_not_trusted():
    assert liveness.peer_settings((0.0, 0.0)) == Settings(liveness.MIN_INTERVAL,
                                                          2 * liveness.MIN_INTERVAL)
    assert liveness.peer_settings("junk") == Settings()
    assert liveness.peer_settings((1e9, 1e9)).deadline == liveness.MAX_DEADLINE


@pytest.mark.parametrize("bad", [(math.nan, 10.0), (1.0, math.nan), (math.inf, 10.0),
                                 (1.0, math.inf), (-math.inf, 10.0), (math.nan, math.nan)])
def test_a_peers_non_finite_heartbeat_is_refused_clearly(bad):
    with pytest.raises(ValueError, match=r"heartbeat=.*finite"):
        liveness.peer_settings(bad)


def test_connect_timeout(monkeypatch):
    assert liveness.connect_timeout(2) == 2.0
    monkeypatch.setenv(liveness.CONNECT_TIMEOUT_ENV, "0.5")
    assert liveness.connect_timeout() == 0.5
    for bad in (0, -1, "soon"):
        with pytest.raises(ValueError, match="connect_timeout"):
            liveness.connect_timeout(bad)


def test_backoff_doubles_up_to_the_cap_and_resets():
    b = Backoff(first=0.25, cap=2.0)
    assert [b.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    b.reset()
    assert b.next() == 0.25


# ------------------------------------------------- attempts: exactly one delivery

def test_each_dispatch_has_a_new_attempt_number():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit([1])
    assert s.attempt(1) == 1
    assert [a for a in s.remove_node("a") if isinstance(a, Send)] == []
    s.add_node("b", 1)
    assert s.attempt(1) == 2


def test_a_late_result_from_a_lost_node_is_dropped():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit([1])
    s.remove_node("a")  # declared lost: job 1 goes back to the queue
    s.add_node("b", 1)
    # The lost node answers after all (healed partition, SIGCONT): not delivered.
    assert not s.current("a", 1, 1)
    s.done("a", 1, attempt=1)
    assert s.pending() == 1 and s.stale == 1
    # The current attempt's outcome is the one that counts.
    assert s.current("b", 1, 2)
    s.done("b", 1, attempt=2)
    assert s.pending() == 0 and s.stale == 1


def test_an_old_attempt_on_the_same_node_is_dropped():
    s = Scheduler()
    s.add_node("a", 1)
    s.submit([1])
    s.remove_node("a")
    s.add_node("a", 1)  # the same node back (re-join)
    assert s.attempt(1) == 2
    assert not s.current("a", 1, 1)
    s.done("a", 1, attempt=1)
    assert s.pending() == 1
    s.done("a", 1, attempt=2)
    assert s.pending() == 0
