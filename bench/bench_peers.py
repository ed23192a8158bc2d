"""dpool next to its peers, side by side in one run (issue 13's table).

    pip install -e '.[bench]'          # loky, dask[distributed], ray (optional)
    python bench/bench_peers.py [--rounds 3] [--quick] [--peers NAME ...]

Rows: 10k no-op tasks (tasks/s), the round trip of one no-op task (median
µs), a map of 1M ints (items/s), one 100 MB argument and one 100 MB result
(MB/s), and create + one task + shutdown (s).  Peers, each through its most
natural API, all with 2 worker processes: ``multiprocessing.Pool`` (fork),
``ProcessPoolExecutor`` (fork), loky, dask.distributed ``LocalCluster``
(one thread per worker), Ray, and dpool: ``Executor`` and ``Pool`` on the
embedded node, ``Executor`` and ``JobCluster`` through a ``dpool-node``
subprocess on 127.0.0.1 (TCP, authenticated, AES-GCM records).  A peer that
can't be imported is skipped with a message.

Each round opens every peer in turn, measures each row once, and closes it
(create + 1 task + shutdown is a fresh open, call and close of its own), so
the peers are interleaved and see the same machine; the table shows the
medians over the rounds, then each figure as a ratio to ``mp.Pool``'s.
Maps are chunked as ``mp.Pool.map`` chunks by default (4 chunks per
worker): ``chunksize=`` for the executors, one task per chunk for dask
(chunks scattered first) and Ray.  Slow peers (dask) run a tenth of the no-op tasks: a rate, still.
On a shared machine compare ratios, not absolute figures, and quote
``uptime``'s load with them (printed below the tables).
"""
import argparse
import concurrent.futures as cf
import functools
import logging
import os
import secrets
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

from _common import CPUS, MP, clock


# ------------------------------------------------------- the tasks (in __main__)

def noop(x=None):
    return x


def inc(x):
    return x + 1


def size_of(data):
    return len(data)


def make(n):
    return b"x" * n


def map_chunk(fn, chunk):
    return [fn(x) for x in chunk]


def work(kind, x):
    """JobCluster's one computation: the task named by ``kind``."""
    return {"noop": noop, "size_of": size_of, "make": make}[kind](x)


