"""A client meeting many nodes at once on a loaded machine: one scrypt
stretch per node (each node has its own salt), all while every node's
pre-auth deadline (3 s) runs."""
import asyncio
import hashlib
import threading
import time

from helpers import start_node

from dpool.transport import connect

SECRET = b"a secret long enough for a test!"


def test_a_client_stretching_for_many_nodes_on_one_busy_core_still_meets_them_all(
        tmp_path, monkeypatch):
    """One core (a lock) and a stretch of 1.6 s: the third node's key is
    ready only after 4.8 s, past its 3 s deadline, so a client that
    stretched for all nodes at once (in threads) lost the later nodes
    ("no node could be used").  The key, once stretched, is cached: the
    client meets a node that gave up on it again at once."""
    real_scrypt, one_core = hashlib.scrypt, threading.Lock()

    def scrypt(*args, **kwargs):
        with one_core:
            time.sleep(1.6)
            return real_scrypt(*args, **kwargs)

    nodes = [start_node(tmp_path / f"n{i}", cpus=1, secret=SECRET,
                        args=("--host", f"127.0.0.{i + 2}")) for i in range(3)]
    try:
        monkeypatch.setattr(hashlib, "scrypt", scrypt)

        async def main():
            conns = await asyncio.gather(*(
                connect(f"127.0.0.{i + 2}", node.port, secret=SECRET, hello={}, timeout=30)
                for i, node in enumerate(nodes)))
            for conn in conns:
                conn.close()
                await conn.wait_closed()
            return conns
        assert len(asyncio.run(main())) == 3
    finally:
        for node in nodes:
            node.terminate()


def test_a_process_meeting_hundreds_of_nodes_stretches_each_salt_once(monkeypatch):
    """A dpool-scheduler opens a session on each of its nodes for every
    client (each node has its own salt).  The cache held 64 keys: with more
    nodes every client stretched again for every node, one at a time
    (50 ms each: 5 s for 100 nodes, past the scheduler's wait for them)."""
    from dpool.transport import auth

    salts = [bytes([i % 256, i // 256]) * 8 for i in range(500)]
    stretched = []
    monkeypatch.setattr(hashlib, "scrypt",
                        lambda secret, salt, **kw: stretched.append(salt) or salt)
    auth.stretch.cache_clear()
    try:
        for _ in range(3):   # three clients, each meeting every node
            for salt in salts:
                auth.stretch(SECRET, salt)
        assert len(stretched) == len(salts)
    finally:
        auth.stretch.cache_clear()
