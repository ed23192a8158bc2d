"""dpool.futures.Executor: what the conformance suite cannot compare with
the stdlib (placement options, clean-up of a forgotten executor)."""
import gc
import subprocess
import sys
import textwrap
import warnings

import pytest

import dpool
from dpool import config
from dpool._adapters import node_addresses as parse_nodes
from dpool.futures import Executor
import tasks
from helpers import poll_for, start_node


@pytest.mark.parametrize("spec, expected", [
    ("127.0.0.1:5000", [("127.0.0.1", 5000)]),
    ("a:1, b:2", [("a", 1), ("b", 2)]),
    ("localhost", [("localhost", config.NODE_PORT)]),
    ("[::1]:7", [("::1", 7)]),
    (("h", 9), [("h", 9)]),
    ([("h", 9), "g:8"], [("h", 9), ("g", 8)]),
])
def test_parse_nodes(spec, expected):
    assert parse_nodes(spec) == expected


@pytest.mark.parametrize("bad", ["", "h:port", [("h",)], [42]])
def test_parse_nodes_rejects(bad):
    with pytest.raises(ValueError):
        parse_nodes(bad)


def test_remote_nodes_need_a_secret():
    with pytest.raises(ValueError, match="secret"):
        Executor(nodes=[("192.0.2.1", 51350)])


def test_dpool_nodes_environment_selects_the_node(tmp_path, monkeypatch):
    node = start_node(tmp_path / "node", cpus=2, secret=b"env-secret")
    try:
        monkeypatch.setenv("DPOOL_NODES", f"127.0.0.1:{node.port}")
        monkeypatch.setenv("DPOOL_SECRET", "env-secret")
        with Executor() as executor:
            pids = set(executor.map(tasks.getpid, range(6)))
            on_node = {p.pid for p in node.descendants()}
            assert pids <= on_node
            assert executor._max_workers == 2
    finally:
        node.terminate()


def test_max_workers_caps_cpus_on_a_node(tmp_path):
    node = start_node(tmp_path / "node", cpus=2, secret=b"s3")
    try:
        with Executor(1, nodes=[node.address], secret="s3") as executor:
            assert executor._max_workers == 1
            assert executor.submit(tasks.square, 3).result(5) == 9
    finally:
        node.terminate()


def test_shutdown_without_wait_then_with_wait():
    executor = Executor(1)
    future = executor.submit(tasks.nap, 0.1, "x")
    executor.shutdown(wait=False)
    executor.shutdown(wait=True)  # joins the closing thread
    assert future.result(0) == "x"


def test_a_forgotten_executor_releases_its_workers():
    executor = Executor(1)
    assert executor.submit(tasks.square, 2).result(5) == 4
    client = executor._client
    del executor
    gc.collect()
    assert poll_for(lambda: client.closed and not client._thread.thread.is_alive(), 10,
                    message="the client to close")


def test_map_with_a_lambda_and_chunks():
    with Executor(2) as executor:
        assert list(executor.map(lambda a, b: a * b, range(100), range(100), chunksize=7)) == \
            [i * i for i in range(100)]


def test_map_sends_a_range_as_ranges():
    with Executor(2) as executor:
        seen, submit = [], executor._client.submit

        def spy(fn, args, *rest, **kwargs):
            seen.append(type(args))
            return submit(fn, args, *rest, **kwargs)
        executor._client.submit = spy
        assert list(executor.map(tasks.square, range(50), chunksize=10)) == \
            [x * x for x in range(50)]
        assert seen == [range] * 5


def test_no_resource_warning_on_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        with Executor(1) as executor:
            executor.submit(tasks.square, 2).result(5)


def test_more_distinct_functions_than_the_client_remembers():
    """A lambda made per call is a new function each time; more of them than
    the client's function table holds (4096) must all still run."""
    with Executor(2) as ex:
        futures = [ex.submit(lambda i=i: 2 * i) for i in range(4500)]
        assert [f.result(60) for f in futures] == [2 * i for i in range(4500)]


def test_shutdown_from_a_done_callback_raises_instead_of_deadlocking():
    """Done-callbacks run in the client's loop thread; closing the client
    there would wait on that very thread, so it raises RuntimeError."""
    import threading

    errors, ran = [], threading.Event()

    def callback(future):
        try:
            ex.shutdown(wait=True)
        except RuntimeError as exc:
            errors.append(exc)
        ran.set()

    ex = Executor(1)
    try:
        ex.submit(abs, -1).add_done_callback(callback)
        assert ran.wait(10)
        assert errors and "loop thread" in str(errors[0])
        with pytest.raises(RuntimeError):  # shut down, as the stdlib's would be
            ex.submit(abs, -2)
    finally:
        ex.shutdown()  # from this thread it completes and releases everything


def test_map_on_a_temporary_executor_finishes_its_work():
    """The executor is garbage collected while map's results are still
    coming; as with the stdlib, the work is finished, not cancelled."""
    assert list(Executor(2).map(tasks.square, range(200))) == [i * i for i in range(200)]
    gc.collect()


# --------------------------------------------------------- found by review


def test_shutdown_without_wait_finishes_the_work_before_the_interpreter_exits(tmp_path):
    # ProcessPoolExecutor: the submitted work still runs when the program
    # ends right after shutdown(wait=False).  dpool's closing thread was a
    # daemon, so the work was dropped at exit.
    out = tmp_path / "out"
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(f"""
        from dpool.futures import Executor

        def work(path):
            import time
            time.sleep(0.3)
            open(path, "w").write("done")

        if __name__ == "__main__":
            ex = Executor(1)
            ex.submit(work, {str(out)!r})
            ex.shutdown(wait=False)
    """))
    subprocess.run([sys.executable, str(script)], timeout=30, check=True, cwd=tmp_path)
    assert out.read_text() == "done"


def test_lost_node_warning_says_which_node(tmp_path, dpool_node, node_secret, caplog):
    """Two dpool-nodes on one host: killing one logged "lost node vm: node vm
    closed the connection", which does not say which of the two was lost."""
    caplog.set_level("WARNING", logger="dpool")
    doomed = start_node(tmp_path / "doomed", cpus=1, secret=node_secret)
    try:
        with Executor(nodes=[dpool_node.address, doomed.address], secret=node_secret) as ex:
            assert ex.submit(tasks.double, 2).result(10) == 4
            doomed.kill()
            lost = poll_for(lambda: [r.getMessage() for r in caplog.records
                                     if r.getMessage().startswith("lost node")], 10,
                            message="the lost node warning")
            assert f"127.0.0.1:{doomed.port}" in lost[0], lost
            assert ex.submit(tasks.double, 3).result(10) == 6
    finally:
        doomed.kill()


def test_executor_refuses_a_node_port_out_of_range():
    """``Executor(nodes="127.0.0.1:99999")`` connected to port 34463
    (getaddrinfo's wrap-around) and reported a refused connection there."""
    for nodes in ("127.0.0.1:99999", [("127.0.0.1", 99999)], "127.0.0.1:-1"):
        with pytest.raises(ValueError, match="65535"):
            Executor(nodes=nodes, secret="x")
        with pytest.raises(ValueError, match="65535"):
            dpool.Pool(nodes=nodes, secret="x")
