"""What the two stdlib drop-ins (:mod:`dpool.futures`, :mod:`dpool.pool`)
share: where their nodes are, how their client starts, argument checks."""
import itertools
import os
import sys

from . import config
from .dispy.depends import code_files, file_messages
from .hosts import is_pattern, parse_address

NODES_ENV = "DPOOL_NODES"


def node_addresses(nodes):
    """``"host:port,host"`` or a list of ``(host, port)``/``"host:port"`` ->
    list of ``(host, port)``; a missing port is dpool-node's default.
    Hosts may be patterns (``*``, ``10.77.*``): see :func:`split_patterns`."""
    if isinstance(nodes, str):
        nodes = [part for part in nodes.split(",") if part.strip()]
    elif isinstance(nodes, tuple) and len(nodes) == 2 and isinstance(nodes[1], int):
        nodes = [nodes]
    out = [parse_address(node, config.NODE_PORT) for node in nodes]
    if not out:
        raise ValueError("nodes is empty: give at least one (host, port)")
    return out


def where_to_run(nodes, scheduler):
    """The addresses to connect to: ``nodes``, else a scheduler's
    (``scheduler``, else ``$DPOOL_SCHEDULER``), else ``$DPOOL_NODES``;
    None: an embedded node."""
    if nodes is not None and scheduler is not None:
        raise ValueError("give nodes or scheduler, not both")
    if nodes is None and scheduler is None and os.environ.get(config.SCHEDULER_ENV, "").strip():
        scheduler = os.environ[config.SCHEDULER_ENV]
    if scheduler is not None:
        return [config.scheduler_address(scheduler)]
    if nodes is None and os.environ.get(NODES_ENV, "").strip():
        nodes = os.environ[NODES_ENV]
    return None if nodes is None else node_addresses(nodes)


def split_patterns(addresses):
    """``(host, port)`` list -> (named nodes, patterns to discover over UDP)."""
    return ([a for a in addresses if not is_pattern(a[0])],
            [a for a in addresses if is_pattern(a[0])])


def discovery_for(patterns, secret):
    """The client's discovery settings for ``patterns`` (None if there are none)."""
    if not patterns:
        return None
    from .core import discover  # (UDP discovery: imported by those that use it)

    return discover.settings(patterns, secret, patterns[0][1])


def start_client(workers, nodes, secret, max_tasks, initializer, initargs,
                 process_name="ForkProcess", depends=None, connect_timeout=None,
                 heartbeat=None, tls=(None, None, None), scheduler=None):
    """The started :class:`Client` behind an Executor or a Pool.

    ``workers`` is the embedded node's process count, or with remote nodes
    the most CPUs to use on each node (None: all of them); ``scheduler``
    ("host[:port]") runs the jobs through a dpool-scheduler (see where_to_run).  The workers
    are named ``process_name-N`` (``multiprocessing.current_process().name``).
    ``depends`` (modules, file paths) are written into each remote node's
    session folder, on the workers' ``sys.path``, before any job; local
    workers already import what this process imports.  ``connect_timeout``
    and ``heartbeat`` are the client core's (see :class:`dpool.core.client.Client`);
    ``tls`` is ``(cafile, certfile, keyfile)`` for the connections to remote
    nodes (see :func:`dpool.core.client.tls_context`).
    """
    files = code_files(depends)
    addresses = where_to_run(nodes, scheduler)
    session = {"max_tasks": max_tasks, "capture": False, "process_name": process_name}
    local = dict(session, cwd=os.getcwd())
    messages = file_messages(files)

    def prepare(link):  # remote nodes, added later ones too, get the depends files
        return (local, ()) if link.address == "embedded" else (session, messages)

    addresses, patterns = (None, []) if addresses is None else split_patterns(addresses)
    if addresses is not None and workers:
        session["cpus"] = workers
    secret = _secret(secret, addresses, patterns, tls)
    early = _begin_early(addresses, secret, tls)
    try:
        from .core.client import Client, tls_context  # (after _begin_early: see there)

        if early is not None:
            _import_for_the_handshake()

        client = Client(addresses, cpus=workers if addresses is None else None,
                        session=session, secret=secret, initializer=initializer,
                        initargs=initargs, ssl=tls_context(*tls), prepare=prepare,
                        connect_timeout=connect_timeout, heartbeat=heartbeat,
                        discovery=discovery_for(patterns, secret))
        if files:
            from .dispy.env import JobEnv

            JobEnv(client)  # the nodes answer each file (FileDone)
        return client.start()
    finally:
        if early is not None:
            early.close()


def _begin_early(addresses, secret, tls):
    """In a fresh process (the client core not imported yet), its first
    node's connection begun in a thread, which stretches the secret for the
    node's salt while this thread imports the client core (asyncio, ...):
    see :mod:`dpool.transport.early`.  Plain TCP only; None otherwise."""
    if not addresses or not secret or any(tls) or "dpool.core.client" in sys.modules:
        return None
    from .transport import early

    host, port = addresses[0]
    return early.begin(host, port, bytes(secret))


def _import_for_the_handshake():
    """What a client's first handshake imports after its stretch (the sealed
    records' cryptography, cloudpickle for the hello's versions), imported
    here during the early connection's stretch instead."""
    from . import serialize
    from .transport.auth import import_crypto_meanwhile

    import_crypto_meanwhile()
    serialize.runtime_versions()


def _secret(secret, addresses, patterns, tls):
    if addresses is None:
        return None
    if patterns and not addresses:
        return config.discovery_secret(secret, patterns[0][1])
    return config.secret_for(secret, addresses, client_cert=bool(tls[1]))


def total_cpus(client):
    return sum(link.cpus for link in client.nodes()) or 1


def add_nodes(client, nodes, secret=None):
    """Connect a running client to more nodes; returns how many joined now.

    The others (not answering yet) are retried in the background with
    backoff, as a lost node is, and used once they answer; a node that
    refuses (wrong secret) raises nothing here and is logged, one busy with
    another client is waited for (up to the connect timeout); one this
    client already uses is left as it is.
    """
    addresses, patterns = split_patterns(node_addresses(nodes))
    if client.secret is None:  # an embedded-only client: find the nodes' secret now
        client.secret = _secret(secret, addresses, patterns, (None, None, None))
    if patterns:
        client.discover(patterns, client.secret, patterns[0][1])
    # A node already in use (or being retried) is left as it is: a second
    # session there would only be told the node is busy (with this client).
    addresses = client.call(lambda: [address for address in dict.fromkeys(addresses)
                                     if not client.knows(address)])
    links = client.add_nodes(addresses) if addresses else []
    return sum(1 for link in links if link.ready)


def check_initializer(initializer):
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")


def chunks_of(iterable, n):
    """Chunks of up to ``n`` items of ``iterable``, its items as iteration
    gives them: a list's, a tuple's or a ``range``'s slices (quicker than
    taking the items one by one; a range's slices are ranges, three ints on
    the wire, taken without ``len()``, which past ``sys.maxsize`` raises),
    any other's items in turn as lists (slicing is not iterating: a dict on
    3.12+ takes a slice as a key, a DataFrame slices rows)."""
    if type(iterable) in (list, tuple):
        for i in range(0, len(iterable), n):
            yield iterable[i:i + n]
        return
    if type(iterable) is range:
        for i in itertools.count(0, n):
            if not (chunk := iterable[i:i + n]):
                return
            yield chunk
        return
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, n)):
        yield chunk
