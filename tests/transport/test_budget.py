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
