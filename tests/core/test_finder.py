"""The client's discovery Finder (dpool.core.discover) without sockets:
what it remembers of the nodes it heard of."""
import asyncio

from dpool.core import discover
from dpool.transport import udp


class Links:
    """What a Finder uses of the client's links: nothing is linked."""
    closed = False
    links = []

    def __init__(self):
        self.joined = []

    def gave_up_busy(self, address):
        return False

    def knows(self, address):
        return False

    async def join(self, address):
        self.joined.append(address)


def heard(i, port=51350):
    address = (f"10.0.{i >> 8}.{i & 255}", port)
    return udp.Found(address, f"node{i}", 1, 1, address, 3, {"id": f"id{i}"})


def test_the_finder_holds_at_most_max_found_nodes(monkeypatch):
    """Before, its tables (nodes found, node ids) grew with every node ever
    heard of, for the client's lifetime."""
    monkeypatch.setattr(discover, "MAX_FOUND", 8)

    async def main():
        finder = discover.Finder(Links(), discover.settings([("*", 51350)], b"s", 51350))
        for i in range(20):
            finder._on_found(heard(i))
        await asyncio.sleep(0)   # (the joins it started)
        kept = [heard(i).address for i in range(12, 20)]
        assert list(finder.found) == kept and list(finder.heard) == kept
        assert list(finder.ids) == [f"id{i}" for i in range(12, 20)]
    asyncio.run(main())


def test_the_finder_forgets_nodes_not_heard_from_for_long():
    async def main():
        links = Links()
        finder = discover.Finder(links, discover.settings([("*", 51350)], b"s", 51350))
        now = [0.0]
        finder.clock = lambda: now[0]
        finder._on_found(heard(1))
        finder._on_found(heard(2))
        while finder.connecting:   # (the joins it started end)
            await asyncio.sleep(0)
        now[0] = discover.FORGET_AFTER - 1
        finder._on_found(heard(2))   # heard again: kept
        now[0] = discover.FORGET_AFTER + 1
        finder.forget_old()
        assert list(finder.found) == [heard(2).address] and list(finder.ids) == ["id2"]
        finder._on_found(heard(1))   # back: found anew, joined again
        await asyncio.sleep(0)
        assert links.joined == [heard(1).address, heard(2).address, heard(1).address]
    asyncio.run(main())