def chunks_of(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


def mp_chunksize(n):
    """multiprocessing.Pool.map's default chunk size for ``n`` items."""
    size, extra = divmod(n, CPUS * 4)
    return size + 1 if extra else size


# ------------------------------------------------------------------- peers

class Peer:
    """One way to run tasks.  ``open`` starts it and runs one task."""

    name = ""
    needs = ()  # modules it imports: skipped (with a message) if one is missing
    tasks_scale = 1.0  # run this fraction of the no-op tasks (slow peers)

    def missing(self):
        for module in self.needs:
            try:
                __import__(module)
            except Exception as exc:
                return f"{module} can't be imported ({exc.__class__.__name__}: {exc}); " \
                       f"pip install -e '.[bench]'"
        return None

    def open(self):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    def many(self, n):
        """Submit ``n`` no-op tasks, then wait for them all."""
        raise NotImplementedError

    def one(self, fn, arg):
        """Run ``fn(arg)`` as one task and return its result."""
        raise NotImplementedError

    def map(self, fn, data):
        """``[fn(x) for x in data]`` through the peer's map (None: it has none)."""
        return None


class MpPool(Peer):
    name = "mp.Pool"

    def __init__(self, factory=None):
        self.factory = factory or (lambda: MP.Pool(CPUS))

    def open(self):
        self.pool = self.factory()
        self.pool.apply(noop)

    def close(self):
        self.pool.close()
        self.pool.join()

    def many(self, n):
        for result in [self.pool.apply_async(noop, (i,)) for i in range(n)]:
            result.get()

    def one(self, fn, arg):
        return self.pool.apply(fn, (arg,))

    def map(self, fn, data):
        return self.pool.map(fn, data)


class Futures(Peer):
    """A concurrent.futures executor."""

    def __init__(self, name, factory, needs=()):
        self.name, self.factory, self.needs = name, factory, needs

    def open(self):
        self.ex = self.factory()
        self.ex.submit(noop).result()

    def close(self):
        self.ex.shutdown(wait=True)

    def many(self, n):
        for future in [self.ex.submit(noop, i) for i in range(n)]:
            future.result()

    def one(self, fn, arg):
        return self.ex.submit(fn, arg).result()

    def map(self, fn, data):
        return list(self.ex.map(fn, data, chunksize=mp_chunksize(len(data))))


class Dask(Peer):
    name = "dask"
    needs = ("distributed",)
    tasks_scale = 0.1

    def open(self):
        from distributed import Client, LocalCluster

        for name in ("distributed", "tornado", "bokeh"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.cluster = LocalCluster(n_workers=CPUS, threads_per_worker=1, processes=True,
                                    dashboard_address=None)
        self.client = Client(self.cluster)
        self.client.submit(noop, pure=False).result()

    def close(self):
        self.client.close()
        self.cluster.close()

    def many(self, n):
        self.client.gather([self.client.submit(noop, i, pure=False) for i in range(n)])

    def one(self, fn, arg):
        with warnings.catch_warnings():  # "large object in the task graph": measured as is
            warnings.simplefilter("ignore")
            return self.client.submit(fn, arg, pure=False).result()

    def map(self, fn, data):
        # Scattered first: chunks inside the task graph cost dask ~100 µs an item.
        chunks = self.client.scatter(chunks_of(data, mp_chunksize(len(data))))
        parts = self.client.gather(self.client.map(functools.partial(map_chunk, fn), chunks,
                                                   pure=False))
        return [x for part in parts for x in part]


class Ray(Peer):
    name = "Ray"
    needs = ("ray",)

    def open(self):
        import ray

        self.ray = ray
        ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, object_store_memory=1 << 30)
        self.remote = {fn: ray.remote(fn) for fn in (noop, size_of, make, map_chunk)}
        self.one(noop, None)

    def close(self):
        self.ray.shutdown()

    def many(self, n):
        self.ray.get([self.remote[noop].remote(i) for i in range(n)])

    def one(self, fn, arg):
        return self.ray.get(self.remote[fn].remote(arg))

    def map(self, fn, data):
        parts = self.ray.get([self.remote[map_chunk].remote(fn, chunk)
                              for chunk in chunks_of(data, mp_chunksize(len(data)))])
        return [x for part in parts for x in part]


class Cluster(Peer):
    """dpool's JobCluster (one computation: ``work``)."""

    name = "dpool-node JobCluster"

    def __init__(self, node):
        self.node = node

    def open(self):
        import dpool

        self.cluster = dpool.JobCluster(work, nodes=[self.node.address],
                                        secret=self.node.secret, loglevel=logging.WARNING)
        self.one(noop, None)

    def close(self):
        self.cluster.close()

    def many(self, n):
        for job in [self.cluster.submit("noop", i) for i in range(n)]:
            job()

    def one(self, fn, arg):
        job = self.cluster.submit(fn.__name__, arg)
        result = job()
        if job.exception:
            raise RuntimeError(job.exception)
        return result


class Node:
    """A dpool-node subprocess on 127.0.0.1 (port 0), 2 CPUs."""

    def __init__(self):
        self.secret = secrets.token_hex(16)
        home = tempfile.mkdtemp()
        env = dict(os.environ, DPOOL_SECRET=self.secret, DPOOL_HOME=home)
        self.log = os.path.join(home, "node.log")  # its log lines, kept out of the tables
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "dpool.daemons.node", "--port",
                                          "0", "--cpus", str(CPUS)], stdout=subprocess.PIPE,
                                         stderr=log, env=env, text=True)
        line = self.proc.stdout.readline()
        self.address = ("127.0.0.1", int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1]))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def peers(node):
    import dpool
    from dpool.futures import Executor

    def loky_executor():
        import loky

        return loky.ProcessPoolExecutor(max_workers=CPUS)

    found = [MpPool(),
             Futures("PPE", lambda: cf.ProcessPoolExecutor(CPUS, mp_context=MP)),
             Futures("loky", loky_executor, needs=("loky",)),
             Dask(), Ray(),
             Futures("dpool Executor", lambda: Executor(CPUS)),
             MpPool(lambda: dpool.Pool(CPUS))]
    found[-1].name = "dpool Pool"
    if node is not None:
        found += [Futures("dpool-node Executor",
                          lambda: Executor(nodes=[node.address], secret=node.secret)),
                  Cluster(node)]
    return found


# ---------------------------------------------------------------- measures

ROWS = [  # (key, label, unit: which way is better)
    ("tasks", "{tasks} no-op tasks, tasks/s", "higher"),
    ("trip", "round trip, median µs", "lower"),
    ("map", "map {items} ints, items/s", "higher"),
    ("arg", "{mb} MB argument, MB/s", "higher"),
    ("result", "{mb} MB result, MB/s", "higher"),
    ("create", "create + 1 task + shutdown, s", "lower"),
]


