"""A lone call via a dpool-node (issue 13): the faults a design that takes
the node off a lone call's path (a worker answering the client itself, see
docs/performance.md "Round trips via a node: taking the node off the path")
opens a window for.  Each holds on today's path (the calling thread talks
to the node, tcpline.py) and must hold on any faster one: a call longer
than the heartbeat deadline keeps the session, a client killed mid-call
frees its worker and CPUs, work arriving while a lone call runs runs beside
it, and a worker killed mid-call fails that call as a job of the node.
Each runs with the lone call on the node's channel (core/channel.py: a
worker answering the client itself), checked in each test.
(Ctrl-C at every point of a lone call: test_direct_tcp_robust.py and the
"tcp" cases of test_direct_calls.py; on the channel: test_channel_calls.py.)"""
import contextlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import dpool
from dpool.core.direct import DirectFuture
from dpool.errors import WorkerLost
from dpool.futures import Executor
import tasks
from helpers import node_env, poll_for, start_node
from test_channel_calls import channeled, on_channel
from test_direct_calls import QUIET, SECRET, gate_call, held_pids, line_of, opened


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = start_node(tmp_path_factory.mktemp("node"), cpus=2, secret=SECRET)
    yield node
    node.terminate()


def gone(pid):
    """True once process ``pid`` no longer exists (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("api", ["executor", "pool"])
def test_a_lone_call_longer_than_the_heartbeat_deadline_keeps_the_session(node, tmp_path, api):
    """A lone call that runs past the heartbeat deadline (twice over) ends
    with its value, on the same connection and in the same worker: neither
    side took the silence on the call's path for a lost peer.  (A deadline
    of 2 s: a shorter one is missed by a loaded machine's scheduler alone.)"""
    gate = str(tmp_path / "gate")
    deadline = 2.0
    heartbeat = (0.25, deadline)
    if api == "executor":
        with Executor(nodes=[node.address], secret=SECRET, heartbeat=heartbeat) as ex:
            client = ex._client
            ex.submit(tasks.identity, 0).result(30)
            conn = line_of(client).link.conn
            future = on_channel(ex, gate_call, gate, "long")
            pid = poll_for(lambda: held_pids(gate), message="the call to start")[0]
            end = time.monotonic() + 2 * deadline
            poll_for(lambda: time.monotonic() > end, timeout=30, message="two deadlines")
            opened(gate)
            assert future.result(30) == "long"
            assert line_of(client).link.conn is conn and not conn.closed
            assert not gone(pid)  # (a session ended kills its workers)
        return
    with dpool.Pool(nodes=[node.address], secret=SECRET, heartbeat=heartbeat) as pool:
        client = pool._client
        assert pool.apply(tasks.identity, (0,)) == 0
        conn = line_of(client).link.conn
        line = channeled(client)
        result = pool.apply_async(gate_call, (gate, "long"))
        assert type(result._future) is DirectFuture and line.on_chan
        pid = poll_for(lambda: held_pids(gate), message="the call to start")[0]
        end = time.monotonic() + 2 * deadline
        poll_for(lambda: time.monotonic() > end, timeout=30, message="two deadlines")
        opened(gate)
        assert result.get(30) == "long"
        assert line_of(client).link.conn is conn and not conn.closed
        assert not gone(pid)


