"""Interface addresses and loopback checks; the transport's layer rule."""
import pathlib
import re

import pytest

import dpool.transport
from dpool.hosts import is_loopback
from dpool.transport import netaddr


def test_interface_addresses_include_loopback():
    addrs = netaddr.interface_addresses()
    assert all(len(a) == 4 for a in addrs)
    assert any(ip == "127.0.0.1" for _, ip, _, _ in addrs)
    for _, ip, _, _ in addrs:
        assert ":" not in ip


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("", False), (None, False), ("::", False),
    ("10.1.2.3", False), ("192.0.2.1", False), ("no-such-host.invalid", False),
])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


def test_no_pickle_in_the_transport():
    """Layer rule: the transport moves opaque frames and never unpickles."""
    root = pathlib.Path(dpool.transport.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+\S*pickle", text, re.M), path
        assert "loads(" not in text.replace("json.loads(", ""), path


@pytest.mark.parametrize("address, netmask, reported, expected", [
    ("10.1.2.3", "255.255.255.0", "10.1.2.255", "10.1.2.255"),
    ("10.1.2.3", "255.255.255.0", None, "10.1.2.255"),
    ("10.1.2.3", "255.255.255.0", "10.1.2.3", "10.1.2.255"),    # added without brd
    ("10.1.2.3", "255.255.255.0", "0.0.0.0", "10.1.2.255"),
    ("10.1.2.3", "255.255.255.254", None, None),                # /31: no broadcast
    ("127.0.0.1", "255.0.0.0", None, None),
])
def test_broadcast_address_of_an_interface(address, netmask, reported, expected):
    import types
    addr = types.SimpleNamespace(address=address, netmask=netmask, broadcast=reported)
    assert netaddr._broadcast(addr) == expected
