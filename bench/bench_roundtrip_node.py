"""Per-call round trips via a dpool-node (AES-GCM records) against
mp.Pool.apply, interleaved in blocks of 200 calls; medians per call.

    python bench/bench_roundtrip_node.py [--blocks 10]

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
from _common import start_node_daemon, stop_node_daemon  # (this repository first on sys.path)
from dpool.futures import Executor


def per_call(fn, n=200):
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=10)
    args = ap.parse_args()
    proc, port, env = start_node_daemon(b.SECRET, 2)
    try:
        ex = Executor(2, nodes=[("127.0.0.1", port)], secret=b.SECRET.encode())
        pool = mp.Pool(2)
        warm = time.monotonic() + 2.0  # (the steady state: a lone call's line settled,
        i = 0                          # a node's channel opened at an idle moment)
        while i < 100 or time.monotonic() < warm:
            ex.submit(abs, i).result()
            pool.apply(abs, (i,))
            i += 1
        ours, ref = [], []
        for _ in range(args.blocks):
            ours += per_call(lambda i: ex.submit(abs, i).result())
            ref += per_call(lambda i: pool.apply(abs, (i,)))
        mo, mr = (statistics.median(x) * 1e6 for x in (ours, ref))
        print(f"python bench/bench_roundtrip_node.py --blocks {args.blocks}  "
              f"(load average {os.getloadavg()[0]:.1f})")
        print(f"Executor via a node {mo:.0f} us, mp.Pool.apply {mr:.0f} us per call (medians): "
              f"ratio {mo / mr:.2f} (target <= 1.0)")
        ex.shutdown()
        pool.close()
        pool.join()
    finally:
        stop_node_daemon(proc, env)


if __name__ == "__main__":
    main()
