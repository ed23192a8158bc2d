"""Large data (issue 15): one ``bytes`` argument (the job returns its length)
and one ``bytes`` result (the job returns ``b"y" * n``), at several sizes, for

* ``local``: ``dpool.futures.Executor(max_workers=1)`` (embedded node),
* ``node``:  the same against a ``dpool-node`` subprocess on 127.0.0.1 (TCP,
  every message in AES-GCM records),
* ``mp``:    ``multiprocessing.Pool(1)``, the reference,

each measurement in a fresh client process.  Reports MB/s, the client's peak
RSS above its baseline (the user's own object excluded) and, for ``node``,
the node's process tree peak (node + worker), both in multiples of the
payload.  Memory is sampled every 5 ms.

    python bench/bench_large.py                    # 1 MB, 100 MB, 1 GB, 2 GB
    python bench/bench_large.py --sizes 1 100      # MB

The machine is shared: run it alone, compare with ``mp`` in the same run.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil


def size_of(data):
    return len(data)


def make(n):
    return b"y" * n


class PeakSampler:
    """Peak RSS of some processes, sampled every 5 ms in a thread."""

    def __init__(self, pids_fn):
        self._pids_fn = pids_fn
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def total(self):
        total = 0
        for pid in self._pids_fn():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total())
            time.sleep(0.005)

    def __enter__(self):
        self.base = self.total()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.total())


def tree(pid):
    try:
        proc = psutil.Process(pid)
        return [pid] + [c.pid for c in proc.children(recursive=True)]
    except psutil.Error:
        return []


def one(mode, direction, mb, node_pid=None, port=None):
    """A single measurement (run in its own process); returns a dict."""
    n = mb * 1_000_000
    me = os.getpid()
    if mode == "mp":
        import multiprocessing
        pool = multiprocessing.Pool(1)
        submit = lambda fn, arg: pool.apply_async(fn, (arg,)).get()  # noqa: E731
        node_tree = lambda: [c.pid for c in psutil.Process(me).children(recursive=True)]  # noqa: E731
        close = pool.terminate
    else:
        import dpool.futures
        kwargs = {}
        if mode == "node":
            kwargs = dict(nodes=[("127.0.0.1", port)], secret=os.environ["DPOOL_SECRET"])
        ex = dpool.futures.Executor(max_workers=1, **kwargs)
        submit = lambda fn, arg: ex.submit(fn, arg).result()  # noqa: E731
        node_tree = ((lambda: tree(node_pid)) if mode == "node"
                     else (lambda: [c.pid for c in psutil.Process(me).children(recursive=True)]))
        close = ex.shutdown
    try:
        submit(size_of, b"warm-up")
        data = b"x" * n if direction == "send" else None
        with PeakSampler(lambda: [me]) as client, PeakSampler(node_tree) as far:
            t = time.perf_counter()
            if direction == "send":
                assert submit(size_of, data) == n
            else:
                result = submit(make, n)
                assert len(result) == n
            elapsed = time.perf_counter() - t
    finally:
        close()
    # a result is the user's own object: count it out, as the argument is
    own = n if direction == "result" else 0
    return {"mode": mode, "dir": direction, "mb": mb, "mbs": round(mb / elapsed),
            "client_x": round((client.peak - client.base - own) / n, 2),
            "far_x": round((far.peak - far.base) / n, 2)}


def start_node():
    home = tempfile.mkdtemp()
    env = dict(os.environ, DPOOL_SECRET="bench-large-secret-0123456789", DPOOL_HOME=home)
    proc = subprocess.Popen([sys.executable, "-m", "dpool.daemons.node", "--port", "0",
                             "--cpus", "1"], stdout=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline()
    port = int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1])
    return proc, port, env


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1000, 2000], help="MB")
    p.add_argument("--modes", nargs="+", default=["local", "node", "mp"])
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--node", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        mode, direction, mb = args.one
        node_pid, port = args.node or (None, None)
        print(json.dumps(one(mode, direction, int(mb), node_pid, port)))
        return
    proc, port, env = start_node()
    rows = []
    try:
        for mb in args.sizes:
            for mode in args.modes:
                for direction in ("send", "result"):
                    cmd = [sys.executable, __file__, "--one", mode, direction, str(mb),
                           "--node", str(proc.pid), str(port)]
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                         timeout=600)
                    if out.returncode:
                        print(f"{mode} {direction} {mb} MB failed: {out.stderr[-500:]}")
                        continue
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    r = rows[-1]
                    print(f"{r['mb']:>6} MB {r['mode']:<6} {r['dir']:<7} {r['mbs']:>6} MB/s  "
                          f"client +{r['client_x']:.2f}x  node/workers +{r['far_x']:.2f}x",
                          flush=True)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
