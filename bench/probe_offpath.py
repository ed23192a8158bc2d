"""What a lone call via a node would cost with the node off its path (issue
13): a probe, not a feature.  A ``dpool-node`` whose sessions, once idle
after their first job, lend the client's connection (``Connection.lend``:
its socket and record state) to a thread that reads each sealed RUN, runs
the call as a worker does (``dpool.node.worker.Worker.run``) and writes the
sealed DONE itself: no asyncio iteration, no hop to a worker process. That
is the steady state of a worker owning a client's channel; the client is
unchanged (its calling thread writes the RUN and reads the DONE,
tcpline.py).  Interleaved in blocks of 200 calls: this probe node, a real
``dpool-node``, a local Executor (its direct calls to a lent worker) and
``mp.Pool.apply``; medians per call.

    python bench/probe_offpath.py [--blocks 10]
"""
import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading

QUIET = (60.0, 240.0)  # no heartbeat tick takes the client's link back meanwhile


def serve_lent(session, conn):
    """(a thread of the probe node) Answer the client's calls on its lent
    connection until it ends; heartbeats and FORGET are dropped."""
    from dpool import protocol as P
    from dpool.node.worker import Worker
    from dpool.transport.lent import LentSocket

    sock = conn.lend()
    assert sock is not None, "the session's connection could not be lent"
    sock.setblocking(True)
    print(f"probe node: session {session.sid}'s connection lent", file=sys.stderr, flush=True)
    lent = LentSocket(conn, sock)
    worker = Worker(None)
    worker.fns = dict(session.fns)
    while True:
        try:
            messages = lent.receive()
        except BlockingIOError:
            continue
        if messages is None:
            return
        for frames in messages:
            msg = P.decode(frames[0])
            if type(msg) is P.Func:
                worker.fns[msg.fn_id] = frames[1]
            elif type(msg) is P.Run:
                for item, payload in P.run_items(msg, frames):
                    record, out = worker.run(item.job_id, item.fn_id, item.star, payload)
                    lent.send([[P.encode(P.Done, [(*record[:-1], item.attempt)]), *out]])


def probe_node():
    """(a dpool-node's process; dpool from $PYTHONPATH) The node's main, its
    sessions patched to lend their connection to :func:`serve_lent` after
    their first result."""
    from dpool.daemons import node
    from dpool.node import runtime

    real_flush = runtime.Session._flush

    def flush(self):
        real_flush(self)
        if not getattr(self, "_probe_lent", False) and self.counts.get("done") \
                and not self.dispatcher.given and not self.dispatcher.queue:
            self._probe_lent = True
            threading.Thread(target=serve_lent, args=(self, self.conn), daemon=True).start()

    runtime.Session._flush = flush
    sys.exit(node.main(sys.argv[2:]))


def start_probe_node(b):
    home = tempfile.mkdtemp(prefix="dpool-bench-")
    env = dict(os.environ, DPOOL_SECRET=b.SECRET, DPOOL_HOME=home)
    proc = subprocess.Popen([sys.executable, __file__, "--probe-node", "--port", "0",
                             "--cpus", "2", "--loglevel", "WARNING"],
                            stdout=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline()
    return proc, int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1])


def main():
    import _common  # noqa: F401  (this repository first on sys.path)
    import bench_small as b
    from bench_roundtrip_node import per_call
    from dpool.futures import Executor

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=10)
    args = ap.parse_args()
    nodes = [start_probe_node(b), b.start_node()]
    try:
        probe, real = (Executor(2, nodes=[("127.0.0.1", port)], secret=b.SECRET,
                                heartbeat=QUIET) for _, port in nodes)
        local = Executor(2)
        pool = mp.Pool(2)
        for i in range(100):
            local.submit(abs, i).result()
            probe.submit(abs, i).result()
            real.submit(abs, i).result()
            pool.apply(abs, (i,))
        times: dict = {"probe": [], "node": [], "local": [], "mp": []}
        for _ in range(args.blocks):
            times["local"] += per_call(lambda i: local.submit(abs, i).result())
            times["probe"] += per_call(lambda i: probe.submit(abs, i).result())
            times["node"] += per_call(lambda i: real.submit(abs, i).result())
            times["mp"] += per_call(lambda i: pool.apply(abs, (i,)))
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        print(f"python bench/probe_offpath.py --blocks {args.blocks}  "
              f"(load average {os.getloadavg()[0]:.1f})")
        print(f"node off the path {med['probe']:.0f} us ({med['probe'] / med['mp']:.2f}x), "
              f"dpool-node today {med['node']:.0f} us ({med['node'] / med['mp']:.2f}x), "
              f"local {med['local']:.0f} us ({med['local'] / med['mp']:.2f}x), "
              f"mp.Pool.apply {med['mp']:.0f} us per call (medians)")
        for ex in (probe, real, local):
            ex.shutdown(wait=False, cancel_futures=True)
        pool.close()
        pool.join()
    finally:
        for proc, _ in nodes:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe-node"]:
        probe_node()
    else:
        main()
