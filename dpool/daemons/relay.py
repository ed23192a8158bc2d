"""``dpool-relay``: pass discovery across a router (see :mod:`dpool.core.relay`).

    dpool-relay [--client HOST[:PORT]]... [--host ADDRESS] [--port 51352]
                [--node-port 51350] [--listen-port 51351] [--interval SECONDS]
                [--secret-file PATH] [--loglevel LEVEL] [--logfile PATH]
    dpool-relay --version

Run it on a host of the nodes' subnet, with the nodes' secret (from
``DPOOL_SECRET`` or ``--secret-file``, never the command line).  It hears
the nodes' announcements and pongs there and announces them to each
``--client`` (at PORT, default 51351, where clients listen) and to the
clients that ping it on ``--port``.  SIGTERM or SIGINT stops it; it keeps
nothing that a restart would lose for good.
"""
import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from .. import config
from ..core.relay import INTERVAL, Relay
from ..hosts import parse_address
from ..transport import discovery, udp
from . import common

log = logging.getLogger("dpool.relay")


def _client(text):
    """``HOST[:PORT]`` -> (IPv4 address, port), resolved once here: the relay
    sends over IPv4, and a name that does not resolve (or an IPv6 client)
    would otherwise be dropped at every send with only a DEBUG line."""
    try:
        host, port = parse_address(text, udp.LISTEN_PORT)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if ":" in host:
        raise argparse.ArgumentTypeError(f"{text}: IPv6 clients are not supported (the relay "
                                         f"announces over IPv4); give an IPv4 address or name")
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot resolve {host!r} to an IPv4 address: "
                                         f"{exc.strerror or exc}") from None
    return infos[0][4][0], port


def _interval(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def parse_args(argv=None):
    p = common.new_parser("dpool-relay", __doc__)
    p.add_argument("--client", type=_client, action="append", default=[],
                   metavar="HOST[:PORT]",
                   help=f"a client or scheduler to announce the nodes to, at its announcement "
                        f"port (default {udp.LISTEN_PORT}); may be repeated")
    p.add_argument("--host", default="",
                   help="address to bind, whose interface's subnet is pinged (default: all "
                        "interfaces)")
    p.add_argument("--port", type=common.port, default=config.RELAY_PORT,
                   help=f"UDP port clients may ping the relay on (default {config.RELAY_PORT})")
    p.add_argument("--node-port", type=common.port, default=config.NODE_PORT,
                   help=f"UDP port the nodes answer pings on (default {config.NODE_PORT})")
    p.add_argument("--listen-port", type=common.port, default=udp.LISTEN_PORT,
                   help=f"UDP port the nodes announce themselves to (default "
                        f"{udp.LISTEN_PORT})")
    p.add_argument("--interval", type=_interval, default=INTERVAL, metavar="SECONDS",
                   help=f"seconds between pings of the subnet (default {INTERVAL:g})")
    p.add_argument("--secret-file", help="file holding the nodes' secret (else $DPOOL_SECRET)")
    common.add_loglevel(p)
    common.add_logfile(p)
    common.add_version(p)
    return p.parse_args(argv)


def load_secret(args):
    if args.secret_file:
        return config.read_secret_file(args.secret_file)
    return config.env_secret()


def main(argv=None):
    args = parse_args(argv)
    common.start_logging(args)
    try:
        secret = load_secret(args)
    except (OSError, ValueError) as exc:
        print(f"dpool-relay: cannot read the secret: {exc}", file=sys.stderr)
        return 2
    if not secret:
        print("dpool-relay: needs the nodes' secret: set DPOOL_SECRET or --secret-file PATH",
              file=sys.stderr)
        return 2
    relay = Relay(discovery.discovery_key(secret), args.client, node_port=args.node_port,
                  port=args.port, host=args.host, listen_port=args.listen_port,
                  interval=args.interval)
    try:
        asyncio.run(_serve(relay))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"dpool-relay: cannot listen on UDP port {args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


async def _serve(relay):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await relay.start()
    except BaseException:
        relay.close()
        raise
    clients = ", ".join(f"{h}:{p}" for h, p in relay.clients) or "none named"
    print(f"dpool-relay: relaying on UDP {relay.host or '*'}:{relay.relay_port} to {clients} "
          f"(pid {os.getpid()})", flush=True)
    log.info("relaying on UDP port %d (announcements on %s) to %s", relay.relay_port,
             relay.listen_port, clients)
    try:
        await stop.wait()
    finally:
        relay.close()
        s = relay.stats
        log.info("stopped: %d announcements forwarded, %d subnet pings, %d client pings, "
                 "%d withheld (no credit)", s.forwarded, s.subnet_pings, s.client_pings,
                 s.withheld)


if __name__ == "__main__":
    sys.exit(main())
