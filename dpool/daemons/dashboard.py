"""``dpool dashboard``: a web page of dpool-nodes' status, served until
SIGINT or SIGTERM (the page and server are :mod:`dpool.dashboard`)."""
import signal
import sys
import threading

from ..dashboard import DashboardServer
from ..dashboard.nodes import NodesMonitor


def serve_nodes(addresses, secrets, ssl, args):
    try:
        board = DashboardServer(host=args.host, port=args.port, poll_sec=args.poll_sec)
    except (OSError, ValueError) as exc:
        print(f"dpool dashboard: cannot serve on {args.host}:{args.port}: {exc}",
              file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        board.add_monitor(NodesMonitor(addresses, secrets, ssl, timeout=args.timeout))
        print(f"dpool dashboard: {board.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        board.shutdown()
    return 0
