"""The node-wide receive budget: backpressure instead of allocation."""
import pytest

from dpool.transport.budget import ReceiveBudget


def test_within_the_limit_everyone_reads():
    budget = ReceiveBudget(100)
    assert budget.update("a", 40) and budget.update("b", 60)
    assert budget.used == 100


def test_past_the_limit_one_overdraft_goes_on_and_the_others_pause():
    budget, resumed = ReceiveBudget(100, allowance=0), []
    assert budget.update("a", 90)
    assert budget.update("b", 20)             # over: b takes the overdraft
    assert budget.update("b", 500)            # a message bigger than the budget gets through
    assert not budget.update("a", 99)         # a must stop reading
    budget.pause("a", lambda: resumed.append("a"))
    assert not budget.update("c", 5)
    budget.pause("c", lambda: resumed.append("c"))
    budget.update("b", 0)                     # b's message is complete
    assert resumed == ["a"]                   # a gets the overdraft (104 > 100)
    budget.update("a", 0)
    assert resumed == ["a", "c"] and budget.used == 5


def test_forget_releases_and_unpauses():
    budget, resumed = ReceiveBudget(10, allowance=0), []
    budget.update("a", 50)
    assert not budget.update("b", 5)
    budget.pause("b", lambda: resumed.append("b"))
    budget.forget("a")
    assert resumed == ["b"] and budget.used == 5
    budget.forget("b")
    assert budget.used == 0


def test_budget_must_be_positive():
    with pytest.raises(ValueError):
        ReceiveBudget(0)


def test_a_connection_within_its_allowance_reads_on_past_the_limit():
    """One peer holding the overdraft (a huge message sent slowly) does not
    stop the others' small messages (their heartbeats among them)."""
    budget, resumed = ReceiveBudget(100, allowance=10), []
    assert budget.update("a", 150)            # a holds the overdraft
    assert budget.update("b", 10)             # within b's allowance: reads on
    assert not budget.update("b", 11)         # past it: b waits for the overdraft
    budget.pause("b", lambda: resumed.append("b"))
    budget.update("a", 0)
    assert resumed == ["b"]


def test_the_allowances_together_stay_within_the_limit():
    """Many peers each within its allowance (N clients x 4 MiB) do not
    together hold more than the limit and one overdraft: past it they wait
    as any other connection, and read on as the others' messages end."""
    budget, resumed = ReceiveBudget(100, allowance=10), []
    go_on = [conn for conn in range(30) if budget.update(conn, 10)]
    assert len(go_on) * 10 <= 100 + 10 + 10  # limit + one allowance + the overdraft
    waiting = [conn for conn in range(30) if conn not in go_on]
    for conn in waiting:
        budget.pause(conn, lambda conn=conn: resumed.append(conn))
    for conn in go_on:
        budget.update(conn, 0)  # their messages are complete
    assert resumed and set(resumed) <= set(waiting)


def test_the_allowance_resumes_a_small_message_behind_a_slow_overdraft():
    """A connection paused while the others were past the limit reads on,
    within its allowance, once they are back under it, though one peer still
    holds the overdraft."""
    budget, resumed = ReceiveBudget(100, allowance=10), []
    assert budget.update("big", 150)           # the overdraft, sent slowly
    paused = [conn for conn in range(12) if not budget.update(conn, 10)]
    assert paused == [11]
    for conn in paused:
        budget.pause(conn, lambda conn=conn: resumed.append(conn))
    for conn in range(12):
        if conn not in paused:
            budget.update(conn, 0)
    assert set(resumed) == set(paused)         # "big" still holds the overdraft
