"""Issue 8, findings 3 and 8: a flood of silent connections from one address
must not lock other clients out, and must not flood the node's log.
(How fast the client gets in during the flood: bench/bench_lockout.py.)"""
import time

import pytest

from dpool.core.client import Client
from helpers import SilentFlood, poll_for
from tasks import double

pytestmark = pytest.mark.timeout(60)


def test_a_flood_from_one_address_does_not_lock_out_another(dpool_node):
    with SilentFlood(dpool_node.address, source="127.0.0.2") as flood:
        poll_for(lambda: flood.closed_by_node >= 300, 20,
                 message="the flood to fill the node's handshake slots")
        client = Client([dpool_node.address], secret=dpool_node.secret, connect_timeout=10)
        try:
            t0 = time.monotonic()
            client.start()
            assert client.submit(double, (21,)).future.result(timeout=10) == 42
            elapsed = time.monotonic() - t0
        finally:
            client.close()
        assert flood.thread.is_alive()
    print(f"connected and ran a job in {elapsed * 1000:.0f} ms during a flood "
          f"({flood.opened} connections opened)")
    log = dpool_node.stderr()
    # Only the flooding address was refused: the client got in at once.
    assert "refusing connection from 127.0.0.2" in log
    assert "from 127.0.0.1" not in log, log
    # Rate-limited log: hundreds of refusals, a handful of lines.
    lines = [line for line in log.splitlines() if " WARNING " in line]
    assert len(lines) <= 10, "\n".join(lines[:20])
