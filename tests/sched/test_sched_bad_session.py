"""A client's Session with bad option values is refused with a clear
error, and costs the scheduler and its other clients nothing."""
import asyncio
import contextlib

import pytest

from dpool import protocol as P
from dpool.core.client import Client, client_hello
from dpool.transport import connect
from helpers_sched import SECRET
from tasks import identity

pytestmark = pytest.mark.timeout(120)

BAD_OPTIONS = [{"cpus": float("inf")}, {"cpus": float("nan")}, {"cpus": "many"},
               {"cpus": -2}, {"cpus": [1]}, {"weight": float("inf")},
               {"weight": float("nan")}, {"weight": 0}, {"weight": -1},
               {"heartbeat": (float("nan"), 10.0)}, {"heartbeat": (1.0, float("inf"))}]


async def first_reply(address, options):
    """What the scheduler answers a raw Session(options): its first
    message decoded, or None if it closed the connection without one."""
    conn = await connect(*address, secret=SECRET, hello=client_hello(), timeout=10)
    got: asyncio.Queue = asyncio.Queue()
    conn.set_receiver(got.put_nowait, lambda exc=None: got.put_nowait(None))
    conn.send([P.encode(P.Session, options)])
    try:
        frames = await asyncio.wait_for(got.get(), 10)
        reply = frames and P.decode(frames[0])
        closed = reply is None or await asyncio.wait_for(got.get(), 10) is None
        return reply, closed
    finally:
        conn.abort()


@contextlib.contextmanager
def another_client_goes_on(scheduler):
    """Around the body: another client's jobs run before and after it, the
    scheduler still answers a good Session, and it is still running."""
    client = Client([scheduler.address], secret=SECRET)
    client.start()
    try:
        assert client.submit(identity, (1,)).future.result(30) == 1
        yield
        assert client.submit(identity, (7,)).future.result(30) == 7  # the other goes on
        reply, _ = asyncio.run(first_reply(scheduler.address, {}))  # and it still serves
        assert type(reply) is P.Ready
    finally:
        client.close()
    assert scheduler.proc.poll() is None


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=repr)
def test_a_session_with_a_bad_option_is_refused_and_loses_nothing(scheduler, three_nodes,
                                                                 options):
    with another_client_goes_on(scheduler):
        reply, closed = asyncio.run(first_reply(scheduler.address, options))
        assert type(reply) is P.Refused, f"no clear error, got {reply!r}"
        assert next(iter(options)) in reply.reason
        assert closed


async def garbage_after_session(address, messages):
    """Open a session, then send ``messages``: True once the scheduler
    closed the connection."""
    conn = await connect(*address, secret=SECRET, hello=client_hello(), timeout=10)
    got: asyncio.Queue = asyncio.Queue()
    conn.set_receiver(got.put_nowait, lambda exc=None: got.put_nowait(None))
    conn.send([P.encode(P.Session, {})])
    try:
        assert type(P.decode((await asyncio.wait_for(got.get(), 10))[0])) is P.Ready
        conn.send(messages)
        while await asyncio.wait_for(got.get(), 10) is not None:
            pass
        return True
    finally:
        conn.abort()


@pytest.mark.parametrize("message", [P.encode(P.Run, 12345), P.encode(P.Run, [("x",)]),
                                     P.encode(P.Cancel, 7), P.encode(P.Forget, 7),
                                     P.encode(P.Func, ["x"])], ids=repr)
def test_a_message_a_handler_fails_on_ends_that_client_only(scheduler, three_nodes, message):
    with another_client_goes_on(scheduler):
        assert asyncio.run(garbage_after_session(scheduler.address, [message]))
