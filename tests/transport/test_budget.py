"""The node-wide receive budget: backpressure instead of allocation."""
import pytest

from dpool.transport.budget import ReceiveBudget


def test_within_the_limit_everyone_reads():
    budget = ReceiveBudget(100)
    assert budget.update("a", 40) and budget.update("b", 60)
    assert budget.used == 100


def test_past_the_limit_one_overdraft_goes_on_and_the_others_pause():
    budget, resumed = ReceiveBudget(100), []
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
    budget, resumed = ReceiveBudget(10), []
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
