"""``dpool-scheduler``: several clients share one set of dpool-nodes.

    dpool-scheduler --nodes HOST[:PORT],... [--host 127.0.0.1] [--port 51351]
                    [--secret-file PATH] [--fifo] [--grace SECONDS] [--logfile PATH]
    dpool-scheduler --version

To its clients (``SharedJobCluster``, and any Client, JobCluster, Executor
or Pool given its address) the scheduler is one node with all its nodes'
CPUs; it places their jobs on the nodes with equal shares while several
have work (see docs/scheduler.md).  The secret (``DPOOL_SECRET`` or
``--secret-file``) is the one of the nodes and of the clients.  SIGTERM
drains: no new clients, queued jobs go back to their clients, running jobs
get ``--grace`` seconds; a second SIGTERM, or SIGINT, stops at once.
"""
import asyncio
import logging
import os
import secrets
import sys

from .. import config
from ..core.broker import Broker
from ..hosts import is_loopback, parse_address
from . import common
from .node import GRACE

log = logging.getLogger("dpool.scheduler")


def parse_args(argv=None):
    p = common.new_parser("dpool-scheduler", __doc__)
    p.add_argument("--nodes", required=False, default=os.environ.get("DPOOL_NODES", ""),
                   help="the nodes, HOST[:PORT] separated by commas (default $DPOOL_NODES; "
                        f"port {config.NODE_PORT} if none)")
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
    common.add_loglevel(p)
    common.add_logfile(p)
    common.add_version(p)
    return p.parse_args(argv)


def node_list(text):
    """``"a:1,b"`` -> [("a", 1), ("b", NODE_PORT)]; ValueError when empty or bad."""
    nodes = [parse_address(part.strip(), config.NODE_PORT)
             for part in text.split(",") if part.strip()]
    if not nodes:
        raise ValueError("no nodes given: --nodes HOST[:PORT],... (or $DPOOL_NODES)")
    return nodes


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


def main(argv=None):
    args = parse_args(argv)
    common.start_logging(args)
    try:
        nodes = node_list(args.nodes)
        secret = find_secret(args, nodes)
    except (OSError, ValueError) as exc:
        print(f"dpool-scheduler: {exc}", file=sys.stderr)
        return 2
    broker = Broker(nodes, secret=secret, name=args.name, fifo=args.fifo)
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
