"""_HeldInterrupts (dpool/core/direct.py, used by the direct paths local and
over TCP): a SIGINT landing inside the block reaches the handler at its end,
the handler in place is the one called and is put back as it was, and
nothing changes outside the main thread or the main interpreter."""
import signal
import threading

import pytest

from dpool.core import direct
from dpool.core.direct import _HeldInterrupts


def test_a_sigint_inside_is_raised_at_the_end():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _HeldInterrupts():
            signal.raise_signal(signal.SIGINT)
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_users_handler_is_called_once_after_the_block_and_kept():
    calls, order = [], []

    def handler(signum, frame):
        calls.append(signum)
        order.append("handler")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with _HeldInterrupts():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # (Python counts one pending)
            order.append("block")
        assert calls == [signal.SIGINT]
        assert order == ["block", "handler"]
        assert signal.getsignal(signal.SIGINT) is handler
        with _HeldInterrupts():
            order.append("quiet block")
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_nothing_held_without_a_sigint():
    with _HeldInterrupts() as held:
        assert callable(signal.getsignal(signal.SIGINT))
    assert held.caught is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_error_in_the_block_puts_the_handler_back():
    with pytest.raises(ZeroDivisionError):
        with _HeldInterrupts():
            raise ZeroDivisionError
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _HeldInterrupts() as held:
            signal.raise_signal(signal.SIGINT)
        assert held.previous is None and held.caught is None
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_other_threads_change_nothing():
    seen = []

    def other():
        with _HeldInterrupts() as held:
            seen.append((held.previous, signal.getsignal(signal.SIGINT)))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(30)
    assert seen == [(None, signal.default_int_handler)]


def test_a_subinterpreter_changes_nothing():
    interpreters = pytest.importorskip("_xxsubinterpreters")
    iid = interpreters.create()
    try:
        interpreters.run_string(iid, (
            "import signal\n"
            "from dpool.core.direct import _HeldInterrupts\n"
            "with _HeldInterrupts() as held:\n"
            "    pass\n"
            "assert held.previous is None, held.previous\n"))
    finally:
        interpreters.destroy(iid)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class Raises:
    """A program's own handler that raises ``error`` (SIGTERM -> SystemExit,
    SIGALRM -> a timeout of its own), installed for the test."""

    def __init__(self, signum, error):
        self.signum, self.error, self.calls = signum, error, []

    def __call__(self, signum, frame):
        self.calls.append(signum)
        raise self.error

    def __enter__(self):
        self.previous = signal.signal(self.signum, self)
        return self

    def __exit__(self, *exc):
        signal.signal(self.signum, self.previous)


class Timeout(Exception):
    pass


@pytest.mark.parametrize("signum, error", [(signal.SIGTERM, SystemExit(143)),
                                           (signal.SIGALRM, Timeout())])
def test_a_raising_handler_of_sigterm_or_sigalrm_runs_at_the_end(signum, error):
    done = []
    with Raises(signum, error) as handler:
        with pytest.raises(type(error)):
            with _HeldInterrupts():
                signal.raise_signal(signum)
                done.append("rest of the block")
        assert done == ["rest of the block"] and handler.calls == [signum]
        assert signal.getsignal(signum) is handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_every_signal_held_is_delivered_in_order_even_if_one_raises():
    with Raises(signal.SIGALRM, Timeout()) as alarm, Raises(signal.SIGTERM, SystemExit(1)):
        with pytest.raises(KeyboardInterrupt) as info:
            with _HeldInterrupts():
                signal.raise_signal(signal.SIGALRM)
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGALRM)  # (once more: one call, as Python's)
        assert alarm.calls == [signal.SIGALRM]
        assert isinstance(info.value.__context__, Timeout)  # (the first, chained)
        assert signal.getsignal(signal.SIGALRM) is alarm


def test_sigterm_and_sigalrm_without_a_python_handler_are_not_touched():
    alarm = signal.signal(signal.SIGALRM, signal.SIG_DFL)  # (pytest-timeout's, if any)
    try:
        with _HeldInterrupts() as held:
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
            assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
        assert held.others is None
    finally:
        signal.signal(signal.SIGALRM, alarm)


def _arrives_before_swap(monkeypatch, swapped, arrival, putting_back):
    """``arrival`` comes just before ``swapped``'s handler is swapped (as the
    block begins, or as it ends: ``putting_back``).  signal.signal runs the
    handlers of pending signals before it swaps: one that raises leaves the
    swap undone (raise_signal runs them at once, as that check would)."""
    real = direct._setsignal
    pending = [arrival]

    def setsignal(signum, handler):
        ours = isinstance(getattr(handler, "__self__", None), _HeldInterrupts)
        if signum == swapped and pending and ours != putting_back:
            signal.raise_signal(pending.pop())
        return real(signum, handler)

    monkeypatch.setattr(direct, "_setsignal", setsignal)


def test_a_signal_raising_as_the_block_begins_puts_every_handler_back(monkeypatch):
    _arrives_before_swap(monkeypatch, signal.SIGALRM, signal.SIGALRM, putting_back=False)
    with Raises(signal.SIGALRM, Timeout()) as alarm, Raises(signal.SIGTERM, SystemExit(1)) as term:
        with pytest.raises(Timeout):
            with _HeldInterrupts():
                pytest.fail("the block ran")
        assert alarm.calls == [signal.SIGALRM]
        assert signal.getsignal(signal.SIGTERM) is term
        assert signal.getsignal(signal.SIGALRM) is alarm
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_raising_as_the_block_ends_loses_no_handler_and_no_held_signal(monkeypatch):
    _arrives_before_swap(monkeypatch, signal.SIGTERM, signal.SIGINT, putting_back=True)
    with Raises(signal.SIGALRM, Timeout()) as alarm, Raises(signal.SIGTERM, SystemExit(1)) as term:
        with pytest.raises(BaseException) as info:
            with _HeldInterrupts():
                signal.raise_signal(signal.SIGALRM)
        assert {type(info.value), type(info.value.__context__)} == {KeyboardInterrupt, Timeout}
        assert alarm.calls == [signal.SIGALRM] and term.calls == []
        assert signal.getsignal(signal.SIGTERM) is term
        assert signal.getsignal(signal.SIGALRM) is alarm
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _replace(signum):
    """A handler set inside the block (by the program: another signal's
    handler, a finalizer): a new one, which the block's end must keep."""
    def new(signum, frame):
        new.calls.append(signum)
    new.calls = []
    signal.signal(signum, new)
    return new


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGALRM])
def test_a_handler_set_inside_the_block_is_kept(signum):
    with Raises(signal.SIGALRM, Timeout()), Raises(signal.SIGINT, KeyboardInterrupt()):
        with _HeldInterrupts():
            new = _replace(signum)
        assert signal.getsignal(signum) is new
        signal.raise_signal(signum)
        assert new.calls == [signum]


def test_a_signal_held_before_its_handler_was_replaced_goes_to_the_one_then_in_place():
    with Raises(signal.SIGALRM, Timeout()) as alarm:
        with pytest.raises(Timeout):
            with _HeldInterrupts():
                signal.raise_signal(signal.SIGALRM)
                new = _replace(signal.SIGALRM)
        assert alarm.calls == [signal.SIGALRM] and new.calls == []
        assert signal.getsignal(signal.SIGALRM) is new
