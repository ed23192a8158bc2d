"""A dpool-node streams a large argument on to the worker as it arrives
(issue 15): the worker reads it while the client still sends, the node
holds a bounded part of it, and a client cut, or a worker killed, in the
middle of the frame leaves the node and its workers clean, the job failed
by the usual rules (WorkerLost), the connection and its next jobs going on.

The client here is a raw authenticated socket so that the test sends the
frame in two halves: what the worker has read in between shows whether
the node stored the frame whole (a memory file) before passing it on."""
import operator
import os
import pathlib
import signal
import socket
import struct
import threading
import time

import psutil
import pytest

from dpool import protocol as P
from dpool import serialize
from dpool.transport.frames import BYTES_FLAG, encode
from helpers import authenticated_socket, memory_files, pid_gone, poll_for, start_node

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="reads /proc/PID/fd")]

SIZE = 32 * 2**20
HALF = SIZE // 2


@pytest.fixture
def node(tmp_path, node_secret):
    node = start_node(tmp_path / "node", cpus=1, secret=node_secret)
    yield node
    assert node.terminate() == 0, node.stderr()


def send(sock, msg, *frames):
    sock.sendall(b"".join(encode([P.encode(type(msg), *msg), *frames])))


def replies(sock):
    """The node's next messages (lists of frames)."""
    while True:
        chunk = sock.recv(1 << 20)
        assert chunk, "the node closed the connection"
        messages = sock.decoder.feed(chunk)
        if messages:
            return messages


def next_done(sock):
    """The next Done's first result and its frames (other messages skipped)."""
    while True:
        for frames in replies(sock):
            msg = P.decode(frames[0])
            if type(msg) is P.Done:
                return P.results(msg, frames)[0]


def workers(node):
    """The node's worker processes (its descendants but the zygote; one
    gone between the two looks is not counted)."""
    found = []
    for p in node.descendants():
        try:
            if p.ppid() != node.pid:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def held_by_workers(node):
    """The resident memory of the node's workers, bytes."""
    total = 0
    for proc in workers(node):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


FUNC = b"".join(encode([P.encode(P.Func, 1), serialize.dumps_function(len)]))


def open_session(node, secret, func=True, **options):
    sock = authenticated_socket(node.port, secret, timeout=60)
    send(sock, P.Session(options))
    assert type(P.decode(replies(sock)[0][0])) is P.Ready
    poll_for(lambda: len(workers(node)) == 1, 30, message="the worker to start")
    if func:
        sock.sendall(FUNC)
    return sock


def run_head(job_id, data):
    """The wire bytes of a Run of ``len(data)`` up to the large frame's bytes."""
    small, big = serialize.dumps_call((data,))
    frame0 = P.encode(P.Run, [P.run_item(job_id, 1, 2, int(P.Call.CALL))])
    small = bytes(small)
    return struct.pack("<IQQQ", 3, len(frame0), len(small), len(data) | BYTES_FLAG) \
        + frame0 + small


def send_half(node, sock, data, first=b""):
    """Send ``first``, then a Run of ``len(data)`` up to half of its large
    frame, in one write; wait for the worker to have read that half (the
    node streams it on)."""
    before = held_by_workers(node)
    sock.sendall(first + run_head(1, data) + data[:HALF])
    poll_for(lambda: held_by_workers(node) - before >= HALF - (1 << 20), 30,
             message="the worker to hold the half of the argument sent so far")
    assert memory_files(node.pid) == 0


