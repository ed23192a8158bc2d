"""Engine benchmark: JobCluster over a local node vs multiprocessing.Pool.

    python bench/bench_engine.py [--jobs 10000] [--trips 500] [--mb 100] [--remote]

Measures, in one run and on the same machine (a full garbage collection
before each measurement, for both sides):
  throughput  N no-op jobs submitted at once, until all results are back
  latency     sequential round trips of one no-op job
  bandwidth   one 100 MB argument (returning its length) and one 100 MB result
next to multiprocessing.Pool (apply_async / apply / apply with the same data),
and prints dpool's figure over the reference as a ratio (>1 is better for
throughput and bandwidth; for latency the ratio is dpool time / mp time).
With --remote the node is a separate `dpool-node` process on 127.0.0.1
(TCP + auth), otherwise the cluster's embedded node (in-process link).
"""
import argparse
import gc
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time


def noop(x=None):
    return x


def size_of(data):
    return len(data)


def make(mb):
    return b"x" * (mb * 1_000_000)


def bench_mp(args):
    cpus = os.cpu_count()
    out = {}
    with multiprocessing.Pool(cpus) as pool:
        pool.apply(noop)  # warm up
        gc.collect()
        t = time.perf_counter()
        rs = [pool.apply_async(noop, (i,)) for i in range(args.jobs)]
        for r in rs:
            r.get()
        out["throughput"] = args.jobs / (time.perf_counter() - t)
        gc.collect()
        t = time.perf_counter()
        for i in range(args.trips):
            pool.apply(noop, (i,))
        out["latency"] = (time.perf_counter() - t) / args.trips
        data = make(args.mb)
        gc.collect()
        t = time.perf_counter()
        pool.apply(size_of, (data,))
        out["arg_mbs"] = args.mb / (time.perf_counter() - t)
        gc.collect()
        t = time.perf_counter()
        pool.apply(make, (args.mb,))
        out["result_mbs"] = args.mb / (time.perf_counter() - t)
    return out


def bench_dpool(args, nodes=None, secret=None):
    import dpool

    out = {}
    kw = {"nodes": nodes, "secret": secret} if nodes else {}
    cluster = dpool.JobCluster(noop, loglevel=30, **kw)
    cluster.submit(0)()
    gc.collect()
    t = time.perf_counter()
    jobs = [cluster.submit(i) for i in range(args.jobs)]
    for job in jobs:
        job()
    out["throughput"] = args.jobs / (time.perf_counter() - t)
    gc.collect()
    t = time.perf_counter()
    for i in range(args.trips):
        cluster.submit(i)()
    out["latency"] = (time.perf_counter() - t) / args.trips
    cluster.close()
    cluster = dpool.JobCluster(size_of, loglevel=30, **kw)
    cluster.submit(b"")()
    data = make(args.mb)
    gc.collect()
    t = time.perf_counter()
    assert cluster.submit(data)() == len(data)
    out["arg_mbs"] = args.mb / (time.perf_counter() - t)
    cluster.close()
    cluster = dpool.JobCluster(make, loglevel=30, **kw)
    cluster.submit(0)()
    gc.collect()
    t = time.perf_counter()
    assert len(cluster.submit(args.mb)()) == args.mb * 1_000_000
    out["result_mbs"] = args.mb / (time.perf_counter() - t)
    cluster.close()
    return out


def start_node():
    home = tempfile.mkdtemp()
    env = dict(os.environ, DPOOL_SECRET="bench-secret", DPOOL_HOME=home)
    proc = subprocess.Popen([sys.executable, "-m", "dpool.daemons.node", "--port", "0"],
                            stdout=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline()
    port = int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1])
    return proc, port


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=10000)
    p.add_argument("--trips", type=int, default=500)
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--remote", action="store_true")
    args = p.parse_args()
    ref = bench_mp(args)
    if args.remote:
        proc, port = start_node()
        try:
            ours = bench_dpool(args, nodes=[("127.0.0.1", port)], secret="bench-secret")
        finally:
            proc.terminate()
            proc.wait()
    else:
        ours = bench_dpool(args)
    where = "dpool-node over TCP" if args.remote else "embedded node"
    print(f"dpool JobCluster ({where}) vs multiprocessing.Pool, {os.cpu_count()} CPUs")
    print(f"{'measure':<12} {'dpool':>14} {'mp.Pool':>14} {'ratio':>8}")
    rows = [("throughput", "jobs/s", False), ("latency", "us", True),
            ("arg_mbs", "MB/s", False), ("result_mbs", "MB/s", False)]
    for key, unit, is_time in rows:
        a, b = ours[key], ref[key]
        scale = 1e6 if is_time else 1
        print(f"{key:<12} {a * scale:>10.0f} {unit:<4}{b * scale:>10.0f} {unit:<4}{a / b:>7.2f}x")


if __name__ == "__main__":
    main()
