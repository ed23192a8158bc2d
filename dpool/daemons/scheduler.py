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
import sys

from .. import config
from ..core import schedsetup
from ..hosts import is_loopback
from . import common
from ..transport.streams import new_event_loop
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


def main(argv=None):
    args = parse_args(argv)
    common.start_logging(args)
    tls = {key: getattr(args, key) for key in ("certfile", "keyfile", "cafile", "node_certfile",
                                               "node_keyfile", "node_cafile")}
    options = {} if args.keep_results is None else {"keep_results": args.keep_results}
    try:
        broker = schedsetup.make_broker(args.nodes, args.host, args.secret_file, tls,
                                        name=args.name, fifo=args.fifo,
                                        receive_budget=args.receive_budget, **options)
    except schedsetup.SetupError as exc:
        print(f"dpool-scheduler: {exc}", file=sys.stderr)
        return 2
    try:
        # (the counting loop, as dpool-node's: a stream corks the messages
        # after a loop pass's first without a callback per lone message)
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve(broker, args))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"dpool-scheduler: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(broker, args):
    stop, drain = common.drain_signals()
    local_secret = is_loopback(args.host) and not args.secret_file and not config.env_secret()
    await schedsetup.start(broker, args.host, args.port, local_secret)
    await common.serve_until_stopped(broker, args.grace, stop, drain)
    log.info("scheduler shut down")


if __name__ == "__main__":
    sys.exit(main())
