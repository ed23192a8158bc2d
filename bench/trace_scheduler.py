"""Message-flow tracing for bench_scheduler.py ``--trace`` (monkeypatches,
nothing in dpool changes).  In the client: how long each node link went from
a result (Done) to its next jobs (Run).  In a dpool-scheduler
(``python -c "import trace_scheduler as t; t.run_scheduler()" ARGS``): the
same per node, how often a node's result found no job of the client queued
in the scheduler, and the messages' batch sizes; written as one JSON line
to ``$DPOOL_TRACE_OUT`` when the scheduler exits."""
import atexit
import collections
import json
import os
import sys
import time

counts = collections.Counter()
gaps = []


def reset():
    counts.clear()
    gaps.clear()


def summary():
    g = sorted(gaps)
    quantiles = {f"p{int(q * 100)}": round(1000 * g[int(q * (len(g) - 1))], 1)
                 for q in (0.1, 0.5, 0.9)} if g else {}
    return {"counts": dict(counts), "result_to_next_run_ms": quantiles}


def _gap_timer():
    last = {}

    def done(key):
        last.setdefault(key, time.monotonic())

    def sent(key):
        t = last.pop(key, None)
        if t is not None:
            gaps.append(time.monotonic() - t)
    return done, sent


def patch_client():
    from dpool.core import client as cl
    send, on_done = cl.Client._send, cl.Client._on_done
    mark_done, mark_sent = _gap_timer()

    def _send(self, link, ids):
        mark_sent(link)
        counts["run_msgs"] += 1
        return send(self, link, ids)

    def _on_done(self, link, msg, frames):
        mark_done(link)
        counts["done_msgs"] += 1
        counts["results"] += len(msg.results)
        return on_done(self, link, msg, frames)
    cl.Client._send, cl.Client._on_done = _send, _on_done


def patch_broker():
    from dpool.core import broker as b
    session = b.ClientSession
    send, on_done = session.send, session.on_done
    mark_done, mark_sent = _gap_timer()

    def _send(self, leg, batch):
        mark_sent(leg.port)
        counts["run_msgs_to_nodes"] += 1
        counts["jobs_to_nodes"] += len(batch)
        return send(self, leg, batch)

    def _on_done(self, leg, msg, frames):
        mark_done(leg.port)
        counts["done_msgs_from_nodes"] += 1
        counts["none_queued_at_a_result"] += not self.pending
        return on_done(self, leg, msg, frames)
    session.send, session.on_done = _send, _on_done

    def write():
        with open(os.environ["DPOOL_TRACE_OUT"], "a") as out:
            out.write(json.dumps(summary()) + "\n")
    atexit.register(write)


def run_scheduler():
    patch_broker()
    from dpool.daemons.scheduler import main
    sys.exit(main(sys.argv[1:]))
