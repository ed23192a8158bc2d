"""Version check at hello (issue 9): a client and a node whose Python minor
version or cloudpickle version differ refuse each other, with a message that
names both sides' versions.  Each side's hello is faked in turn."""
import asyncio
import re
import sys

import threading

import pytest

from dpool import serialize
from dpool.core.client import Client
from dpool.errors import BrokenCluster, VersionMismatch
from dpool.transport import auth, start_server
from helpers import poll_for

OURS = serialize.runtime_versions()


def test_runtime_versions_name_python_minor_and_cloudpickle():
    import cloudpickle

    assert OURS == {"python": "%d.%d" % sys.version_info[:2],
                    "cloudpickle": cloudpickle.__version__}


def test_check_runtime_names_both_sides():
    auth.check_runtime(dict(OURS), dict(OURS, extra=1), "h:1")  # equal: fine
    mine = {"python": "3.11", "cloudpickle": "3.0.0"}
    with pytest.raises(VersionMismatch) as info:
        auth.check_runtime(mine, {"python": "3.12", "cloudpickle": "3.0.0"}, "h:1")
    assert str(info.value) == ("python version mismatch: this side runs python 3.11, "
                               "cloudpickle 3.0.0; peer at h:1 runs python 3.12, "
                               "cloudpickle 3.0.0")
    with pytest.raises(VersionMismatch, match="python and cloudpickle version mismatch.*"
                                              r"cloudpickle \(not given\)"):
        auth.check_runtime(mine, {"python": "3.10"}, "h:1")
    auth.check_runtime({}, {"python": "2.7"}, "h:1")  # a side that does not say: no check


def test_node_refuses_a_client_with_another_python(dpool_node, node_secret, monkeypatch):
    """The client's hello claims another Python: the node refuses it (and
    logs why), the client's error names both versions."""
    monkeypatch.setattr(serialize, "runtime_versions", lambda: dict(OURS, python="3.99"))
    client = Client([dpool_node.address], secret=node_secret)
    with pytest.raises(BrokenCluster) as info:
        client.start()
    message = str(info.value)
    assert "python version mismatch" in message, message
    assert "this side runs python 3.99" in message and f"runs python {OURS['python']}" in message
    client.close()

    def logged():
        return re.search(r"closing connection from 127\.0\.0\.1:\d+: python version mismatch: "
                         rf"this side runs python {re.escape(OURS['python'])}.*runs python 3\.99",
                         dpool_node.stderr())
    poll_for(logged, message="the node's log line")
    # the node still serves a matching client
    monkeypatch.undo()
    ok = Client([dpool_node.address], secret=node_secret).start()
    try:
        assert ok.submit(abs, (-3,)).future.result(10) == 3
    finally:
        ok.close()


def test_client_refuses_a_node_with_another_cloudpickle():
    """The node's hello claims another cloudpickle: the client refuses it."""
    secret = b"versions-secret"
    fake = dict(OURS, cloudpickle="0.0.1", role="node", cpus=1)

    async def serve():
        server = await start_server(lambda conn: conn.close(), "127.0.0.1", 0,
                                    secret=secret, hello=fake)
        return server

    loop = asyncio.new_event_loop()
    try:
        server = loop.run_until_complete(serve())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            client = Client([("127.0.0.1", server.port)], secret=secret, connect_timeout=5)
            with pytest.raises(BrokenCluster) as info:
                client.start()
            client.close()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        server.close()
        loop.run_until_complete(server.wait_closed())
    finally:
        loop.close()
    message = str(info.value)
    assert "cloudpickle version mismatch" in message, message
    assert f"cloudpickle {OURS['cloudpickle']}" in message and "cloudpickle 0.0.1" in message
