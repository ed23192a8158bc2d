"""Throwaway hosts in network namespaces for the fault matrix (needs root,
``ip`` from iproute2 and ``nft`` from nftables).

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
import subprocess

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_labs = itertools.count(1)


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
