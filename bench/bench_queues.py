"""Big queues: throughput and client memory per task at 10k, 100k and 1M
queued no-op tasks, side by side with ``multiprocessing.Pool`` (issue 16),
and the 1M-int maps of issue 13.

    python bench/bench_queues.py [--sizes 10000 100000 1000000] [--reps 1] [--no-node] [--no-map]
                                 [--apis Executor.submit Pool.apply_async JobCluster.submit]

Each cell runs in a fresh Python process (so one cell's heap does not count
against the next), with a pool of 2 workers created and warmed up (one task)
before timing: submit all N no-op tasks first, then collect all results.
tasks/s is N over that whole time (``cpu_us`` in the per-cell lines: the
client process's CPU per task, ``gc_us`` the garbage collector's share of
it, ``collections`` per generation); memory per task is the client process's
peak RSS (``VmHWM``) above its RSS after the warm-up, divided by N (so it
counts everything the client holds for a task until its result is taken:
the task, its future or result object, the queue entries; with the embedded
node also the node's queue, which lives in the same process).  Cells run
interleaved, ``--reps`` times each; the medians are printed, with the ratio
to ``mp.Pool.apply_async`` of the same size.

"via node" cells use one ``dpool-node`` subprocess on 127.0.0.1 (2 CPUs,
AES-GCM records), the same for every cell.

The map rows: ``mp.Pool.map(inc, range(1M))`` (its own chunk size: 1M / 8),
``dpool.Pool.map`` likewise, and ``Executor.map`` with that chunk size given
explicitly (its default, as the stdlib's, is 1), each the median of 3 in one
process per API.
"""
import argparse
import gc
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPUS = 2
APIS = ["mp.apply_async", "Executor.submit", "Pool.apply_async", "JobCluster.submit"]


def noop(x=None):
    return x


def inc(x):
    return x + 1


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _open(api, node):
    """(submit(i) -> handle, get(handle) -> value, close())."""
    if api == "mp.apply_async":
        pool = multiprocessing.get_context("fork").Pool(CPUS)
        return (lambda i: pool.apply_async(noop, (i,))), (lambda h: h.get()), pool.terminate
    import dpool
    from dpool.futures import Executor
    kw = {"nodes": [("127.0.0.1", node)]} if node else {}
    if api == "Executor.submit":
        ex = Executor(CPUS, **kw)
        return (lambda i: ex.submit(noop, i)), (lambda f: f.result()), ex.shutdown
    if api == "Pool.apply_async":
        pool = dpool.Pool(CPUS, **kw)
        return (lambda i: pool.apply_async(noop, (i,))), (lambda h: h.get()), pool.terminate
    cluster = dpool.JobCluster(noop, loglevel=40, **({"nodes": kw["nodes"]} if node else {}))
    return cluster.submit, (lambda job: job()), cluster.close


class _GcClock:
    """CPU time spent in the garbage collector (``gc.callbacks``; a
    collection runs in the thread whose allocation triggered it)."""

    def __init__(self):
        self.total, self.collections, self._start = 0.0, [0, 0, 0], {}
        gc.callbacks.append(self)

    def __call__(self, phase, info):
        if phase == "start":
            self._start[threading.get_ident()] = time.thread_time()
        else:
            self.total += time.thread_time() - self._start.pop(threading.get_ident())
            self.collections[info["generation"]] += 1

    def stop(self):
        gc.callbacks.remove(self)


def cell(api, n, node):
    """One measurement in this (fresh) process: JSON on stdout."""
    submit, get, close = _open(api, node)
    assert get(submit(0)) == 0
    base = _status("VmRSS")
    clock = _GcClock()
    start, cpu = time.perf_counter(), time.process_time()
    handles = [submit(i) for i in range(n)]
    for i, h in enumerate(handles):
        assert get(h) == i
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    clock.stop()
    peak = _status("VmHWM")
    del handles
    close()
    print(json.dumps({"rate": n / elapsed, "bytes_per_task": (peak - base) / n,
                      "cpu_us": cpu / n * 1e6, "gc_us": clock.total / n * 1e6,
                      "collections": clock.collections}))


