"""Per-call round trips via a dpool-node (AES-GCM records) against
mp.Pool.apply, interleaved in blocks of 200 calls; medians per call.

    python bench/bench_roundtrip_node.py [--blocks 10] [--api executor pool cluster]

Each API is warmed up until its lone calls take the node's channel
(``_common.settle``), then measured in the steady state.

Under load a whole-run figure (bench_small's round trip) measures the
machine's scheduler; medians of single calls, interleaved with the
reference's, say more about what a call costs when both sides get a CPU.
"""
import argparse
import multiprocessing as mp
import os
import statistics
import time

import bench_small as b
from _common import settle, start_node_daemon, stop_node_daemon  # (this repository first)
import dpool
from dpool.futures import Executor

APIS = {  # (make(port), one lone call)
    "executor": (lambda port: Executor(2, nodes=[("127.0.0.1", port)], secret=b.SECRET.encode()),
                 lambda ex, i: ex.submit(abs, i).result()),
    "pool": (lambda port: dpool.Pool(2, nodes=[("127.0.0.1", port)], secret=b.SECRET.encode()),
             lambda pool, i: pool.apply(abs, (i,))),
    "cluster": (lambda port: dpool.JobCluster(abs, nodes=[f"127.0.0.1:{port}"],
                                              secret=b.SECRET, loglevel=40),
                lambda cluster, i: cluster.submit(i)()),
}
NAMES = {"executor": "Executor", "pool": "Pool.apply", "cluster": "JobCluster"}


def per_call(fn, n=200):
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def close(obj):
    if isinstance(obj, Executor):
        obj.shutdown()
    else:
        obj.close()
        if isinstance(obj, dpool.Pool):
            obj.join()


def measure(api, port, pool, blocks):
    make, call = APIS[api]
    obj = make(port)
    try:
        warm = time.monotonic() + 2.0  # (the steady state: a lone call's line settled,
        i = 0                          # a node's channel opened at an idle moment)
        while i < 100 or time.monotonic() < warm:
            call(obj, i)
            pool.apply(abs, (i,))
            i += 1
        settle(obj._client, lambda: call(obj, 0))
        ours, ref = [], []
        for _ in range(blocks):
            ours += per_call(lambda i: call(obj, i))
            ref += per_call(lambda i: pool.apply(abs, (i,)))
        on_chan = obj._client._direct.chan.calls
    finally:
        close(obj)
    return statistics.median(ours) * 1e6, statistics.median(ref) * 1e6, on_chan


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--api", nargs="*", choices=list(APIS), default=list(APIS))
    args = ap.parse_args()
    proc, port, env = start_node_daemon(b.SECRET, 2)
    try:
        pool = mp.Pool(2)
        print(f"python bench/bench_roundtrip_node.py --blocks {args.blocks} "
              f"--api {' '.join(args.api)}  (load average {os.getloadavg()[0]:.1f})")
        for api in args.api:
            mo, mr, on_chan = measure(api, port, pool, args.blocks)
            print(f"{NAMES[api]} via a node {mo:.0f} us, mp.Pool.apply {mr:.0f} us per call "
                  f"(medians): ratio {mo / mr:.2f} (target <= 1.0); {on_chan} calls on the "
                  f"node's channel")
        pool.close()
        pool.join()
    finally:
        stop_node_daemon(proc, env)


if __name__ == "__main__":
    main()