def measure_round(peer, args, blob, data, expected):
    """One round of every row for ``peer``: {row key: figure}."""
    out = {}
    out["create"] = clock(lambda: (peer.open(), peer.close()))
    peer.open()
    try:
        n = max(1, int(args.tasks * peer.tasks_scale))
        out["tasks"] = n / clock(lambda: peer.many(n))
        trips = []
        for i in range(args.trips):
            start = time.perf_counter()
            peer.one(noop, i)
            trips.append(time.perf_counter() - start)
        out["trip"] = statistics.median(trips) * 1e6
        got = []
        took = clock(lambda: got.append(peer.map(inc, data)))
        if got[0] is not None:
            assert got[0] == expected, f"{peer.name}: wrong map result"
            out["map"] = len(data) / took
        size = args.mb * 1_000_000
        took = clock(lambda: got.append(peer.one(size_of, blob)))
        assert got[-1] == size, f"{peer.name}: wrong size {got[-1]}"
        out["arg"] = args.mb / took
        took = clock(lambda: got.append(peer.one(make, size)))
        assert len(got[-1]) == size, f"{peer.name}: wrong result size"
        out["result"] = args.mb / took
    finally:
        peer.close()
    return out


def fmt(value, key):
    if value is None:
        return "-"
    if key == "create":
        return f"{value:.3f}"
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e4:
        return f"{value / 1e3:.0f}k"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def table(names, medians, args, ratios=False):
    lines = ["| work | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label, better in ROWS:
        label = label.format(tasks=f"{args.tasks:,}", items=f"{args.items:,}", mb=args.mb)
        if ratios:
            label += f" ({better} is better)"
        cells = []
        for name in names:
            value = medians[name].get(key)
            if not ratios:
                cells.append(fmt(value, key))
                continue
            ref = medians[names[0]].get(key)
            cells.append("-" if value is None or not ref else f"{value / ref:.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--trips", type=int, default=300)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--quick", action="store_true",
                        help="1 round, 2,000 tasks, 100 trips, 100,000 items, 10 MB")
    parser.add_argument("--peers", nargs="+", metavar="NAME",
                        help="only these (names as in the table; mp.Pool always runs)")
    parser.add_argument("--no-node", action="store_true", help="no dpool-node subprocess")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tasks, args.trips, args.items, args.mb = 1, 2000, 100, 100_000, 10
    node = None if args.no_node else Node()
    try:
        run(args, node)
    finally:
        if node is not None:
            node.stop()


def run(args, node):
    chosen, skipped = [], []
    for peer in peers(node):
        if args.peers and peer.name not in args.peers and peer.name != "mp.Pool":
            continue
        why = peer.missing()
        if why:
            skipped.append(f"{peer.name}: skipped: {why}")
            print(skipped[-1], file=sys.stderr, flush=True)
        else:
            chosen.append(peer)
    data = list(range(args.items))
    expected = [x + 1 for x in data]
    blob = b"x" * (args.mb * 1_000_000)
    rounds = {peer.name: [] for peer in chosen}
    failed = {}
    for r in range(args.rounds):
        for peer in chosen:
            if peer.name in failed:
                continue
            print(f"round {r + 1}/{args.rounds}: {peer.name}", file=sys.stderr, flush=True)
            try:
                rounds[peer.name].append(measure_round(peer, args, blob, data, expected))
            except Exception as exc:
                traceback.print_exc()
                failed[peer.name] = f"{peer.name}: failed: {exc.__class__.__name__}: {exc}"
    names = [peer.name for peer in chosen if rounds[peer.name]]
    medians = {name: {key: statistics.median(r[key] for r in rounds[name])
                      if all(key in r for r in rounds[name]) else None
                      for key, _, _ in ROWS} for name in names}
    command = "python bench/bench_peers.py " + shlex.join(sys.argv[1:])
    print(f"\n{table(names, medians, args)}\n")
    print(f"Ratios to mp.Pool's figure in the same run:\n\n{table(names, medians, args, True)}\n")
    print(f"Medians of {args.rounds} rounds; dask ran {max(1, args.tasks // 10):,} of the "
          f"no-op tasks; maps in chunks of {mp_chunksize(args.items):,} items.")
    for line in skipped + list(failed.values()):
        print(f"- {line}")
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else "?"
    print(f"\ncommand: {command.strip()}\nPython {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {' '.join(load)} (at the end)")


if __name__ == "__main__":
    main()