def map_cell(api, n, reps):
    data = list(range(n))
    chunk = -(-n // (CPUS * 4))
    if api == "mp.Pool.map":
        pool = multiprocessing.get_context("fork").Pool(CPUS)
        run, close = (lambda: pool.map(inc, data)), pool.terminate
    elif api == "Pool.map":
        import dpool
        pool = dpool.Pool(CPUS)
        run, close = (lambda: pool.map(inc, data)), pool.terminate
    else:
        from dpool.futures import Executor
        ex = Executor(CPUS)
        run, close = (lambda: list(ex.map(inc, data, chunksize=chunk))), ex.shutdown
    run()  # warm-up (and the workers' first import of the function)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
        assert out[-1] == n
    close()
    print(json.dumps({"rate": n / statistics.median(times)}))


def _child(args, env):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)],
                         capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"{args}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_node(env):
    proc = subprocess.Popen([sys.executable, "-m", "dpool.daemons.node", "--port", "0",
                             "--cpus", str(CPUS)], stdout=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline()
    return proc, int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1])


def fmt_rate(r):
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.0f}k"


def queue_table(args, env, node_port):
    modes = [("local", 0)] + ([("via node", node_port)] if node_port else [])
    apis = ["mp.apply_async"] + [api for api in args.apis if api != "mp.apply_async"]
    cells = [(api, n, mode, port) for n in args.sizes for mode, port in modes for api in apis
             if not (api.startswith("mp.") and port)]
    results = {c: [] for c in cells}
    for _ in range(args.reps):
        for c in cells:
            api, n, mode, port = c
            results[c].append(_child(["--cell", api, n, port], env))
            print(f"  {api:18} {mode:8} {n:>9}: {results[c][-1]}", file=sys.stderr, flush=True)
    print("| queued tasks | API | where | tasks/s | x mp.Pool.apply_async | memory per task "
          "| mp.Pool memory per task |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        ref = [r for c, r in results.items() if c[0].startswith("mp.") and c[1] == n][0]
        ref_rate = statistics.median(r["rate"] for r in ref)
        ref_mem = statistics.median(r["bytes_per_task"] for r in ref)
        for (api, size, mode, _), rs in results.items():
            if size != n or api.startswith("mp."):
                continue
            rate = statistics.median(r["rate"] for r in rs)
            mem = statistics.median(r["bytes_per_task"] for r in rs)
            print(f"| {n:,} | {api} | {mode} | {fmt_rate(rate)} (mp {fmt_rate(ref_rate)}) | "
                  f"{rate / ref_rate:.2f}x | {mem / 1024:.2f} KB | {ref_mem / 1024:.2f} KB |")


def map_table(args, env):
    n = 1_000_000
    rates = {api: _child(["--map-cell", api, n], env)["rate"]
             for api in ("mp.Pool.map", "Pool.map", "Executor.map")}
    print()
    print("| map of 1M ints | items/s | x mp.Pool.map | target |")
    print("|---|---|---|---|")
    for api, target in (("Pool.map", 1.5), ("Executor.map", 1.0)):
        ratio = rates[api] / rates["mp.Pool.map"]
        print(f"| {api} | {fmt_rate(rates[api])} (mp {fmt_rate(rates['mp.Pool.map'])}) | "
              f"{ratio:.2f}x | >= {target}x: {'MET' if ratio >= target else 'MISSED'} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--apis", nargs="+", choices=APIS, default=APIS,
                   help="the dpool APIs to measure (mp.Pool.apply_async always runs)")
    p.add_argument("--no-node", action="store_true")
    p.add_argument("--no-map", action="store_true")
    p.add_argument("--no-queues", action="store_true")
    p.add_argument("--cell", nargs=3)
    p.add_argument("--map-cell", nargs=2)
    args = p.parse_args()
    if args.cell:
        return cell(args.cell[0], int(args.cell[1]), int(args.cell[2]))
    if args.map_cell:
        return map_cell(args.map_cell[0], int(args.map_cell[1]), 3)
    print("command: python bench/bench_queues.py " + " ".join(sys.argv[1:]))
    print("load before:", os.getloadavg())
    env = dict(os.environ, DPOOL_SECRET=os.urandom(16).hex(), DPOOL_HOME=tempfile.mkdtemp(),
               PYTHONPATH=os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x))
    node = None if args.no_node or args.no_queues else start_node(env)
    try:
        if not args.no_queues:
            queue_table(args, env, node and node[1])
        if not args.no_map:
            map_table(args, env)
    finally:
        if node:
            node[0].terminate()
            node[0].wait()
    print("load after:", os.getloadavg())


if __name__ == "__main__":
    main()
