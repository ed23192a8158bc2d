"""Throwaway hosts in network namespaces (needs root, ``ip`` from iproute2
and ``nft`` from nftables): :class:`Lab` for the fault matrix, and
:class:`LanLab` (two subnets, broadcast, a router, a host name per host; also
``nsenter`` and ``unshare`` from util-linux) for discovery and the relay.

A :class:`Lab` is one "client" namespace linked to each "node" namespace by
a veth pair: node k is 10.210.k.2, the client's end of its link 10.210.k.1.
Nothing is attached to the root namespace, names carry the test run's pid,
and :meth:`Lab.down` (always called by the fixture) deletes them all, which
also kills the links.  Faults:

- :meth:`partition` drops every packet in or out of a namespace but its
  loopback, silently (nft);
- :meth:`link` sets a node's interface down or up (the cable pulled);
- :meth:`loss` drops a random share of the packets each namespace sends
  (nft ``numgen random``: this kernel has no netem).

:func:`entered` runs the calling thread inside a namespace (``setns``): a
client made there keeps its loop thread, hence its sockets, in it.
"""
import contextlib
import ctypes
import itertools
import os
import shutil
import subprocess

import pytest

from helpers import start_node

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_labs = itertools.count(1)
LAB_TOOLS = ("ip", "nft", "nsenter", "unshare")
needs_lab = pytest.mark.skipif(not all(shutil.which(t) for t in LAB_TOOLS),
                               reason=f"needs {', '.join(LAB_TOOLS)}")
LAB_SECRET = b"cluster-lab-secret-0123456789"   # the nodes' secret in tests/cluster


def run(*cmd, input=None):
    result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=30)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result.stdout


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def entered(ns):
    """Run the calling thread in network namespace ``ns`` for the block."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


class Lab:
    def __init__(self, nodes=2):
        self.tag = f"dpf{os.getpid()}x{next(_labs)}"
        self.client = f"{self.tag}c"
        self.nodes = [f"{self.tag}n{k}" for k in range(1, nodes + 1)]
        self.made = []

    def address(self, k):
        """The address of node ``k`` (1-based)."""
        return f"10.210.{k}.2"

    def up(self):
        for ns in [self.client, *self.nodes]:
            run("ip", "netns", "add", ns)
            self.made.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        for k, ns in enumerate(self.nodes, 1):
            run("ip", "link", "add", f"v{k}", "netns", self.client, "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            run("ip", "-n", self.client, "addr", "add", f"10.210.{k}.1/24", "dev", f"v{k}")
            run("ip", "-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", "eth0")
            run("ip", "-n", self.client, "link", "set", f"v{k}", "up")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
        return self

    def down(self):
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()

    def exec_prefix(self, ns):
        return ("ip", "netns", "exec", ns)

    # ---------------------------------------------------------------- faults

    def partition(self, ns, on=True):
        if on:
            run("ip", "netns", "exec", ns, "nft", "-f", "-", input="""
table inet dpf_part {
  chain in  { type filter hook input  priority -10; policy accept; iifname != "lo" drop; }
  chain out { type filter hook output priority -10; policy accept; oifname != "lo" drop; }
}""")
        else:
            run("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "dpf_part")

    def link(self, k, up):
        run("ip", "-n", self.nodes[k - 1], "link", "set", "eth0", "up" if up else "down")

    def loss(self, percent, namespaces=None):
        """Each namespace drops ``percent`` % of the packets it sends."""
        permyriad = int(round(percent * 100))
        for ns in namespaces or [self.client, *self.nodes]:
            run("ip", "netns", "exec", ns, "nft", "-f", "-", input=f"""
