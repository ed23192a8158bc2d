"""``dpool``: the command-line tool for a dpool cluster.

    dpool status [HOST[:PORT] ...] [--json] [--secret-file PATH] [--timeout S]
                 [--cafile F [--certfile F --keyfile F]]
    dpool dashboard [HOST[:PORT] ...] [--host 127.0.0.1] [--port 8181] [--poll-sec S]
                    [the node options of status]

``status`` asks each node, over the same authenticated (and encrypted)
connection a client uses, for its CPUs, sessions, running and queued jobs,
load and version, without opening a session (no CPU is taken).  With no
HOST it asks the nodes in DPOOL_NODES, else the node on this host at the
default port.  The secret comes from --secret-file or DPOOL_SECRET; for a
node on this host, from the file such a node leaves in ~/.dpool.

``dashboard`` serves a web page of the same status, updated live (see
dpool.dashboard), until interrupted.

Exit status of status: 0 when every node answered, 1 when one did not, 2 for
bad usage.
"""
import argparse
import asyncio
import json
import os
import sys

from .. import config
from ..core.status import explain, query_nodes, state_of
from ..transport import client_ssl_context

NODES_ENV = "DPOOL_NODES"


def _node_options():
    """The options every subcommand that talks to nodes shares."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("nodes", nargs="*", metavar="HOST[:PORT]",
                   help=f"nodes to ask (default: ${NODES_ENV}, else "
                        f"127.0.0.1:{config.NODE_PORT})")
    p.add_argument("--secret-file", help="file holding the shared secret (else $DPOOL_SECRET)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for each node (default 5)")
    p.add_argument("--cafile", help="CA to check the nodes' TLS certificates against (TLS)")
    p.add_argument("--certfile", help="client certificate (for nodes that require one)")
    p.add_argument("--keyfile", help="client certificate's key")
    return p


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dpool", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    nodes = _node_options()
    s = sub.add_parser("status", parents=[nodes], help="ask dpool-nodes what they are doing",
                       description="Ask dpool-nodes for their CPUs, sessions, running and "
                                   "queued jobs, load and version.")
    s.add_argument("--json", action="store_true", help="print JSON (one object per node)")
    d = sub.add_parser("dashboard", parents=[nodes], help="a web page of dpool-nodes' status",
                       description="Serve a live web page of the nodes' status until "
                                   "interrupted (SIGINT or SIGTERM).")
    d.add_argument("--host", default="127.0.0.1",
                   help="address to serve the page on (default 127.0.0.1; any other "
                        "needs the token printed with the URL)")
    d.add_argument("--port", type=int, default=8181, help="port (default 8181; 0: a free one)")
    d.add_argument("--poll-sec", type=float, default=2.0,
                   help="seconds between the page's updates (default 2)")
    return p.parse_args(argv)


def parse_address(text):
    host, sep, port = text.strip().rpartition(":")
    if not sep or "]" in port:
        host, port = text.strip(), str(config.NODE_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"invalid node {text!r}: expected HOST or HOST:PORT (port 1-65535)")
    return host, int(port)


def node_addresses(args):
    names = args.nodes
    if not names:
        env = os.environ.get(NODES_ENV, "")
        names = [n for n in env.split(",") if n.strip()] or [f"127.0.0.1:{config.NODE_PORT}"]
    return [parse_address(name) for name in names]


def secrets_for(args, addresses):
    """One secret per address (None: none known, the node will say so)."""
    if args.secret_file:
        secret = config.read_secret_file(args.secret_file)
        return [secret] * len(addresses)
    secret = config.env_secret()
    return [secret or (config.find_local_secret(port) if config.is_loopback(host) else None)
            for host, port in addresses]


COLUMNS = [("NODE", "name"), ("ADDRESS", "address"), ("STATE", "state"), ("CPUS", "cpus"),
           ("FREE", "free_cpus"), ("SESSIONS", "sessions"), ("RUNNING", "running"),
           ("QUEUED", "queued"), ("LOAD", "load"), ("CPU%", "cpu_busy"),
           ("VERSION", "version"), ("PYTHON", "python")]


def table(rows):
    """The rows as aligned text; an unreachable node gets its reason instead."""
    cells = [[title for title, _ in COLUMNS]]
    notes = []
    for row in rows:
        if row["state"] != "up":
            cells.append([row.get("name") or "-", row["address"], row["state"]])
            notes.append(f"{row['address']}: {row['error']}")
            continue
        cells.append(["" if row.get(key) is None else str(row[key]) for _, key in COLUMNS])
    widths = [max(len(line[i]) for line in cells if i < len(line)) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in cells]
    return "\n".join(lines + notes)


def connection(args, command):
    """(addresses, secrets, ssl context) from the node options; prints the
    problem and returns None on bad usage."""
    try:
        addresses = node_addresses(args)
        secrets = secrets_for(args, addresses)
        ssl = None
        if args.cafile or args.certfile:
            ssl = client_ssl_context(args.cafile, args.certfile, args.keyfile)
    except (OSError, ValueError) as exc:
        print(f"dpool {command}: {exc}", file=sys.stderr)
        return None
    return addresses, secrets, ssl


def status(args):
    conn = connection(args, "status")
    if conn is None:
        return 2
    addresses, secrets, ssl = conn
    answers = asyncio.run(query_nodes(addresses, secrets, ssl=ssl, timeout=args.timeout))
    rows = []
    for (host, port), answer in zip(addresses, answers):
        row = {"address": f"{host}:{port}"}
        if isinstance(answer, BaseException):
            row.update(state=state_of(answer), error=explain(answer, args.timeout))
        else:
            row.update(answer, state="up")
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(table(rows))
    return 0 if all(row["state"] == "up" for row in rows) else 1


def main(argv=None):
    args = parse_args(argv)
    if args.command == "status":
        return status(args)
    if args.command == "dashboard":
        conn = connection(args, "dashboard")
        if conn is None:
            return 2
        from .dashboard import serve_nodes
        return serve_nodes(*conn, args)
    return 2  # argparse refuses unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