CLIENT = textwrap.dedent("""
    import sys
    import time
    import tasks
    from dpool.futures import Executor
    host, port, log, gate = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ex = Executor(nodes=[(host, port)], secret={secret!r}, heartbeat={heartbeat!r})
    line = ex._client._direct
    for _ in range(600):  # (the call held below goes on the node's channel)
        ex.submit(tasks.identity, 0).result(60)
        if line.on_chan and line.free():
            break
        time.sleep(0.05)
    else:
        sys.exit("no channel")
    ex.submit(tasks.count_and_hold, log, gate, "never").result(120)
""")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_client_killed_mid_lone_call_frees_its_worker_and_cpus(node, tmp_path, how):
    """The client process dies while its lone call runs: the node kills the
    worker running it and its CPUs serve the next client at once."""
    gate = str(tmp_path / "gate")  # never opened
    script = tmp_path / "client.py"
    script.write_text(CLIENT.format(secret=SECRET, heartbeat=QUIET))
    with open(tmp_path / "client.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), *map(str, node.address),
                                 gate + ".log", gate], env=node_env(), cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        pid = poll_for(lambda: held_pids(gate), timeout=60,
                       message="the client's call to start")[0]
        proc.send_signal(how)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    poll_for(lambda: gone(pid), timeout=30, message="the call's worker to be killed")
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET,
                  connect_timeout=30) as ex:
        assert ex._max_workers == 2  # every CPU back
        assert ex.submit(tasks.square, 5).result(30) == 25


@contextlib.contextmanager
def held_lone_call(ex, gate, value):
    """A lone call of ex held in its worker (until the block ends) while a
    thread waits on it; it must then end with value."""
    call = on_channel(ex, gate_call, gate, value)
    got = []
    reader = threading.Thread(target=lambda: got.append(call.result(60)))
    reader.start()
    try:
        poll_for(lambda: held_pids(gate), message="the call to start")
        yield call
    finally:
        opened(gate)
        reader.join(30)
    assert got == [value]


def test_jobs_arriving_while_a_lone_call_runs_run_beside_it(node, tmp_path):
    """A lone call is held while a reader waits on it; 20 more jobs then
    run on the node's other CPU (some end while it is held); the held call
    then ends with its value, so do they, and the next lone call goes
    direct again."""
    gate = str(tmp_path / "gate")
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        ex.submit(tasks.identity, 0).result(30)
        with held_lone_call(ex, gate, "first") as first:
            others = [ex.submit(tasks.square, i) for i in range(20)]
            # (the node may queue some behind the held call: how many depends
            # on the client's window and the node's prefetch, not asserted)
            poll_for(lambda: any(f.done() for f in others), timeout=30,
                     message="the other CPU to serve them")
            assert not first.done()
        assert [f.result(30) for f in others] == [i * i for i in range(20)]
        assert on_channel(ex, tasks.square, 7).result(30) == 49


def test_a_worker_killed_mid_lone_call_fails_it_on_every_api(node):
    """A worker killed under a lone call: WorkerLost from the Executor's
    future and from Pool.apply, as for any job of the node; the next call
    is served by a new worker."""
    with dpool.Pool(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as pool:
        assert pool.apply(tasks.identity, (0,)) == 0
        line = channeled(pool._client)
        result = pool.apply_async(tasks.kill_worker)
        assert type(result._future) is DirectFuture and line.on_chan
        with pytest.raises(WorkerLost, match="worker process"):
            result.get(30)
        assert pool.apply(tasks.square, (3,)) == 9
    with Executor(nodes=[node.address], secret=SECRET, heartbeat=QUIET) as ex:
        ex.submit(tasks.identity, 0).result(30)
        future = on_channel(ex, tasks.kill_worker)
        with pytest.raises(WorkerLost, match="worker process"):
            future.result(30)
        assert on_channel(ex, tasks.square, 4).result(30) == 16


def test_a_second_client_arriving_while_a_lone_call_runs(node, tmp_path):
    """Two clients of one CPU each on the node: the second one's lone calls
    go direct and end while the first one's is held; that one then ends
    with its value (a lent worker is its session's: never another's)."""
    gate = str(tmp_path / "gate")
    with Executor(1, nodes=[node.address], secret=SECRET, heartbeat=QUIET) as first:
        first.submit(tasks.identity, 0).result(30)
        with held_lone_call(first, gate, "first") as held:
            with Executor(1, nodes=[node.address], secret=SECRET, heartbeat=QUIET,
                          connect_timeout=30) as second:
                second.submit(tasks.identity, 0).result(30)
                assert [on_channel(second, tasks.square, i).result(30)
                        for i in range(10)] == [i * i for i in range(10)]
            assert not held.done()
