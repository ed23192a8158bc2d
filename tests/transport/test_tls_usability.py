"""TLS that helps (issue 8, finding 5): a plaintext client to a TLS node fails
at once saying TLS; an mTLS refusal reaches the client with its reason;
mutual TLS without a secret works as documented."""
import asyncio
import time

import pytest

import dpool
from dpool.errors import AuthenticationError, BrokenCluster, DpoolError, ProtocolError
from dpool.node.server import NodeServer
from dpool.transport import client_ssl_context, connect, server_ssl_context, start_server
from tasks import double

SECRET = b"a tls test secret, long enough"
pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    path = tmp_path_factory.mktemp("certs")
    ca, other_ca = trustme.CA(), trustme.CA()
    files = {"ca": path / "ca.pem", "server": path / "server.pem",
             "client": path / "client.pem", "stranger": path / "stranger.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(files["server"])
    ca.issue_cert("client.dpool.test").private_key_and_cert_chain_pem.write_to_path(
        files["client"])
    other_ca.issue_cert("x.dpool.test").private_key_and_cert_chain_pem.write_to_path(
        files["stranger"])
    return {k: str(v) for k, v in files.items()}


async def tls_server(certs, mutual=False):
    ctx = server_ssl_context(certs["server"], cafile=certs["ca"] if mutual else None,
                             require_client_cert=mutual)
    return await start_server(lambda conn: None, "127.0.0.1", 0, secret=SECRET, hello={},
                              ssl=ctx)


def test_plaintext_client_to_a_tls_node_fails_at_once_saying_tls(certs):
    async def main():
        server = await tls_server(certs)
        try:
            t0 = time.monotonic()
            with pytest.raises(ProtocolError, match="requires TLS") as info:
                await connect("127.0.0.1", server.port, secret=SECRET, hello={}, timeout=10)
            assert time.monotonic() - t0 < 1, info.value
            # and a TLS client still gets in
            good = await connect("127.0.0.1", server.port, secret=SECRET, hello={},
                                 ssl=client_ssl_context(cafile=certs["ca"]))
            good.abort()
            await good.wait_closed()
        finally:
            server.close(abort_connections=True)
            await server.wait_closed()
    asyncio.run(main())


@pytest.mark.parametrize("client_cert", [None, "stranger"])
def test_mtls_refusal_reaches_the_client_with_its_reason(certs, client_cert):
    async def main():
        server = await tls_server(certs, mutual=True)
        try:
            ctx = client_ssl_context(cafile=certs["ca"],
                                     certfile=certs[client_cert] if client_cert else None)
            with pytest.raises(DpoolError) as info:
                await connect("127.0.0.1", server.port, secret=SECRET, hello={}, ssl=ctx,
                              timeout=10)
            return str(info.value)
        finally:
            server.close(abort_connections=True)
            await server.wait_closed()
    message = asyncio.run(main())
    assert "certificate" in message or "unknown ca" in message, message


def test_mutual_tls_without_a_secret(certs):
    async def start():
        node = NodeServer("127.0.0.1", 0, cpus=1, secret=b"", certfile=certs["server"],
                          cafile=certs["ca"])
        return await node.start()

    loop = asyncio.new_event_loop()
    node = loop.run_until_complete(start())
    import threading
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        with dpool.JobCluster(double, nodes=[("127.0.0.1", node.port)], cafile=certs["ca"],
                              certfile=certs["client"]) as cluster:
            assert cluster.submit(21)(timeout=20) == 42
        with pytest.raises((BrokenCluster, AuthenticationError, ValueError)):
            dpool.JobCluster(double, nodes=[("127.0.0.1", node.port)], cafile=certs["ca"])
    finally:
        asyncio.run_coroutine_threadsafe(node.close(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
