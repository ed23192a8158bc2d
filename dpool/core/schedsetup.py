"""What ``dpool-scheduler`` does between its flags and its event loop: the
nodes and patterns of ``--nodes``, the secret, the TLS contexts, the Broker
(broker.py), and serving until stopped or drained.  The daemon
(dpool/daemons/scheduler.py) only parses flags, logs and handles signals."""
from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from .. import config
from ..hosts import is_loopback, parse_address
from ..transport import server_ssl_context
from . import discover
from .broker import Broker
from .client import tls_context

log = logging.getLogger("dpool.scheduler")

Address = tuple[str, int]


class SetupError(ValueError):
    """A flag or setting the scheduler cannot start with (exit status 2)."""


def node_list(text: str) -> list[Address]:
    """``"a:1,b"`` -> [("a", 1), ("b", NODE_PORT)]; ValueError when empty or bad.
    Patterns (``*``, ``10.77.*``) are included: see :func:`split_patterns`."""
    nodes = [parse_address(part.strip(), config.NODE_PORT)
             for part in text.split(",") if part.strip()]
    if not nodes:
        raise ValueError("no nodes given: --nodes HOST[:PORT],... or a pattern such as '*' "
                         "(or $DPOOL_NODES)")
    return nodes


def split_patterns(nodes: list[Address]) -> tuple[list[Address], list[Address]]:
    """(addresses, patterns) of :func:`node_list`'s nodes."""
    return ([n for n in nodes if not discover.is_pattern(n[0])],
            [n for n in nodes if discover.is_pattern(n[0])])


def discovery_for(patterns: list[Address], secret: bytes) -> discover.Discovery | None:
    """The scheduler's discovery settings (``$DPOOL_DISCOVER_TO`` and
    ``$DPOOL_ANNOUNCE_PORT`` as for a client), or None without patterns."""
    if not patterns:
        return None
    return discover.settings(patterns, secret, patterns[0][1])


def find_secret(secret_file: str | None, host: str, nodes: list[Address]) -> bytes:
    """The secret, or raise ValueError saying how to give one."""
    if secret_file:
        return config.read_secret_file(secret_file)
    secret = config.env_secret()
    if secret:
        return secret
    if is_loopback(host):
        try:  # loopback nodes leave theirs in ~/.dpool
            return config.secret_for(None, nodes)
        except ValueError:
            return secrets.token_hex(32).encode()
    raise ValueError(f"refusing to listen on {host} without a secret: set "
                     f"DPOOL_SECRET or --secret-file PATH (the nodes' secret)")


def tls_contexts(certfile: str | None = None, keyfile: str | None = None,
                 cafile: str | None = None, node_certfile: str | None = None,
                 node_keyfile: str | None = None, node_cafile: str | None = None
                 ) -> tuple[Any, Any]:
    """(towards the clients, towards the nodes): TLS contexts or None."""
    if (keyfile or cafile) and not certfile:
        raise ValueError("--keyfile and --cafile need --certfile")
    ssl = server_ssl_context(certfile, keyfile, cafile=cafile,
                             require_client_cert=bool(cafile)) if certfile else None
    if node_keyfile and not node_certfile:
        raise ValueError("--node-keyfile needs --node-certfile")
    return ssl, tls_context(node_cafile, node_certfile, node_keyfile)


def make_broker(nodes_text: str, host: str, secret_file: str | None = None,
                tls: dict | None = None, **options: Any) -> Broker:
    """The Broker ``dpool-scheduler --nodes NODES_TEXT --host HOST ...``
    runs; SetupError saying what is wrong (a bad flag, no secret, TLS files
    that do not load).  ``options``: the Broker's (name, fifo, ...)."""
    try:
        nodes, patterns = split_patterns(node_list(nodes_text))
        if patterns and not secret_file and not config.env_secret():
            raise ValueError(f"discovering nodes ({nodes_text}) needs their secret: set "
                             f"DPOOL_SECRET or --secret-file PATH")
        secret = find_secret(secret_file, host, nodes)
        found = discovery_for(patterns, secret)
    except (OSError, ValueError) as exc:
        raise SetupError(str(exc)) from exc
    try:
        ssl, node_ssl = tls_contexts(**(tls or {}))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise SetupError(f"cannot set up TLS: {exc}") from exc
    return Broker(nodes, secret=secret, ssl=ssl, node_ssl=node_ssl, discovery=found,
                  **options)


async def start(broker: Broker, host: str, port: int, local_secret: bool) -> None:
    """Start ``broker`` on host:port (closed again if that fails) and say
    so; ``local_secret``: leave the secret in ~/.dpool for local clients
    (loopback, no secret given)."""
    try:
        await broker.start(host, port)
        if local_secret:
            config.write_local_secret(broker.port, broker.secret)
    except BaseException:
        await broker.close()
        raise
    ready = broker.ready_nodes()
    print(f"dpool-scheduler: {len(ready)} of {len(broker.ports)} nodes ready, "
          f"{broker.total_cpus()} CPUs, on {host}:{broker.port} (pid {os.getpid()})",
          flush=True)
    log.info("listening on %s:%s: %d of %d nodes ready (%d CPUs)", host, broker.port,
             len(ready), len(broker.ports), broker.total_cpus())
