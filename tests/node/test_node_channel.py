"""A client's channel on a dpool-node (node/channel.py), driven by a raw
client: the token in Ready, a Channel-first connection handed to an idle
worker, calls answered there with their attempts, the node's Recall and the
client's Release, and the faults: a forged or stale token, a lent worker
killed mid-call (ChannelLost on the main link), a client that dies with a
channel, a node stopping with a lent worker, two clients each with one."""
import asyncio
import os
import signal
import time

import psutil
import pytest

from dpool import protocol as P
from dpool import serialize
from dpool.core.client import client_hello
from dpool.transport import connect
from helpers import start_node
from tasks import getpid, identity, kill_worker, nap

pytestmark = pytest.mark.timeout(90)

# (a lambda goes by value: the node's workers can't import this module)
NAP_PID = lambda seconds: (time.sleep(seconds), os.getpid())[1]  # noqa: E731
FN = {identity: 1, nap: 2, kill_worker: 3, getpid: 4, NAP_PID: 5}


class Raw:
    """One connection's messages, in order, as records."""

    opened: list = []

    def __init__(self, conn):
        self.conn = conn
        Raw.opened.append(conn)
        self.got: asyncio.Queue = asyncio.Queue()
        conn.set_receiver(lambda frames: self.got.put_nowait(frames),
                          lambda exc=None: self.got.put_nowait(None))

    @classmethod
    async def open(cls, port, secret, ssl=None):
        return cls(await connect("127.0.0.1", port, secret=secret, hello=client_hello(),
                                 ssl=ssl, timeout=20))

    async def next(self, *skip, timeout=30):
        """The next message not of a type in ``skip`` (None: the end)."""
        while True:
            frames = await asyncio.wait_for(self.got.get(), timeout)
            if frames is None:
                return None
            msg = P.decode(frames[0])
            if type(msg) not in skip:
                return msg, frames

    def call(self, job_id, fn, *args, attempt=1, with_func=True):
        payload = serialize.dumps((args, {}))
        if with_func:
            self.conn.send([P.encode(P.Func, FN[fn]), serialize.dumps_function(fn)])
        self.conn.send([P.encode(P.Run, [P.run_item(job_id, FN[fn], len(payload), 0,
                                                    attempt)]), *payload])

    async def result(self, timeout=30):
        if not getattr(self, "ready", None):
            msg, frames = await self.next(P.Heartbeat, P.Started, timeout=timeout)
            assert type(msg) is P.Done, msg
            self.ready = list(P.results(msg, frames))
        record, payload = self.ready.pop(0)
        return record, serialize.loads(payload) if record.outcome == P.Outcome.OK else None


async def session(port, secret, ssl=None, **options):
    """A session (Ready's info) that ran one job, so a worker has its function."""
    main = await Raw.open(port, secret, ssl)
    main.conn.send([P.encode(P.Session, options)])
    msg, _ = await main.next()
    assert type(msg) is P.Ready, msg
    main.call(1, getpid)
    record, _ = await main.result()
    assert record.outcome == P.Outcome.OK
    return main, msg.info


async def channel(port, secret, token, serial=1):
    """A channel: (Raw, the first message on it)."""
    chan = await Raw.open(port, secret)
    chan.conn.send([P.encode(P.Channel, token, serial)])
    msg = await chan.next()
    return chan, msg and msg[0]


async def served_by(main, pid, first_job=30):
    """The pids that ran pairs of calls on ``main`` (NAP_PID, sent with the
    first) until the worker ``pid`` ran one, a bounded number of pairs: a
    worker back from a channel serves the node again at a moment the node
    doesn't order with these calls (the other worker may take both of a
    pair), and which worker takes which job is the node's choice."""
    seen, job = set(), first_job
    while pid not in seen and job < first_job + 2 * 50:
        main.call(job, NAP_PID, 0.1, with_func=job == first_job)
        main.call(job + 1, NAP_PID, 0.1, with_func=False)
        seen |= {(await main.result())[1], (await main.result())[1]}
        job += 2
    return seen


