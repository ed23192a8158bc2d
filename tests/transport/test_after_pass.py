"""streams.after_pass: work batched over a loop pass (a node's dispatch and
flush, a scheduler's merged results) runs in the pass's own wake-up on
dpool-node's loop (streams.new_event_loop), not one pass later as
``call_soon`` would (issue 11: a loop pass less per job); on any other loop
it is ``call_soon``."""
import asyncio
import socket

import pytest

from dpool.transport.streams import after_pass, new_event_loop

pytestmark = pytest.mark.timeout(30)


def run(main, factory):
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def passes(loop):
    """How many times the loop has waited (its selector's select calls)."""
    return loop._selector.epoch


def test_on_the_counting_loop_it_runs_before_the_loop_waits_again_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        ran, soon = [], []
        start = passes(loop)
        after_pass(lambda: ran.append(("first", passes(loop))))
        after_pass(lambda: ran.append(("second", passes(loop))))
        loop.call_soon(lambda: soon.append(passes(loop)))
        assert ran == []  # (not during the pass that gave it)
        await asyncio.sleep(0)
        # Both ran as the next wait began, before the call_soon callback
        # of the same pass, in the order given.
        assert ran == [("first", start + 1), ("second", start + 1)]
        assert soon == [start + 1]
    run(main, new_event_loop)


def test_an_error_is_reported_as_a_callbacks_and_the_loop_goes_on():
    async def main():
        loop = asyncio.get_running_loop()
        reported, ran = [], []
        loop.set_exception_handler(lambda _, context: reported.append(context["exception"]))

        def fail():
            raise ValueError("boom")
        after_pass(fail)
        after_pass(lambda: ran.append(1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert [type(e) for e in reported] == [ValueError] and ran == [1]
    run(main, new_event_loop)


def test_what_it_schedules_does_not_wait_for_io():
    """A callback run after a pass that schedules more (call_soon, a timer,
    another after_pass) has it run without waiting for I/O or a later
    timer: the loop's wait was computed before the callback ran."""
    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def chain():
            loop.call_later(0.01, lambda: after_pass(lambda: done.set_result(True)))
        after_pass(chain)
        # Nothing else is ready and no timer is due soon: without the
        # shortened wait the loop would sleep until wait_for's timeout.
        far = loop.call_later(20, lambda: None)
        try:
            await asyncio.wait_for(done, 5)
        finally:
            far.cancel()
    run(main, new_event_loop)  # (without the shortened wait: TimeoutError)


def test_on_another_loop_it_is_call_soon():
    async def main():
        loop = asyncio.get_running_loop()
        order = []
        after_pass(lambda: order.append("after"))
        loop.call_soon(lambda: order.append("soon"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == ["after", "soon"]
    run(main, None)


def test_a_long_timer_it_schedules_does_not_end_the_loop():
    """A callback run after a pass that sets a timer far ahead (a node's
    --keep-results of a month: a detached session's expiry), with no other
    timer: the loop waits as asyncio's would (at most a day at a time), it
    does not die of the wait's OverflowError (epoll takes ~24.8 days at most)."""
    async def main():
        loop = asyncio.get_running_loop()
        r, w = socket.socketpair()
        got = loop.create_future()
        loop.add_reader(r, lambda: got.done() or got.set_result(r.recv(1)))

        def far():
            loop.call_later(30 * 86400, lambda: None)
            w.send(b"x")  # (woken by I/O: nothing ready, no timer before this one)
        try:
            after_pass(far)
            assert await got == b"x"
        finally:
            loop.remove_reader(r)
            r.close()
            w.close()
    run(main, new_event_loop)


def test_after_a_keyboardinterrupt_the_rest_run_when_the_loop_runs_again():
    """A KeyboardInterrupt (or SystemExit) raised by one callback leaves the
    loop, as a handle's does, and the callbacks after it run when the loop
    runs again, as asyncio keeps its ready handles: not dropped (a node's
    flush or a stream's corked bytes never sent, their flag left set)."""
    loop = new_event_loop()
    ran = []

    def interrupt():
        raise KeyboardInterrupt

    async def give():
        after_pass(interrupt)
        after_pass(lambda: ran.append("rest"))

    async def nothing():
        return None
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(give())
        assert ran == []
        loop.run_until_complete(nothing())
        assert ran == ["rest"]
    finally:
        loop.close()


def test_a_stop_it_calls_ends_the_loop_without_waiting():
    """loop.stop() from a callback run after a pass: the loop ends after
    this pass, as a stop() from a handle does, not after a wait for I/O or
    the next timer (here a guard 10 s ahead, which must not be what ends it)."""
    loop = new_event_loop()
    waited = []
    try:
        loop.call_soon(after_pass, loop.stop)
        guard = loop.call_later(10, lambda: (waited.append(True), loop.stop()))
        loop.run_forever()
        guard.cancel()
        assert waited == []
    finally:
        loop.close()
