"""``dpool-scheduler``: several clients share one set of dpool-nodes.

    dpool-scheduler --nodes HOST[:PORT],... [--host 127.0.0.1] [--port 51351]
                    [--secret-file PATH] [--fifo] [--grace SECONDS] [--logfile PATH]
                    [--receive-budget BYTES] [--keep-results SECONDS]
                    [--certfile F --keyfile F [--cafile F]]
                    [--node-certfile F --node-keyfile F] [--node-cafile F]
    dpool-scheduler --nodes '*' ...   # the nodes discovery finds (or '10.77.*', ...)
    dpool-scheduler --version

To its clients (``SharedJobCluster``, and any Client, JobCluster, Executor
or Pool given its address) the scheduler is one node with all its nodes'
CPUs; it places their jobs on the nodes with equal shares while several
have work (see docs/scheduler.md).  The secret (``DPOOL_SECRET`` or
``--secret-file``) is the one of the nodes and of the clients.  SIGTERM
drains: no new clients, queued jobs go back to their clients, running jobs
get ``--grace`` seconds; a second SIGTERM, or SIGINT, stops at once.

TLS (docs/security.md): ``--certfile``/``--keyfile`` serve TLS to the
clients, ``--cafile`` then requires client certificates signed by it (as
dpool-node); ``--node-cafile`` verifies the nodes' certificates (TLS to the
nodes), ``--node-certfile``/``--node-keyfile`` are the scheduler's own
certificate for nodes that require one (as a client's cafile/certfile/keyfile).
"""
import asyncio
import logging
import os
import secrets
import sys

from .. import config
from ..core import discover
from ..core.broker import Broker
from ..core.client import tls_context
from ..transport import server_ssl_context
from ..hosts import is_loopback, parse_address
from . import common
from .node import GRACE

log = logging.getLogger("dpool.scheduler")


def parse_args(argv=None):
    p = common.new_parser("dpool-scheduler", __doc__)
    p.add_argument("--nodes", required=False, default=os.environ.get("DPOOL_NODES", ""),
                   help="the nodes, HOST[:PORT] separated by commas (default $DPOOL_NODES; "
                        f"port {config.NODE_PORT} if none); a host pattern ('*', '10.77.*', "
                        "fnmatch on a node's address or name) takes the nodes discovery finds "
                        "over UDP, also those joining later (docs/discovery.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=common.port, default=config.SCHEDULER_PORT,
                   help=f"TCP port (default {config.SCHEDULER_PORT}; 0 picks a free one)")
    p.add_argument("--secret-file", help="file holding the shared secret (else $DPOOL_SECRET)")
    p.add_argument("--name", help="scheduler name shown to clients (default: host name)")
    p.add_argument("--fifo", action="store_true",
                   help="run jobs in the order they were submitted, whoever submitted them "
                        "(default: equal shares of the CPUs among the clients with work, "
                        "or weighted by each client's session option 'weight')")
    p.add_argument("--grace", type=float, default=GRACE, metavar="SECONDS",
                   help=f"on SIGTERM, how long running jobs may take to finish (default "
                        f"{GRACE:g}); a second SIGTERM stops at once")
    p.add_argument("--certfile", help="TLS certificate (PEM) shown to the clients")
    p.add_argument("--keyfile", help="TLS private key (PEM) of --certfile")
    p.add_argument("--cafile", help="CA that client certificates must be signed by "
                                    "(makes client certificates required)")
    p.add_argument("--node-certfile", help="TLS certificate (PEM) shown to nodes that "
                                           "require one (TLS to the nodes)")
    p.add_argument("--node-keyfile", help="TLS private key (PEM) of --node-certfile")
    p.add_argument("--node-cafile", help="CA that the nodes' certificates are checked "
                                         "against (TLS to the nodes; the system CAs if only "
                                         "--node-certfile is given)")
    p.add_argument("--keep-results", type=float, default=None, metavar="SECONDS",
                   help="how long the jobs and results of a recoverable client (recover_file) "
                        "are kept after it went away (default 3600)")
    common.add_receive_budget(p, "scheduler")
    common.add_loglevel(p)
    common.add_logfile(p)
    common.add_version(p)
    return p.parse_args(argv)


