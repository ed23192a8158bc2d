"""``dpool-node``: serve this host's CPUs to authenticated dpool clients.

    dpool-node [--host 127.0.0.1] [--port 51350] [--cpus N] [--secret-file PATH]
               [--certfile F --keyfile F [--cafile F]] [--dest-path DIR]
               [--keep-results SECONDS] [--receive-budget BYTES] [--grace SECONDS]
               [--logfile PATH]
    dpool-node --generate-secret [--secret-file NEW-PATH]
    dpool-node --version

The secret comes from ``DPOOL_SECRET`` or ``--secret-file``, never from the
command line.  On loopback with no secret the node makes one and leaves it
(mode 0600) in ``~/.dpool/node-PORT.secret`` (``$DPOOL_HOME`` if set), where
local clients find it.  Any other address needs a secret (or mutual TLS).

SIGTERM drains: the node accepts no more clients, its clients move their
queued jobs elsewhere, running jobs get ``--grace`` seconds to finish; a
second SIGTERM, or SIGINT, stops at once (running jobs are killed and rerun
elsewhere by their clients).
"""
import asyncio
import logging
import os
import sys

from .. import config
from ..hosts import is_loopback
from ..node.files import default_job_root, private_dir
from ..node.server import NodeServer
from ..transport import udp
from ..transport.streams import new_event_loop
from . import common

log = logging.getLogger("dpool.node")

GRACE = 30.0  # seconds running jobs get on SIGTERM


def parse_args(argv=None):
    p = common.new_parser("dpool-node", __doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=common.port, default=config.NODE_PORT,
                   help=f"TCP port (default {config.NODE_PORT}; 0 picks a free one)")
    p.add_argument("--cpus", type=int, default=0,
                   help="CPUs to serve: 0 = all (default), negative = leave that many free")
    p.add_argument("--secret-file", help="file holding the shared secret (else $DPOOL_SECRET)")
    p.add_argument("--certfile", help="TLS certificate (PEM)")
    p.add_argument("--keyfile", help="TLS private key (PEM)")
    p.add_argument("--cafile", help="CA that client certificates must be signed by "
                                    "(makes client certificates required)")
    p.add_argument("--dest-path", help="folder for job folders, made private to this user "
                                       "(default: dpool-UID in the temp folder)")
    p.add_argument("--name", help="node name shown to clients (default: host name)")
    p.add_argument("--keep-results", type=float, default=None, metavar="SECONDS",
                   help="how long the jobs and results of a recoverable session (JobCluster "
                        "recover_file) are kept after its client went away (default 3600)")
    common.add_receive_budget(p, "node")
    p.add_argument("--grace", type=float, default=GRACE, metavar="SECONDS",
                   help=f"on SIGTERM, how long running jobs may take to finish before they "
                        f"are killed (default {GRACE:g}); a second SIGTERM kills at once")
    p.add_argument("--ext-host", "--ext-ip-addr", action="append", default=[], metavar="HOST",
                   help="address clients should connect to, announced instead of this "
                        "node's own (a node behind NAT); may be repeated")
    p.add_argument("--discovery-port", type=common.port, default=None, metavar="PORT",
                   help="UDP port answering discovery pings (default: the TCP port's number)")
    p.add_argument("--announce-port", type=common.port, default=udp.LISTEN_PORT, metavar="PORT",
                   help=f"UDP port the node's start announcement goes to (clients listen "
                        f"there; default {udp.LISTEN_PORT})")
    p.add_argument("--multicast", action="store_true",
                   help=f"also announce to, and answer pings sent to, the multicast group "
                        f"{udp.MULTICAST_GROUP}")
    p.add_argument("--no-discovery", dest="discover", action="store_false",
                   help="neither announce this node nor answer discovery pings (clients "
                        "must name it)")
    common.add_loglevel(p)
    p.add_argument("--generate-secret", action="store_true",
                   help="print a new strong secret (256 random bits) and exit; with "
                        "--secret-file PATH, write it to that new file (mode 0600) instead")
    common.add_logfile(p)
    common.add_version(p)
    return p.parse_args(argv)


def load_secret(args):
    """The secret, or an error message saying how to give one."""
    if args.secret_file:
        return config.read_secret_file(args.secret_file), None
    secret = config.env_secret()
    if secret:
        return secret, None
    if is_loopback(args.host):
        return None, None  # made once we know the port
    if args.cafile and args.certfile:
        return b"", None  # mutual TLS authenticates the clients
    return None, (f"dpool-node: refusing to listen on {args.host} without a secret.\n"
                  f"Set one with the DPOOL_SECRET environment variable or --secret-file PATH "
                  f"(the same secret the clients use), or use mutual TLS "
                  f"(--certfile, --keyfile and --cafile).")


def generate_secret(args):
    """``--generate-secret``: print one, or write it to a new 0600 file."""
    secret = config.generate_secret()
    if not args.secret_file:
        print(secret.decode(), flush=True)
        return 0
    try:
        config.write_new_secret_file(args.secret_file, secret)
    except OSError as exc:
        print(f"dpool-node: cannot write the secret file: {exc.strerror or exc}: "
              f"{args.secret_file} (an existing file is never overwritten)", file=sys.stderr)
        return 1
    print(f"dpool-node: wrote a new secret to {args.secret_file} (mode 0600)", flush=True)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.generate_secret:
        return generate_secret(args)
    common.start_logging(args)
    try:
        secret, error = load_secret(args)
    except (OSError, ValueError) as exc:
        error = f"dpool-node: cannot read the secret: {exc}"
    if error:
        print(error, file=sys.stderr)
        return 2
    try:
        dest_root = private_dir(args.dest_path or default_job_root())
    except OSError as exc:
        print(f"dpool-node: cannot use the job folder: {exc}", file=sys.stderr)
        return 2
    cpus = config.resolve_cpus(args.cpus)
    server = NodeServer(args.host, args.port, cpus=cpus, secret=secret, name=args.name,
                        dest_root=dest_root, certfile=args.certfile, keyfile=args.keyfile,
                        cafile=args.cafile, keep_results=args.keep_results,
                        receive_budget=args.receive_budget, discover=args.discover,
                        ext_hosts=args.ext_host, udp_port=args.discovery_port,
                        listen_port=args.announce_port, multicast=args.multicast)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve(server, args.grace))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # e.g. the port is taken
        if exc.filename:    # not the socket: e.g. the secret file's folder
            print(f"dpool-node: cannot start: {exc.strerror or exc}: {exc.filename}",
                  file=sys.stderr)
            return 1
        print(f"dpool-node: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


async def _serve(server, grace):
    stop, drain = common.drain_signals()
    try:
        await server.start()
    except BaseException:
        await server.close()
        raise
    print(f"dpool-node: serving {server.cpus} CPUs on {server.host}:{server.port} "
          f"(pid {os.getpid()})",
          flush=True)
    log.info("serving %d CPUs on %s:%s (pid %d)", server.cpus, server.host, server.port,
             os.getpid())
    await common.serve_until_stopped(server, grace, stop, drain)


if __name__ == "__main__":
    sys.exit(main())
