"""dpool's Executor and Pool next to the stdlib, local placement, one run.

    python bench/bench_pool.py [--quick]

Each figure is measured in this run for dpool and for the stdlib reference,
and printed with the ratio and the target.  Pools are created and warmed up
(one task) before timing unless the case is about creation.  Functions are
defined here, in ``__main__``: dpool ships them by value once per node; the
stdlib pools (fork) find them by reference.
"""
import argparse
import concurrent.futures as cf
import os
import statistics
import sys

from _common import CPUS, MP, bare_processes, best, clock

import dpool
from dpool.futures import Executor


def noop(x=None):
    return x


def inc(x):
    return x + 1


def spin(n):
    total = 0
    for i in range(n):
        total += i * i
    return total


# ------------------------------------------------------------------ cases

def submit_throughput(n, repeat):
    def dpool_submit(ex):
        futures = [ex.submit(noop, i) for i in range(n)]
        for f in futures:
            f.result()

    def mp_apply_async(pool):
        results = [pool.apply_async(noop, (i,)) for i in range(n)]
        for r in results:
            r.get()

    with Executor(CPUS) as ex:
        ex.submit(noop).result()
        ours = best(lambda: dpool_submit(ex), repeat)
    with MP.Pool(CPUS) as pool:
        pool.apply(noop)
        mp_time = best(lambda: mp_apply_async(pool), repeat)
    with cf.ProcessPoolExecutor(CPUS, mp_context=MP) as ex:
        ex.submit(noop).result()
        ppe = best(lambda: dpool_submit(ex), repeat)
    return ours, mp_time, ppe


def round_trip(n, repeat):
    def executor_loop(ex):
        for i in range(n):
            ex.submit(noop, i).result()

    def apply_loop(pool):
        for i in range(n):
            pool.apply(noop, (i,))

    with Executor(CPUS) as ex:
        ex.submit(noop).result()
        ours_ex = best(lambda: executor_loop(ex), repeat) / n
    with dpool.Pool(CPUS) as pool:
        pool.apply(noop)
        ours_pool = best(lambda: apply_loop(pool), repeat) / n
    with MP.Pool(CPUS) as pool:
        pool.apply(noop)
        mp_time = best(lambda: apply_loop(pool), repeat) / n
    return ours_ex, ours_pool, mp_time


def big_map(n, repeat):
    data = list(range(n))
    with dpool.Pool(CPUS) as pool:
        pool.apply(noop)
        assert pool.map(inc, data[:10]) == [x + 1 for x in range(10)]
        ours = best(lambda: pool.map(inc, data), repeat)
    with MP.Pool(CPUS) as pool:
        pool.apply(noop)
        mp_time = best(lambda: pool.map(inc, data), repeat)
    return ours, mp_time


def create_task_shutdown(repeat):
    def ours():
        with Executor(CPUS) as ex:
            ex.submit(noop, 1).result()

    def ppe():
        with cf.ProcessPoolExecutor(CPUS, mp_context=MP) as ex:
            ex.submit(noop, 1).result()

    ours()  # warm the imports
    times = [clock(ours) for _ in range(repeat)]
    return statistics.median(times), statistics.median(clock(ppe) for _ in range(repeat))


def calibrate(seconds=0.05):
    n = 100_000
    while clock(lambda: spin(n)) < seconds / 4:
        n *= 2
    return int(n * seconds / clock(lambda: spin(n)))


def cpu_bound(tasks, n):
    def bare():
        bare_processes(spin, n, tasks)

    ours, bare_time = [], []
    with Executor(CPUS) as ex:
        ex.submit(noop).result()
        for _ in range(2):  # interleaved, so that both see the same machine
            bare_time.append(clock(bare))
            ours.append(clock(lambda: list(ex.map(spin, [n] * tasks))))
    return min(ours), min(bare_time)


# ----------------------------------------------------------------- report

def report(name, ours, ref, ratio, target, met, unit="s"):
    mark = "MET " if met else "MISS"
    print(f"[{mark}] {name:<52} dpool {ours:9.4f}{unit}  ref {ref:9.4f}{unit}  "
          f"ratio {ratio:6.2f}  (target {target})", flush=True)
    return met


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller sizes")
    args = parser.parse_args()
    repeat = 1 if args.quick else 3
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; pools of {CPUS} workers\n")
    met = []

    n = 10_000
    ours, mp_time, ppe = submit_throughput(n, repeat)
    met.append(report(f"submit {n} no-ops: Executor vs mp apply_async", ours, mp_time,
                      mp_time / ours, ">= 1.5x", mp_time / ours >= 1.5))
    met.append(report(f"submit {n} no-ops: Executor vs ProcessPoolExecutor", ours, ppe,
                      ppe / ours, "(shown)", True))

    ours_ex, ours_pool, mp_time = round_trip(300 if args.quick else 1000, repeat)
    met.append(report("round trip: Executor.submit().result() vs mp apply", ours_ex * 1e3,
                      mp_time * 1e3, ours_ex / mp_time, "<= 0.5x", ours_ex / mp_time <= 0.5, "ms"))
    met.append(report("round trip: Pool.apply vs mp apply", ours_pool * 1e3, mp_time * 1e3,
                      ours_pool / mp_time, "<= 0.5x", ours_pool / mp_time <= 0.5, "ms"))

    n = 1_000_000
    ours, mp_time = big_map(n, repeat)
    met.append(report(f"Pool.map over {n} ints vs mp map", ours, mp_time, mp_time / ours,
                      ">= 1.5x", mp_time / ours >= 1.5))

    ours, ppe = create_task_shutdown(5)
    met.append(report("create + one task + shutdown (median of 5)", ours, ppe, ours / ppe,
                      "< 0.15 s", ours < 0.15))

    spin_n = calibrate()
    ours, bare = cpu_bound(64, spin_n)
    met.append(report("64 CPU-bound ~50 ms tasks vs 2 bare processes", ours, bare, bare / ours,
                      ">= 0.97", bare / ours >= 0.97))

    print(f"\n{sum(met)}/{len(met)} targets met")


if __name__ == "__main__":
    main()
