"""The dashboard's JSON endpoint and token, and dispy's DispyHTTPServer API,
over plain HTTP."""
import json
import os
import socket
import urllib.error
import urllib.request

import pytest

import dpool
from dpool.dashboard import serve
from dpool.futures import Executor
from helpers import poll_for
from tasks import double, fails, hold, nap

pytestmark = pytest.mark.timeout(60)


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.status, reply.headers.get("Content-Type"), reply.read()


def code_of(url):
    """The HTTP status of a GET (error replies closed: they hold a socket)."""
    try:
        return get(url)[0]
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def status(board):
    base = board.url.split("?")[0]
    query = board.url[len(base):]
    code, ctype, body = get(base + "api/status" + query)
    assert code == 200 and ctype == "application/json"
    return json.loads(body)


def test_pool_jobs_nodes_and_errors():
    with dpool.Pool(2) as pool, serve(pool, poll_sec=0.5) as board:
        assert board.url.startswith("http://127.0.0.1:") and "token" not in board.url
        assert pool.map(double, range(10), chunksize=1) == [2 * x for x in range(10)]
        with pytest.raises(ValueError):
            pool.apply(fails, (7,))
        data = poll_for(lambda: (lambda d: d if d["sources"][0]["jobs"]["failed"] == 1 else None)(
            status(board)), message="the failed job on the page")
        (src,) = data["sources"]
        assert src["kind"] == "Pool" and not src["closed"]
        assert src["jobs"]["finished"] == 10 and src["jobs"]["failed"] == 1
        assert src["jobs"]["queued"] == 0 and src["jobs"]["running"] == 0
        (node,) = src["nodes"]
        assert node["cpus"] == 2 and node["connected"] and node["done"] == 11
        assert node["load"] is not None and node["cpu_busy"] is not None
        (error,) = src["errors"]
        assert "ValueError: boom-7" in error["error"] and error["node"] == node["name"]
        assert [j["status"] for j in src["recent"]].count("finished") == 10
        code, ctype, page = get(board.url)
        assert code == 200 and ctype.startswith("text/html") and b"api/status" in page


def test_running_and_queued_jobs_are_counted(tmp_path):
    with Executor(1) as ex, serve(ex) as board:
        futures = [ex.submit(nap, 0.3, n) for n in range(4)]
        data = poll_for(lambda: (lambda s: s if s["jobs"]["running"] >= 1 else None)(
            status(board)["sources"][0]), message="a running job")
        assert data["jobs"]["running"] + data["jobs"]["queued"] + data["jobs"]["finished"] == 4
        assert [f.result() for f in futures] == [0, 1, 2, 3]
        assert status(board)["sources"][0]["jobs"]["finished"] == 4
        # the throughput series has points once a second has passed
        poll_for(lambda: status(board)["sources"][0]["throughput"], message="throughput")


def test_a_closed_pool_shows_its_last_state():
    pool = dpool.Pool(1)
    board = serve(pool)
    try:
        pool.map(double, [1, 2, 3], chunksize=3)  # one chunk: one job
        status(board)
        pool.close()
        pool.join()
        (src,) = status(board)["sources"]
        assert src["closed"] and src["jobs"]["finished"] == 1
    finally:
        board.shutdown()


def test_token_when_not_on_loopback():
    with serve(host="0.0.0.0") as board:
        assert board.token and f"?token={board.token}" in board.url
        base = f"http://127.0.0.1:{board.port}/"
        for path in ("", "api/status", "api/status?token=wrong"):
            assert code_of(base + path) == 403
        assert code_of(base + "api/status?token=" + board.token) == 200
        request = urllib.request.Request(base + "api/status",
                                         headers={"Authorization": "Bearer " + board.token})
        assert code_of(request) == 200
        assert code_of(base + "nothing?token=" + board.token) == 404


def test_a_given_token_is_required_on_loopback_too():
    with serve(token="s3cret") as board:
        assert code_of(f"http://127.0.0.1:{board.port}/api/status") == 403
        assert status(board)["sources"] == []


def test_bad_poll_sec():
    with pytest.raises(ValueError, match="poll_sec"):
        serve(poll_sec=0)


