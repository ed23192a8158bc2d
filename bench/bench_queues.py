"""Big queues: throughput and client memory per task at 10k, 100k and 1M
queued no-op tasks, side by side with ``multiprocessing.Pool`` (issue 16),
and the 1M-int maps of issue 13.

    python bench/bench_queues.py [--sizes 10000 100000 1000000] [--reps N] [--no-node] [--no-map]
                                 [--apis Executor.submit Pool.apply_async JobCluster.submit]
                                 [--tree DIR]

Each cell runs in a fresh Python process (so one cell's heap does not count
against the next), with a pool of 2 workers created and warmed up (one task)
before timing: submit all N no-op tasks first, then collect all results.
tasks/s is N over that whole time (``cpu_us`` in the per-cell lines: the
client process's CPU per task, ``gc_us`` the garbage collector's share of
it, ``collections`` per generation); memory per task is the client process's
peak RSS (``VmHWM``) above its RSS after the warm-up, divided by N (so it
counts everything the client holds for a task until its result is taken:
the task, its future or result object, the queue entries; with the embedded
node also the node's queue, which lives in the same process).

A 10k cell's burst lasts a fraction of a second, and on a shared machine
one such burst against one of ``multiprocessing``'s says little (the same
tree's ratio moved from 1.33x to 2.31x between runs).  So every dpool cell
runs in pairs with an ``mp.Pool.apply_async`` cell of the same size, the two
processes one right after the other (which of them goes first alternating
from pair to pair), and the pairs of all cells interleaved: 9 pairs per
cell at 10k, 3 at 100k, 1 at 1M (``--reps`` sets one count for every size).
A cell's ratio is the median of its pairs' ratios, printed with their range
and how many pairs met 1.5x; rates, CPU and memory are medians.  mp runs as
often as dpool does, never less.

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
    cluster = dpool.JobCluster(noop, loglevel=40,  # (CPUS workers, as mp's: not all the host's)
                               **({"nodes": kw["nodes"]} if node else {"cpus": CPUS}))
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


def _cpu_of(roots):
    """{pid: CPU seconds} of the processes ``roots`` and their descendants
    (user + system, from /proc)."""
    stats, tick = {}, os.sysconf("SC_CLK_TCK")
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # (not a process, or gone meanwhile)
            continue
        stats[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in found:
            found.add(pid)
            todo.extend(p for p, (parent, _) in stats.items() if parent == pid)
    return {pid: stats[pid][1] for pid in found}


def cell(api, n, node, node_pid=0):
    """One measurement in this (fresh) process: JSON on stdout.  Besides
    this process's CPU per task (``cpu_us``), the other processes' of the
    burst (``others_us``: its workers, and the dpool-node ``node_pid`` with
    its workers)."""
    submit, get, close = _open(api, node)
    assert get(submit(0)) == 0
    base = _status("VmRSS")
    roots = [os.getpid()] + ([node_pid] if node_pid else [])
    clock = _GcClock()
    before = _cpu_of(roots)
    start, cpu = time.perf_counter(), time.process_time()
    handles = [submit(i) for i in range(n)]
    for i, h in enumerate(handles):
        assert get(h) == i
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = _cpu_of(roots)
    clock.stop()
    peak = _status("VmHWM")
    del handles
    close()
    others = sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid != os.getpid())
    print(json.dumps({"rate": n / elapsed, "bytes_per_task": (peak - base) / n,
                      "cpu_us": cpu / n * 1e6, "others_us": others / n * 1e6,
                      "gc_us": clock.total / n * 1e6, "collections": clock.collections}))


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


def start_node(env, tree=ROOT):
    # (in ``tree``: ``-m`` puts the working directory first on sys.path)
    proc = subprocess.Popen([sys.executable, "-m", "dpool.daemons.node", "--port", "0",
                             "--cpus", str(CPUS)], stdout=subprocess.PIPE, env=env, text=True,
                            cwd=tree)
    line = proc.stdout.readline()
    return proc, int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1])


def fmt_rate(r):
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.0f}k"


def reps_for(n, reps=None):
    """How many pairs a cell of ``n`` tasks runs: ``reps`` if given, else
    enough for a short burst to say something (about 200,000 tasks' worth,
    an odd count for a plain median): 9 at 10k, 3 at 100k, 1 at 1M."""
    if reps:
        return reps
    return max(1, min(9, (200_000 // n) | 1))


def queue_table(args, env, node_port, node_pid=0):
    """Each dpool cell runs in pairs with an ``mp.Pool.apply_async`` cell of
    the same size, one right after the other (which goes first alternates
    from pair to pair), ``reps_for(n)`` pairs per cell, all cells' pairs
    interleaved; a cell's ratio is the median of its pairs' ratios, with
    their range and how many pairs met 1.5x: the same number of runs on
    each side, each ratio taken from neighbours in time."""
    modes = [("local", 0)] + ([("via node", node_port)] if node_port else [])
    apis = [api for api in args.apis if api != "mp.apply_async"]
    cells = [(api, n, mode, port) for n in args.sizes for mode, port in modes for api in apis]
    pairs = {c: [] for c in cells}  # cell -> [(dpool's result, mp's result), ...]
    for rep in range(max(reps_for(n, args.reps) for n in args.sizes)):
        for c in cells:
            api, n, mode, port = c
            if rep >= reps_for(n, args.reps):
                continue
            runs = [("mp.apply_async", 0), (api, port)]
            if rep % 2:
                runs.reverse()
            out = {}
            for name, p in runs:
                out[name] = _child(["--cell", name, n, p, node_pid if p else 0], env)
                where = mode if name == api else ""
                print(f"  {name:18} {where:8} {n:>9} "
                      f"(pair {rep + 1}): {out[name]}", file=sys.stderr, flush=True)
            pairs[c].append((out[api], out["mp.apply_async"]))
    print("| queued tasks | API | where | pairs | tasks/s (mp) | x mp.Pool.apply_async, median "
          "(range) | pairs >= 1.5x | CPU per task: client + others (mp) | memory per task "
          "(mp) |")
    print("|---|---|---|---|---|---|---|---|---|")
    met = every = 0
    for c, ps in pairs.items():
        api, n, mode, _ = c
        ours, ref = [p[0] for p in ps], [p[1] for p in ps]
        ratios = sorted(a["rate"] / b["rate"] for a, b in ps)
        med = lambda rs, key: statistics.median(r[key] for r in rs)  # noqa: E731
        spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
        print(f"| {n:,} | {api} | {mode} | {len(ps)} | {fmt_rate(med(ours, 'rate'))} "
              f"({fmt_rate(med(ref, 'rate'))}) | {statistics.median(ratios):.2f}x{spread} | "
              f"{sum(r >= 1.5 for r in ratios)}/{len(ratios)} | "
              f"{med(ours, 'cpu_us'):.1f} + {med(ours, 'others_us'):.1f} us "
              f"({med(ref, 'cpu_us'):.1f} + {med(ref, 'others_us'):.1f}) | "
              f"{med(ours, 'bytes_per_task') / 1024:.2f} KB "
              f"({med(ref, 'bytes_per_task') / 1024:.2f}) |")
        met += statistics.median(ratios) >= 1.5
        every += ratios[0] >= 1.5
    print(f"\ncells >= 1.5x: {met} of {len(pairs)} by their median, {every} in every pair")


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
    p.add_argument("--reps", type=int, default=None,
                   help="pairs per cell (default: 9 at 10k, 3 at 100k, 1 at 1M; see reps_for)")
    p.add_argument("--apis", nargs="+", choices=APIS, default=APIS,
                   help="the dpool APIs to measure (mp.Pool.apply_async always runs)")
    p.add_argument("--tree", default=ROOT,
                   help="the dpool source tree the cells and the node run (default: this "
                        "repository's): an old tree exported beside a new one for an A/B")
    p.add_argument("--no-node", action="store_true")
    p.add_argument("--no-map", action="store_true")
    p.add_argument("--no-queues", action="store_true")
    p.add_argument("--cell", nargs="+")
    p.add_argument("--map-cell", nargs=2)
    args = p.parse_args()
    if args.cell:
        return cell(args.cell[0], *map(int, args.cell[1:]))
    if args.map_cell:
        return map_cell(args.map_cell[0], int(args.map_cell[1]), 3)
    print("command: python bench/bench_queues.py " + " ".join(sys.argv[1:]))
    print("load before:", os.getloadavg())
    path = os.pathsep.join(x for x in (args.tree, os.environ.get("PYTHONPATH")) if x)
    env = dict(os.environ, DPOOL_SECRET=os.urandom(16).hex(), DPOOL_HOME=tempfile.mkdtemp(),
               PYTHONPATH=path)
    node = None if args.no_node or args.no_queues else start_node(env, args.tree)
    try:
        if not args.no_queues:
            queue_table(args, env, node and node[1], node and node[0].pid)
        if not args.no_map:
            map_table(args, env)
    finally:
        if node:
            node[0].terminate()
            node[0].wait()
    print("load after:", os.getloadavg())


if __name__ == "__main__":
    main()