def run(coro):
    async def main():
        try:
            return await asyncio.wait_for(coro, 80)
        finally:
            for conn in Raw.opened:
                conn.abort()
                await conn.wait_closed()
            Raw.opened.clear()
    return asyncio.run(main())


def gone(pid, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_channel_serves_calls_then_goes_back_when_recalled(dpool_node, node_secret):
    async def main():
        port = dpool_node.port
        main, info = await session(port, node_secret)
        assert isinstance(info["channel"], str) and len(info["channel"]) >= 16
        chan, first = await channel(port, node_secret, info["channel"])
        assert type(first) is P.Ready, first
        pid = first.info["pid"]
        for i, attempt in [(10, 1), (11, 2)]:
            chan.call(i, getpid, attempt=attempt, with_func=i == 10)
            record, value = await chan.result()
            assert (record.job_id, record.attempt, value) == (i, attempt, pid)
        # a second channel while one is lent: the other worker has no function yet
        other, answer = await channel(port, node_secret, info["channel"])
        assert type(answer) is P.Busy
        other.conn.abort()
        # more jobs on the main link than free workers: the node wants its worker back
        for i in range(20, 23):
            main.call(i, nap, 0.2, i, with_func=i == 20)
        msg, _ = await main.next(P.Heartbeat, P.Started, P.Done)
        assert type(msg) is P.Recall
        chan.conn.send([P.encode(P.Release)])
        assert await chan.next() is None            # the worker closed it
        assert sorted([(await main.result())[0].job_id for _ in range(3)]) == [20, 21, 22]
        assert pid in await served_by(main, pid)     # it serves the node again
        main.conn.abort()
    run(main())


def test_a_forged_or_stale_token_is_refused(dpool_node, node_secret):
    async def main():
        port = dpool_node.port
        _, answer = await channel(port, node_secret, "x" * 22)
        assert type(answer) is P.Refused and "token" in answer.reason
        _, answer = await channel(port, node_secret, 12345)
        assert type(answer) is P.Refused
        main, info = await session(port, node_secret)
        main.conn.send([P.encode(P.Bye)])
        assert await main.next(P.Heartbeat, P.Done) is None
        _, answer = await channel(port, node_secret, info["channel"])
        assert type(answer) is P.Refused                       # its session ended
        main, info = await session(port, node_secret)
        main.conn.send([P.encode(P.Channel, info["channel"])])  # on the main link
        assert await main.next(P.Heartbeat) is None
        fresh, _ = await session(port, node_secret)             # the CPUs are whole again
        fresh.conn.abort()
    run(main())
    assert "names no session here" in dpool_node.stderr()


def test_a_lent_worker_killed_mid_call_is_told_on_the_main_link(dpool_node, node_secret):
    async def main():
        port = dpool_node.port
        main, info = await session(port, node_secret)
        chan, first = await channel(port, node_secret, info["channel"])
        chan.call(10, kill_worker, None)
        msg, _ = await main.next(P.Heartbeat)
        assert type(msg) is P.ChannelLost and "killed by SIGKILL" in msg.why, msg
        assert str(first.info["pid"]) in msg.why
        assert await chan.next() is None
        for i in (20, 21):    # the session goes on, with a new worker
            main.call(i, identity, i, with_func=i == 20)
        assert sorted([(await main.result())[1], (await main.result())[1]]) == [20, 21]
        main.conn.abort()
    run(main())


def test_a_client_dead_with_a_channel_frees_its_worker_and_cpus(dpool_node, node_secret):
    async def main():
        port = dpool_node.port
        main, info = await session(port, node_secret)
        chan, first = await channel(port, node_secret, info["channel"])
        chan.call(10, nap, 60)
        main.conn.abort()
        chan.conn.abort()
        return first.info["pid"]
    pid = run(main())
    assert gone(pid)

    async def again():
        fresh, info = await session(dpool_node.port, node_secret)
        assert info["cpus"] == 2
        fresh.conn.abort()
    run(again())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_node_stopping_with_a_lent_worker(tmp_path, node_secret, sig):
    node = start_node(tmp_path / "node", cpus=2, secret=node_secret, args=["--grace", "1"])
    try:
        async def main():
            main, info = await session(node.port, node_secret)
            chan, first = await channel(node.port, node_secret, info["channel"])
            chan.call(10, nap, 60)
            await asyncio.sleep(0.2)
            node.proc.send_signal(sig)
            assert await chan.next(timeout=20) is None
            end = await main.next(P.Heartbeat, P.Draining, P.Recall, P.GiveBack, timeout=20)
            assert end is None
            return first.info["pid"]
        pid = run(main())
        assert node.proc.wait(20) == 0
        assert gone(pid)
    finally:
        node.kill()


def test_two_clients_each_with_a_channel(dpool_node, node_secret):
    async def main():
        port = dpool_node.port
        mains, chans = [], []
        for _ in range(2):
            main, info = await session(port, node_secret, cpus=1)
            assert info["cpus"] == 1
            chan, first = await channel(port, node_secret, info["channel"])
            assert type(first) is P.Ready
            mains.append(main)
            chans.append((chan, first.info["pid"]))
        assert chans[0][1] != chans[1][1]
        for i, (chan, _) in enumerate(chans):
            chan.call(10, nap, 0.5, i)
        for i, (chan, _) in enumerate(chans):
            record, value = await chan.result()
            assert value == i
        for main in mains:
            main.conn.abort()
    run(main())


def test_a_message_sent_with_channel_is_not_lost(dpool_node, node_secret):
    """A Run the client writes right behind Channel (one record: the node
    opens and decodes both in one read) was dropped unseen: the worker took
    the stream past it and the call waited for good.  The channel is now
    refused (nothing of it ran), the session unharmed."""
    async def main():
        port = dpool_node.port
        main, info = await session(port, node_secret)
        chan = await Raw.open(port, node_secret)
        payload = serialize.dumps(((), {}))
        chan.conn.send_all([
            [P.encode(P.Channel, info["channel"])],
            [P.encode(P.Run, [P.run_item(10, FN[getpid], len(payload), 0, 1)]), *payload]])
        msg = await chan.next(timeout=20)
        assert msg is not None and type(msg[0]) is P.Refused, msg
        assert await chan.next() is None
        chan, first = await channel(port, node_secret, info["channel"])
        assert type(first) is P.Ready                # the token still opens one
        chan.call(11, getpid, with_func=False)
        record, value = await chan.result()
        assert (record.job_id, value) == (11, first.info["pid"])
        main.conn.abort()
    run(main())


@pytest.mark.parametrize("bad", [
    [P.encode(P.Func, 9)],                                   # no function frame
    [P.encode(P.Run, [(10, 4)])],                            # a Run item of the wrong shape
])
def test_a_malformed_message_on_a_channel_ends_it_not_its_worker(dpool_node, node_secret, bad):
    async def main():
        port = dpool_node.port
        main, info = await session(port, node_secret)
        chan, first = await channel(port, node_secret, info["channel"])
        chan.conn.send(bad)
        assert await chan.next() is None           # the channel ends
        # the worker serves the node again: no ChannelLost, the same pid
        assert first.info["pid"] in await served_by(main, first.info["pid"])
        main.conn.abort()
    run(main())


def test_a_tls_node_refuses_a_channel_it_can_never_hand_on(tls_node, pki):
    """A TLS connection's state can't go to a worker: Refused (for good),
    not Busy (which tells the client to try again at its next idle moment,
    a connection and handshake each time, never served)."""
    from dpool.transport.tcp import client_ssl_context

    async def main():
        ssl = client_ssl_context(cafile=pki["ca"], certfile=pki["client"])
        main, info = await session(tls_node.port, tls_node.secret, ssl)
        chan = await Raw.open(tls_node.port, tls_node.secret, ssl)
        chan.conn.send([P.encode(P.Channel, info["channel"])])
        msg = await chan.next()
        assert msg is not None and type(msg[0]) is P.Refused, msg
        main.conn.abort()
    run(main())


def test_a_session_with_a_job_environment_gets_a_channel(dpool_node, node_secret):
    """dispy's job environment (files, setup: every JobCluster) no longer
    keeps its workers from a channel once it is set up: the worker runs
    the channel's calls in the session's folder, where the file is."""
    async def main():
        port = dpool_node.port
        main, info = await session(port, node_secret)
        main.conn.send([P.encode(P.File, 7, "data.txt", 0o644), b"payload"])
        msg, _ = await main.next(P.Heartbeat)
        assert type(msg) is P.FileDone and msg.error is None, msg
        chan, answer = await channel(port, node_secret, info["channel"])
        assert type(answer) is P.Ready, answer
        chan.call(2, identity, "on the channel")
        record, value = await chan.result()
        assert record.outcome == P.Outcome.OK and value == "on the channel"
        main.conn.abort()
    run(main())


def test_a_forget_while_the_worker_is_lent_reaches_it(dpool_node, node_secret):
    """The client forgets a function while the worker that loaded it serves
    the channel: the node told only its other workers, and the lent one
    kept it for good (each lending kept more), the node still counting it
    loaded there: a job of the forgotten function ran on it."""
    async def main():
        port = dpool_node.port
        main, info = await session(port, node_secret, cpus=1)   # (getpid loaded)
        chan, first = await channel(port, node_secret, info["channel"])
        assert type(first) is P.Ready, first
        main.conn.send([P.encode(P.Forget, [FN[getpid]])])
        main.call(40, identity, 1)                  # (queued: the node recalls its worker)
        msg, _ = await main.next(P.Heartbeat, P.Started)
        assert type(msg) is P.Recall
        chan.conn.send([P.encode(P.Release)])
        assert await chan.next() is None
        assert (await main.result())[0].job_id == 40
        main.call(41, getpid, with_func=False)
        record, _ = await main.result()
        assert (record.job_id, record.outcome) == (41, P.Outcome.ERROR)
        main.conn.abort()
    run(main())


def test_a_late_halt_about_an_earlier_channel_stops_nothing(dpool_node, node_secret):
    """The client's Halt (a cancelled call on its channel) reaches the node
    after that channel was released and the next one lent: Halt named no
    channel, and the node stopped the next channel's worker, its call lost.
    It names its channel now (Channel's serial): a late one stops nothing;
    Recall and ChannelLost name theirs."""
    async def main():
        port = dpool_node.port
        main, info = await session(port, node_secret, cpus=1)
        chan, first = await channel(port, node_secret, info["channel"], serial=1)
        assert type(first) is P.Ready, first
        chan.conn.send([P.encode(P.Release)])
        assert await chan.next() is None
        for _ in range(100):   # (its worker's Returned: a moment the node doesn't order)
            chan, first = await channel(port, node_secret, info["channel"], serial=2)
            if type(first) is P.Ready:
                break
            assert type(first) is P.Busy, first
            await asyncio.sleep(0.05)
        assert type(first) is P.Ready, first
        chan.call(10, NAP_PID, 0.5)
        main.conn.send([P.encode(P.Halt, 1)])      # late: about the first channel
        record, value = await chan.result()
        assert (record.job_id, record.outcome, value) == (10, P.Outcome.OK, first.info["pid"])
        main.call(11, identity, 11)                # (queued: the node recalls its worker)
        msg, _ = await main.next(P.Heartbeat, P.Started)
        assert msg == P.Recall(2), msg
        chan.call(12, NAP_PID, 30, with_func=False)
        main.conn.send([P.encode(P.Halt, 2)])      # this channel's: its worker is stopped
        msg, _ = await main.next(P.Heartbeat, P.Started, P.Done)
        assert type(msg) is P.ChannelLost and msg.serial == 2, msg
        assert str(first.info["pid"]) in msg.why
        main.conn.abort()
    run(main())