@pytest.mark.parametrize("func", ["before", "in the same record"])
def test_a_large_argument_reaches_the_worker_as_it_arrives(node, node_secret, func):
    """Its function sent before, or in the same record as the Run (a
    client's first job): the Func is taken first, then the Run streams."""
    data = os.urandom(1024) * (SIZE // 1024)
    apart = func == "before"
    with open_session(node, node_secret, func=apart) as sock:
        send_half(node, sock, data, first=b"" if apart else FUNC)
        sock.sendall(data[HALF:])
        record, frames = next_done(sock)
        assert record.job_id == 1 and record.outcome == P.Outcome.OK
        assert serialize.loads(frames) == SIZE
        # The next job (a small argument) on the same connection
        send(sock, P.Run([P.run_item(2, 1, 1, int(P.Call.CALL))]),
             *serialize.dumps_call((b"abc",)))
        record, frames = next_done(sock)
        assert record.job_id == 2 and serialize.loads(frames) == 3


@pytest.mark.parametrize("ending", ["close", "reset"])
def test_a_client_cut_in_the_middle_of_a_streamed_argument(node, node_secret, ending):
    data = bytes(SIZE)
    sock = open_session(node, node_secret)
    with sock:
        send_half(node, sock, data)
        worker = workers(node)[0].pid
        if ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # The session ends: its worker is killed, its CPU free again.
    poll_for(lambda: pid_gone(worker), 30, message="the session's worker to be killed")
    poll_for(lambda: not workers(node), 30, message="no worker left")
    assert memory_files(node.pid) == 0
    with open_session(node, node_secret) as sock:   # (the CPU is free: a worker starts)
        send_half(node, sock, data)
        sock.sendall(data[HALF:])
        record, frames = next_done(sock)
        assert record.outcome == P.Outcome.OK and serialize.loads(frames) == SIZE


def test_a_worker_killed_in_the_middle_of_a_streamed_argument(node, node_secret):
    data = bytes(SIZE)
    with open_session(node, node_secret) as sock:
        send_half(node, sock, data)
        worker = workers(node)[0].pid
        os.kill(worker, signal.SIGKILL)
        poll_for(lambda: pid_gone(worker), 30, message="the worker to die")
        sock.sendall(data[HALF:])
        record, frames = next_done(sock)
        assert record.job_id == 1 and record.outcome == P.Outcome.WORKER_LOST
        assert "SIGKILL" in str(serialize.load_exception(frames))
        # A new worker takes its place; the connection goes on.
        poll_for(lambda: len(workers(node)) == 1, 30, message="a new worker")
        send(sock, P.Run([P.run_item(2, 1, 1, int(P.Call.CALL))]),
             *serialize.dumps_call((b"abcd",)))
        record, frames = next_done(sock)
        assert record.job_id == 2 and serialize.loads(frames) == 4
    assert memory_files(node.pid) == 0


def test_a_job_queued_behind_another_is_received_whole(node, node_secret):
    """No idle worker: the argument waits in the node (a memory file) as
    before, to be requeued if need be; it still runs."""
    data = bytes(SIZE)
    with open_session(node, node_secret) as sock:
        send(sock, P.Func(2), serialize.dumps_function(time.sleep))
        send(sock, P.Run([P.run_item(1, 2, 1, int(P.Call.CALL))]),
             *serialize.dumps_call((1.0,)))
        sock.sendall(run_head(3, data) + data)
        record, _ = next_done(sock)
        assert record.job_id == 1
        record, frames = next_done(sock)
        assert record.job_id == 3 and serialize.loads(frames) == SIZE


def test_a_worker_stopped_in_the_middle_of_a_streamed_argument_keeps_the_client(
        node, node_secret):
    """The node stops reading the client while the worker takes nothing (its
    socket full): that silence is the node's own doing, not the client's,
    so the client keeps its session past its lease; the job goes on when the
    worker does."""
    data = bytes(SIZE)
    deadline = 2.0
    with open_session(node, node_secret, heartbeat=(0.5, deadline)) as sock:
        send_half(node, sock, data)
        worker = workers(node)[0].pid
        os.kill(worker, signal.SIGSTOP)
        try:
            rest = threading.Thread(target=sock.sendall, args=(data[HALF:],))
            rest.start()
            time.sleep(3 * deadline)   # (what must not happen: the session ended)
            assert psutil.Process(worker).status() == psutil.STATUS_STOPPED
        finally:
            os.kill(worker, signal.SIGCONT)
        rest.join(60)
        assert not rest.is_alive()
        record, frames = next_done(sock)
        assert record.job_id == 1 and record.outcome == P.Outcome.OK
        assert serialize.loads(frames) == SIZE


def _wait_for_reader(fifo):
    """A write end of ``fifo``, once a reader (the worker's job) opened it."""
    def writer():
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:    # (ENXIO: no reader yet)
            return None
    fds = []
    poll_for(lambda: fds.append(writer()) or fds[-1] is not None, 30,
             message="the worker to run the job reading the FIFO")
    return fds[-1]


def test_a_later_large_frame_of_a_message_whose_first_was_received_whole(
        node, node_secret, tmp_path):
    """A Run whose first large frame began while the worker was busy (so it
    went into a memory file) and whose next large frame begins once the
    worker is free: the job still runs, with both frames (NumPy's buffers,
    or two large bytes, are such frames)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    size = 2 * 2**20
    data = os.urandom(size)
    payload = serialize.dumps_call((data, data[:1] + data[1:]))
    assert len(payload) == 3
    wire = b"".join(encode([P.encode(P.Run, [P.run_item(3, 3, 3, int(P.Call.CALL))]),
                            *payload]))
    first_end = len(wire) - size   # (where the first large frame ends)
    with open_session(node, node_secret) as sock:
        send(sock, P.Func(2), serialize.dumps_function(pathlib.Path.read_bytes))
        send(sock, P.Func(3), serialize.dumps_function(operator.eq))
        send(sock, P.Run([P.run_item(1, 2, 1, int(P.Call.CALL))]),
             *serialize.dumps_call((fifo,)))
        fd = _wait_for_reader(fifo)   # the worker is busy with job 1
        try:
            sock.sendall(wire[:first_end - 1])
            poll_for(lambda: memory_files(node.pid) == 1, 30,
                     message="the first large frame to go into a memory file")
        finally:
            os.write(fd, b"x")
            os.close(fd)
        record, frames = next_done(sock)
        assert record.job_id == 1 and serialize.loads(frames) == b"x"
        sock.sendall(wire[first_end - 1:])   # (the worker is free now)
        record, frames = next_done(sock)
        assert record.job_id == 3 and record.outcome == P.Outcome.OK, \
            serialize.load_exception(frames)
        assert serialize.loads(frames) is True
    assert memory_files(node.pid) == 0


def test_a_run_in_the_record_before_a_streamed_one_is_not_overtaken(node, node_secret):
    """A client's small Run in one record and the next Run's large frame
    beginning in the next record, both read at once: the first Run is taken
    first, so its job runs first on the one worker (the second one, no
    worker free for it, is received whole)."""
    data = os.urandom(1024) * (4 * 2**20 // 1024)
    with open_session(node, node_secret) as sock:
        send(sock, P.Run([P.run_item(2, 1, 1, int(P.Call.CALL))]),
             *serialize.dumps_call((b"ab",)))
        record, _ = next_done(sock)   # (the node has the function, the worker is free)
        assert record.job_id == 2
        first = b"".join(encode([P.encode(P.Run, [P.run_item(1, 1, 1, int(P.Call.CALL))]),
                                 *serialize.dumps_call((b"abc",))]))
        sock.sock.sendall(b"".join(sock.sealer.seal(first) + sock.sealer.seal(run_head(3, data))))
        sock.sendall(data)
        record, frames = next_done(sock)
        assert record.job_id == 1 and serialize.loads(frames) == 3
        record, frames = next_done(sock)
        assert record.job_id == 3 and serialize.loads(frames) == len(data)


def test_a_forged_record_in_the_middle_of_a_streamed_argument(node, node_secret):
    """A record failing its tag mid-frame: none of its bytes reach the
    worker; the connection fails, the session ends, its worker is killed,
    nothing is left in the node; the next session runs."""
    data = bytes(SIZE)
    with open_session(node, node_secret) as sock:
        send_half(node, sock, data)
        worker = workers(node)[0].pid
        record = bytearray(b"".join(sock.sealer.seal(data[HALF:HALF + 1000])))
        record[-1] ^= 1
        sock.sock.sendall(bytes(record))
        poll_for(lambda: pid_gone(worker), 30, message="the session's worker to be killed")
    poll_for(lambda: not workers(node), 30, message="no worker left")
    assert memory_files(node.pid) == 0
    with open_session(node, node_secret) as sock:
        send_half(node, sock, data)
        sock.sendall(data[HALF:])
        record, frames = next_done(sock)
        assert record.outcome == P.Outcome.OK and serialize.loads(frames) == SIZE


@pytest.mark.parametrize("item", [(1, 1), (1, [1], 1, 0, 1), ([1], 1, 1, 0, 1)])
def test_a_malformed_run_with_a_large_argument_is_refused_as_a_small_one(
        node, node_secret, item):
    """A Run whose job is malformed: the node ends the connection as for any
    bad message once it has it whole (not from the middle of its read, which
    then took the record after it for a forged one); the node serves on."""
    data = bytes(4 * 2**20)
    with open_session(node, node_secret) as sock:
        frame0 = P.encode(P.Run, [item])
        small = bytes(serialize.dumps_call((data,))[0])
        try:
            sock.sendall(struct.pack("<IQQQ", 3, len(frame0), len(small), len(data) | BYTES_FLAG)
                         + frame0 + small + data)
            while sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
    poll_for(lambda: not workers(node), 30, message="the session to end")
    assert "on_message callback" in node.stderr()
    assert "Exception in callback" not in node.stderr()
    assert "failed authentication" not in node.stderr()
    with open_session(node, node_secret) as sock:
        send(sock, P.Run([P.run_item(2, 1, 1, int(P.Call.CALL))]), *serialize.dumps_call((b"ab",)))
        record, frames = next_done(sock)
        assert record.job_id == 2 and serialize.loads(frames) == 2


def test_a_worker_still_running_the_initializer_is_not_streamed_to(node, node_secret, tmp_path):
    """A session with an initializer: a worker that has not finished it
    reads nothing, so a large argument streamed to it would hold the
    client's whole connection (its next messages, its Cancels) until the
    initializer ends; it is received whole instead, and runs after."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = bytes(64 * 2**20)
    sock = authenticated_socket(node.port, node_secret, timeout=60)
    with sock:
        sock.sendall(b"".join(encode([P.encode(P.Session, {}),
                                      *serialize.dumps((pathlib.Path.read_bytes, (fifo,)))])))
        assert type(P.decode(replies(sock)[0][0])) is P.Ready
        fd = _wait_for_reader(fifo)   # the worker runs its initializer
        try:
            sock.sendall(FUNC)
            rest = threading.Thread(target=sock.sendall, args=(run_head(1, data) + data,))
            rest.start()
            poll_for(lambda: not rest.is_alive(), 60,
                     message="the node to read the whole Run while the initializer runs")
        finally:
            os.close(fd)   # (the initializer returns)
            rest.join(60)
        record, frames = next_done(sock)
        assert record.job_id == 1 and serialize.loads(frames) == len(data)
