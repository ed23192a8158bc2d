"""A node as a network service: the transport's server around a NodeRuntime.

Used by ``dpool-node`` (and by tests, which run it in-process on port 0).
Each authenticated connection becomes a session of the runtime; everything
runs on the caller's event loop.
"""
import logging
import secrets

from .. import config, serialize
from ..hosts import is_loopback
from ..transport import PROTOCOL_VERSION, server_ssl_context, start_server
from ..transport import discovery, udp
from ..transport.budget import ReceiveBudget
from .runtime import NodeRuntime
from .status import start_measuring

log = logging.getLogger("dpool.node")

# Seconds a stopping node waits for a peer to read more of what is queued
# for it: a peer that reads nothing (say half-closed, FIN sent) is cut off
# then, instead of holding the stop for the stream's CLOSE_TIMEOUT (10 s).
SHUTDOWN_STALL = 1.0


class NodeServer:
    def __init__(self, host="127.0.0.1", port=config.NODE_PORT, *, cpus, secret=None,
                 name=None, dest_root=None, certfile=None, keyfile=None, cafile=None,
                 keep_results=None, receive_budget=None, discover=True, ext_hosts=(),
                 udp_port=None, announce_to=None, listen_port=udp.LISTEN_PORT,
                 multicast=False):
        self.host = host
        self.port = port
        self.cpus = cpus
        self.secret = secret
        self.runtime = NodeRuntime(cpus, name=name, dest_root=dest_root,
                                   keep_results=keep_results)
        start_measuring()  # (the first STATUS's cpu_busy measured from here)
        self.ssl = None
        if certfile:
            self.ssl = server_ssl_context(certfile, keyfile, cafile=cafile,
                                          require_client_cert=bool(cafile))
        self.server = None
        self.secret_path = None
        self.receive_budget = receive_budget   # bytes; None: the transport's default
        # Discovery (docs/discovery.md): UDP on udp_port (default: the TCP port's
        # number); ext_hosts are the addresses announced instead of ours (NAT).
        self.discover = discover
        self.ext_hosts = list(ext_hosts or ())
        self.udp_port = udp_port
        self.discovery_options = dict(announce_to=announce_to, listen_port=listen_port,
                                      multicast=multicast)
        self.responder = None

    def hello(self):
        return {"protocol": PROTOCOL_VERSION, "role": "node", "name": self.runtime.name,
                "cpus": self.runtime.cpus, "free_cpus": self.runtime.free_cpus,
                **serialize.runtime_versions()}

    async def start(self):
        local_secret = self.secret is None
        if local_secret:
            if not is_loopback(self.host):
                raise ValueError(f"a node listening on {self.host} needs a secret")
            self.secret = (config.find_local_secret(self.port) if self.port else None) \
                or secrets.token_hex(32).encode()
        await self.runtime.start()
        budget = ReceiveBudget(self.receive_budget) if self.receive_budget else None
        self.server = await start_server(self.runtime.accept, self.host, self.port,
                                         secret=self.secret, hello=self.hello, ssl=self.ssl,
                                         receive_budget=budget)
        self.port = self.server.port
        if local_secret:
            self.secret_path = config.write_local_secret(self.port, self.secret)
            log.info("no secret given: local clients read it from %s", self.secret_path)
        if self.discover:
            await self._start_discovery()
        return self

    def discovery_body(self):
        if self.ext_hosts or self.host not in ("", "0.0.0.0", "::"):
            addrs = self.ext_hosts or [self.host]
        else:   # all addresses: IPv4 ones listed, IPv6 (scoped) ones: the source
            addrs = udp.local_addresses() if self.host != "::" else []
        return discovery.node_body(self.runtime.name, self.port, self.runtime.cpus,
                                   self.runtime.free_cpus, addrs, PROTOCOL_VERSION,
                                   node_id=self.runtime.node_id)

    async def _start_discovery(self):
        """Answer pings and announce this node (UDP); a node that can't
        (no secret, port taken) still serves the clients that name it."""
        if not self.secret:
            log.info("discovery is off: it needs a shared secret")
            return
        port = self.port if self.udp_port is None else self.udp_port
        own_addresses = not self.ext_hosts and self.host in ("", "0.0.0.0")
        try:
            self.responder = await udp.Responder(
                discovery.discovery_key(self.secret), self.discovery_body, self.host, port,
                facing_first=own_addresses, **self.discovery_options).start()
        except OSError as exc:
            log.warning("discovery is off: cannot use UDP port %d on %s: %s", port,
                        self.host, exc.strerror or exc)
            return
        log.info("discovery: answering pings on UDP %s:%d", self.host, self.responder.udp_port)

    def _stop_discovery(self):
        if self.responder is not None:
            self.responder.close()
            self.responder = None

    async def drain(self, grace):
        """Graceful stop: accept no more clients; running jobs get ``grace``
        seconds; clients move queued jobs elsewhere.  Then :meth:`close`."""
        self._stop_discovery()
        if self.server is not None:
            self.server.close()  # stops listening; sessions go on
        await self.runtime.drain(grace)

    async def close(self):
        """Stop: no more clients, the sessions ended (their last messages
        queued), then each connection's output sent, but for a peer that
        stopped reading (``SHUTDOWN_STALL``): the caller's loop may end as
        this returns (dpool-node)."""
        self._stop_discovery()
        if self.server is not None:
            self.server.close()
        await self.runtime.close()
        if self.server is not None:
            await self.server.wait_closed(stall=SHUTDOWN_STALL)