def node_list(text):
    """``"a:1,b"`` -> [("a", 1), ("b", NODE_PORT)]; ValueError when empty or bad.
    Patterns (``*``, ``10.77.*``) are included: see :func:`split_patterns`."""
    nodes = [parse_address(part.strip(), config.NODE_PORT)
             for part in text.split(",") if part.strip()]
    if not nodes:
        raise ValueError("no nodes given: --nodes HOST[:PORT],... or a pattern such as '*' "
                         "(or $DPOOL_NODES)")
    return nodes


def split_patterns(nodes):
    """(addresses, patterns) of :func:`node_list`'s nodes."""
    return ([n for n in nodes if not discover.is_pattern(n[0])],
            [n for n in nodes if discover.is_pattern(n[0])])


def discovery_for(patterns, secret):
    """The scheduler's discovery settings (``$DPOOL_DISCOVER_TO`` and
    ``$DPOOL_ANNOUNCE_PORT`` as for a client), or None without patterns."""
    if not patterns:
        return None
    return discover.settings(patterns, secret, patterns[0][1])


def find_secret(args, nodes):
    """The secret (bytes), or raise ValueError saying how to give one."""
    if args.secret_file:
        return config.read_secret_file(args.secret_file)
    secret = config.env_secret()
    if secret:
        return secret
    if is_loopback(args.host):
        try:  # loopback nodes leave theirs in ~/.dpool
            return config.secret_for(None, nodes)
        except ValueError:
            return secrets.token_hex(32).encode()
    raise ValueError(f"refusing to listen on {args.host} without a secret: set "
                     f"DPOOL_SECRET or --secret-file PATH (the nodes' secret)")


def tls_contexts(args):
    """(towards the clients, towards the nodes): TLS contexts or None."""
    if (args.keyfile or args.cafile) and not args.certfile:
        raise ValueError("--keyfile and --cafile need --certfile")
    ssl = server_ssl_context(args.certfile, args.keyfile, cafile=args.cafile,
                             require_client_cert=bool(args.cafile)) if args.certfile else None
    if args.node_keyfile and not args.node_certfile:
        raise ValueError("--node-keyfile needs --node-certfile")
    return ssl, tls_context(args.node_cafile, args.node_certfile, args.node_keyfile)


def main(argv=None):
    args = parse_args(argv)
    common.start_logging(args)
    try:
        nodes, patterns = split_patterns(node_list(args.nodes))
        if patterns and not args.secret_file and not config.env_secret():
            raise ValueError(f"discovering nodes ({args.nodes}) needs their secret: set "
                             f"DPOOL_SECRET or --secret-file PATH")
        secret = find_secret(args, nodes)
        found = discovery_for(patterns, secret)
    except (OSError, ValueError) as exc:
        print(f"dpool-scheduler: {exc}", file=sys.stderr)
        return 2
    try:
        ssl, node_ssl = tls_contexts(args)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        print(f"dpool-scheduler: cannot set up TLS: {exc}", file=sys.stderr)
        return 2
    broker = Broker(nodes, secret=secret, name=args.name, fifo=args.fifo, ssl=ssl,
                    node_ssl=node_ssl, receive_budget=args.receive_budget, discovery=found,
                    **({} if args.keep_results is None else {"keep_results": args.keep_results}))
    try:
        asyncio.run(_serve(broker, args))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"dpool-scheduler: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(broker, args):
    stop, drain = common.drain_signals()
    try:
        await broker.start(args.host, args.port)
        if is_loopback(args.host) and not args.secret_file and not config.env_secret():
            config.write_local_secret(broker.port, broker.secret)
    except BaseException:
        await broker.close()
        raise
    ready = broker.ready_nodes()
    print(f"dpool-scheduler: {len(ready)} of {len(broker.ports)} nodes ready, "
          f"{broker.total_cpus()} CPUs, on {args.host}:{broker.port} (pid {os.getpid()})",
          flush=True)
    log.info("listening on %s:%s: %d of %d nodes ready (%d CPUs)", args.host, broker.port,
             len(ready), len(broker.ports), broker.total_cpus())
    try:
        await common.until_first(stop.wait(), drain.wait())
        if not stop.is_set():
            log.info("SIGTERM: draining (a second SIGTERM or SIGINT stops at once)")
            await common.until_first(stop.wait(), broker.drain(args.grace))
    finally:
        await broker.close()
        log.info("scheduler shut down")


if __name__ == "__main__":
    sys.exit(main())