def test_dispy_httpd_under_import_dpool_as_dispy():
    import dpool as dispy

    with dispy.JobCluster(double, cpus=2) as cluster:
        http_server = dispy.httpd.DispyHTTPServer(cluster, port=0, poll_sec=1)
        try:
            assert http_server.host == "127.0.0.1"  # dispy's default '' is every interface
            jobs = [cluster.submit(n) for n in range(5)]
            cluster.wait()
            assert [job.result for job in jobs] == [0, 2, 4, 6, 8]
            (src,) = status(http_server)["sources"]
            assert src["name"] == "double" and src["kind"] == "JobCluster"
            assert src["jobs"]["finished"] == 5
            assert sorted(j["id"] for j in src["recent"]) == sorted(job.id for job in jobs)
            assert {j["args"] for j in src["recent"]} == {f"({n},)" for n in range(5)}
            http_server.add_cluster(cluster)  # already there: a warning, no second copy
            assert len(status(http_server)["sources"]) == 1
            http_server.del_cluster(cluster)
            assert status(http_server)["sources"] == []
        finally:
            http_server.shutdown(wait=False)
    assert not http_server._thread.is_alive()
    with pytest.raises(OSError):  # nobody listens there any more
        socket.create_connection(("127.0.0.1", http_server.port), timeout=5).close()


def test_remote_node_load_comes_from_its_status(dpool_node, node_secret):
    with Executor(nodes=[dpool_node.address], secret=node_secret) as ex, serve(ex) as board:
        assert ex.submit(double, 4).result() == 8
        (src,) = status(board)["sources"]
        (node,) = src["nodes"]
        assert node["address"] == "127.0.0.1:%d" % dpool_node.port and node["connected"]
        assert node["cpus"] == 2 and node["done"] == 1
        assert isinstance(node["load"], float) and node["memory_free"] > 0


def code_with_host(board, host_header, path="/api/status"):
    request = urllib.request.Request(f"http://127.0.0.1:{board.port}{path}",
                                     headers={"Host": host_header})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def test_dns_rebinding_a_foreign_host_header_is_refused_on_loopback():
    """Without a token (loopback), a page from evil.example whose name was
    rebound to 127.0.0.1 is same-origin with the board: the Host header is
    its only tell."""
    with serve() as board:
        assert board.token is None
        for host in ("evil.example", f"evil.example:{board.port}", "127.0.0.1.evil.example"):
            assert code_with_host(board, host) == 403
            assert code_with_host(board, host, "/") == 403
        for host in (f"127.0.0.1:{board.port}", f"localhost:{board.port}", "localhost",
                     f"[::1]:{board.port}", "127.0.0.1"):
            assert code_with_host(board, host) == 200


def test_served_on_ipv6_loopback():
    with serve(host="::1") as board:
        assert board.token is None and board.url.startswith("http://[::1]:")
        assert code_of(board.url + "api/status") == 200


def test_an_idle_connection_is_closed(monkeypatch):
    """A connection that never sends its request (slowloris) must not hold
    a server thread for ever."""
    from dpool.dashboard import DashboardServer
    monkeypatch.setattr(DashboardServer, "request_timeout", 0.5)
    with serve() as board, socket.create_connection(("127.0.0.1", board.port)) as sock:
        sock.settimeout(20)
        sock.sendall(b"GET /api/status HTTP/1.1\r\n")  # and never the rest
        assert sock.recv(100) == b""


def test_a_direct_call_in_flight_when_the_board_attaches_is_counted_when_it_ends(tmp_path):
    """A lone call goes straight to a lent worker (no loop thread, no event
    at its start); a board attached while it runs counts it when it ends, as
    it counts a loop job submitted before it attached (its end was told only
    to the client's own handler, not to the board's listener)."""
    gate, marker = str(tmp_path / "gate"), str(tmp_path / "m")
    with Executor(1) as ex:
        assert ex.submit(double, 1).result(30) == 2  # (the worker lent once it is ready)
        future = ex.submit(hold, marker, gate)
        try:
            poll_for(lambda: os.path.exists(marker), message="the call to start")
            line = ex._client._direct
            assert line is not None and line.job is not None, "not a direct call"
            board = serve(ex)
        finally:
            open(gate, "w").close()
        with board:
            assert future.result(30)
            assert status(board)["sources"][0]["jobs"]["finished"] == 1