table inet dpf_loss {{
  chain out {{ type filter hook output priority 0; policy accept;
    oifname != "lo" numgen random mod 10000 < {permyriad} counter drop; }}
}}""")

    def dropped(self, ns):
        """Packets the loss rule of ``ns`` dropped so far."""
        text = run("ip", "netns", "exec", ns, "nft", "list", "table", "inet", "dpf_loss")
        words = text.split()
        return int(words[words.index("packets") + 1])


@contextlib.contextmanager
def lab_up(nodes=2):
    """A :class:`Lab` with ``nodes`` node namespaces, up; always torn down."""
    lab = Lab(nodes=nodes)
    try:
        yield lab.up()
    finally:
        lab.down()


@contextlib.contextmanager
def lab_nodes(lab, workdir, secret, cpus, stop):
    """start(k, port, args): dpool-node in the lab's node namespace k on its
    address (``node.addr``); each is ``stop(node)``-ed on exit."""
    started = []

    def start(k, port=0, args=()):
        node = start_node(workdir / f"n{k}", cpus=cpus, secret=secret, port=port,
                          prefix=lab.exec_prefix(lab.nodes[k - 1]),
                          args=["--host", lab.address(k), *args])
        node.addr = (lab.address(k), node.port)
        started.append(node)
        return node
    try:
        yield start
    finally:
        for node in started:
            stop(node)


class Host:
    """One host of a :class:`LanLab`: a network namespace, a UTS namespace
    (its own host name) and an address on one subnet."""

    def __init__(self, lab, name, address, subnet):
        self.name = name
        self.ns = f"{lab.tag}{name}"
        self.hostname = f"{name}-{lab.tag}"
        self.address = address
        self.subnet = subnet
        self.uts = f"{lab.state}/uts-{name}"

    def prefix(self):
        """A command prefix that runs a program on this host (``nsenter``
        execs in place: same pid)."""
        return ("nsenter", f"--net=/run/netns/{self.ns}", f"--uts={self.uts}", "--")

    def run(self, *cmd, input=None):
        return run(*self.prefix(), *cmd, input=input)

    def __repr__(self):
        return f"<Host {self.name} {self.hostname} {self.address}>"


class LanLab:
    """Hosts on two subnets, for discovery (needs root, ``ip``, ``nsenter``,
    ``unshare``; ``nft`` for the loss and counters).

    ::

        LAN 10.77.0.0/24 (bridge br0)              LAN2 10.78.0.0/24 (bridge br1)
          client .10   a .11  b .12  c .13           d .11 (node)   e .12 (relay)
          [extra .20, .21, ...]                      [extra2 .20, ...]
                     router .1  ─── ip_forward ───  router .1

    Every host is a network namespace plus a UTS namespace of its own, so
    ``socket.gethostname()`` in a program started with :meth:`Host.prefix`
    (or :meth:`prefix`) returns its :attr:`Host.hostname`.  Both bridges live
    in one namespace of their own: nothing is attached to the root
    namespace.  Broadcast works on each LAN; the router forwards unicast
    (and never broadcast).  ``extra`` names more hosts on the LAN (e.g. an
    attacker), ``extra2`` on LAN2.  Names carry the pid; :meth:`down` (the
    fixture always calls it) removes everything.
    """

    LAN, LAN2 = "10.77.0", "10.78.0"

    def __init__(self, nodes=("a", "b", "c"), remote=("d", "e"), extra=(), extra2=()):
        self.tag = f"dpl{os.getpid()}x{next(_labs)}"
        self.state = f"/run/{self.tag}"
        self.hosts = {}
        self._add("client", 10, self.LAN)
        for k, name in enumerate(nodes):
            self._add(name, 11 + k, self.LAN)
        for k, name in enumerate(extra):
            self._add(name, 20 + k, self.LAN)
        for k, name in enumerate(remote):
            self._add(name, 11 + k, self.LAN2)
        for k, name in enumerate(extra2):
            self._add(name, 20 + k, self.LAN2)
        self.bridge = f"{self.tag}br"
        self.router = f"{self.tag}r"
        self.made = []
        self.mounts = []

    def _add(self, name, last, subnet):
        self.hosts[name] = Host(self, name, f"{subnet}.{last}", subnet)

    def __getitem__(self, name):
        return self.hosts[name]

    def on(self, subnet):
        """The hosts on ``subnet`` (``LanLab.LAN`` or ``LanLab.LAN2``)."""
        return [h for h in self.hosts.values() if h.subnet == subnet]

    # ------------------------------------------------------------ up / down

    def up(self):
        try:
            os.makedirs(self.state)
            for ns in [self.bridge, self.router]:
                self._netns(ns)
            for br in ("br0", "br1"):
                run("ip", "-n", self.bridge, "link", "add", br, "type", "bridge",
                    "stp_state", "0", "mcast_snooping", "0")
                run("ip", "-n", self.bridge, "link", "set", br, "up")
            self._plug(self.router, "lan0", "br0", f"{self.LAN}.1", "r0")
            self._plug(self.router, "lan1", "br1", f"{self.LAN2}.1", "r1")
            run("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            for k, host in enumerate(self.hosts.values()):
                self._host(host, f"h{k}")
        except BaseException:
            self.down()
            raise
        return self

    def _netns(self, ns):
        run("ip", "netns", "add", ns)
        self.made.append(ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1")

    def _plug(self, ns, dev, bridge, address, port):
        """A veth from ``ns`` (as ``dev``, ``address``/24) to ``bridge``."""
        run("ip", "link", "add", port, "netns", self.bridge, "type", "veth",
            "peer", "name", dev, "netns", ns)
        run("ip", "-n", self.bridge, "link", "set", port, "master", bridge, "up")
        broadcast = address.rsplit(".", 1)[0] + ".255"
        run("ip", "-n", ns, "addr", "add", f"{address}/24", "brd", broadcast, "dev", dev)
        run("ip", "-n", ns, "link", "set", dev, "up")

    def _host(self, host, port):
        self._netns(host.ns)
        bridge = "br0" if host.subnet == self.LAN else "br1"
        self._plug(host.ns, "eth0", bridge, host.address, port)
        run("ip", "-n", host.ns, "route", "add", "default", "via", f"{host.subnet}.1")
        open(host.uts, "w").close()
        run("unshare", f"--uts={host.uts}", "hostname", host.hostname)
        self.mounts.append(host.uts)

    def down(self):
        for path in reversed(self.mounts):
            subprocess.run(["umount", path], capture_output=True, timeout=30)
        self.mounts.clear()
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()
        if os.path.isdir(self.state):
            for name in os.listdir(self.state):
                os.unlink(os.path.join(self.state, name))
            os.rmdir(self.state)

    # ---------------------------------------------------------------- tools

    def prefix(self, name):
        return self.hosts[name].prefix()

    def entered(self, name):
        """Run the calling thread in host ``name``'s network namespace (its
        host name stays the test process's own)."""
        return entered(self.hosts[name].ns)

    def route(self, on):
        """Let the router forward between the two subnets, or not."""
        run("ip", "netns", "exec", self.router, "sysctl", "-qw",
            f"net.ipv4.ip_forward={int(bool(on))}")

    def udp_loss(self, percent, names=None):
        """Each host (all by default) drops ``percent`` % of the UDP
        datagrams it receives from its LAN (nft ``numgen random`` on input,
        so senders see no error: as loss on the wire)."""
        permyriad = int(round(percent * 100))
        for name in names or self.hosts:
            self.hosts[name].run("nft", "-f", "-", input=f"""
table inet dpl_loss {{
  chain in {{ type filter hook input priority 0; policy accept;
    iifname != "lo" meta l4proto udp numgen random mod 10000 < {permyriad} counter drop; }}
}}""")

    def udp_dropped(self, name):
        """UDP datagrams :meth:`udp_loss` dropped on host ``name`` so far."""
        return _packets(self.hosts[name].run("nft", "list", "table", "inet", "dpl_loss"))

    def count(self, name, match=None):
        """Start counting the packets host ``name`` receives that match the
        nft expression ``match`` (default: unicast to its address, i.e. not
        broadcasts); :meth:`counted` reads the count."""
        host = self.hosts[name]
        match = match or f"ip daddr {host.address}"
        host.run("nft", "-f", "-", input=f"""
table inet dpl_count {{
  chain in {{ type filter hook input priority -20; policy accept; {match} counter; }}
}}""")

    def counted(self, name):
        return _packets(self.hosts[name].run("nft", "list", "table", "inet", "dpl_count"))


def _packets(nft_listing):
    words = nft_listing.split()
    return sum(int(words[i + 1]) for i, w in enumerate(words) if w == "packets")
