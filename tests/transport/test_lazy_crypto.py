"""cryptography is imported lazily (45a595f): a server that will seal its
connections imports it when it starts, so that a missing cryptography fails
the start of a node or scheduler with the ImportError, rather than leaving
it serving and dropping every client after its handshake (the clients then
saw only "connection ... is closed")."""
import asyncio
import sys

import pytest

from dpool.transport import start_server

SECRET = b"test secret for the lazy imports"
pytestmark = pytest.mark.timeout(30)


def _without_cryptography(monkeypatch):
    names = [n for n in sys.modules if n == "cryptography" or n.startswith("cryptography.")]
    for name in set(names) | {"cryptography"}:
        monkeypatch.setitem(sys.modules, name, None)   # import raises ImportError


def test_a_sealing_server_without_cryptography_fails_to_start(monkeypatch):
    _without_cryptography(monkeypatch)

    async def main():
        server = await start_server(lambda conn: None, "127.0.0.1", 0, secret=SECRET,
                                    hello={})
        server.close()
        await server.wait_closed()

    with pytest.raises(ImportError):
        asyncio.run(main())
