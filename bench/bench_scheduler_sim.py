"""The scheduler core at a scale this machine can't host: simulated nodes.

    python bench/bench_scheduler_sim.py [--nodes 1000] [--cpus 8] [--jobs 1000000]
                                        [--weights 1 1 2 4] [--runs 1]
    python bench/bench_scheduler_sim.py --nodes 10000 --jobs 200000   # 10k nodes

In-process fakes, no sockets: ``--nodes`` nodes of ``--cpus`` CPUs run jobs
of random simulated durations (0.5-1.5 s, a fixed seed), sent by one client
per weight, all submitted at time 0.  The driver does what
``dpool-scheduler`` does per job: when a CPU frees, ``FairShare.pick()``
says whose job runs next and ``Scheduler.submit()`` which node takes it
(one job per free CPU, so shares are shares of CPUs); when the job ends,
``Scheduler.done()`` and ``FairShare.done()``.  Simulated time comes from a
heap of job ends, so the wall time is all scheduling.

Printed: placements per second (the whole loop: core and fakes), the same
loop with a trivial placement (a free-CPU list and round-robin clients:
the fakes' own cost) as the reference measured in the same run, their
ratio, the CPU share of each client while every client still had work
against its weight's share, and the memory the core holds per node and
per queued job (tracemalloc, a separate pass).  Issue 11 asks for >= 100,000
placements per second at 1,000 nodes and 1,000,000 jobs with fair shares.
"""
from __future__ import annotations

import argparse
import gc
import heapq
import os
import random
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpool.core.scheduler import Scheduler
from dpool.core.share import FairShare


def durations(jobs, seed=11):
    rng = random.Random(seed)
    return [0.5 + rng.random() for _ in range(jobs)]


def submit_all(fair, weights, jobs):
    """One client per weight, jobs split evenly, ids 0..jobs-1 interleaved."""
    k = len(weights)
    for c, weight in enumerate(weights):
        fair.add_client(c, weight)
        fair.submit(c, range(c, jobs, k))


def run_core(nodes, cpus, weights, dur):
    """The scheduler core: FairShare + Scheduler.  Returns (placements,
    seconds, CPU time per client of the jobs started while all had work)."""
    fair, sched = FairShare(), Scheduler()
    submit_all(fair, weights, len(dur))
    for n in range(nodes):
        sched.add_node(n, cpus)
    events: list = [(0.0, None, None)] * (nodes * cpus)  # the CPUs start free
    busy_time = [0.0] * len(weights)
    all_busy, k = True, len(weights)
    placed = 0
    pick, submit, fdone, sdone = fair.pick, sched.submit, fair.done, sched.done
    backlogged = fair.backlogged
    push, pop = heapq.heappush, heapq.heappop
    gc.collect()
    gc.disable()
    t0 = time.process_time()
    while events:
        now, node, job = pop(events)
        if job is not None:
            sdone(node, job, dur[job], now)
            fdone(job)
        got = pick()
        if got is None:
            continue
        client, job = got
        (send,) = submit((job,), now)  # one job, a free CPU: one Send
        push(events, (now + dur[job], send.node, job))
        placed += 1
        if all_busy:
            busy_time[client] += dur[job]
            all_busy = backlogged() == k
    elapsed = time.process_time() - t0
    gc.enable()
    assert placed == len(dur) and sched.pending() == 0 and fair.queued() == 0
    return placed, elapsed, busy_time


def run_reference(nodes, cpus, weights, dur):
    """The same loop with a trivial placement (the fakes' own cost): a list
    of free CPUs, clients in turn."""
    k = len(weights)
    queues = [list(range(c, len(dur), k))[::-1] for c in range(k)]
    free = [n for n in range(nodes) for _ in range(cpus)]
    events: list = [(0.0, None, None)] * (nodes * cpus)
    placed = turn = 0
    push, pop = heapq.heappush, heapq.heappop
    gc.collect()
    gc.disable()
    t0 = time.process_time()
    while events:
        now, node, job = pop(events)
        if job is not None:
            free.append(node)
        for _ in range(k):
            turn = (turn + 1) % k
            if queues[turn]:
                job = queues[turn].pop()
                push(events, (now + dur[job], free.pop(), job))
                placed += 1
                break
    elapsed = time.process_time() - t0
    gc.enable()
    assert placed == len(dur)
    return placed, elapsed


def memory(nodes, cpus, jobs, weights):
    """Bytes the core holds: per node (empty), and per queued job."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    fair, sched = FairShare(), Scheduler()
    for n in range(nodes):
        sched.add_node(n, cpus)
    with_nodes = tracemalloc.get_traced_memory()[0]
    submit_all(fair, weights, jobs)
    queued = tracemalloc.get_traced_memory()[0]
    for _ in range(nodes * cpus):  # and running: one job per CPU
        got = fair.pick()
        sched.submit((got.job,))
    full = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return ((with_nodes - base) / nodes, (queued - with_nodes) / jobs,
            (full - queued) / (nodes * cpus))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--cpus", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--weights", type=float, nargs="+", default=[1, 1, 2, 4])
    ap.add_argument("--runs", type=int, default=1, help="interleaved runs; medians shown")
    args = ap.parse_args()
    print("command: python bench/bench_scheduler_sim.py " + " ".join(sys.argv[1:]))
    print(f"load: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    dur = durations(args.jobs)
    core, ref = [], []
    for _ in range(args.runs):
        placed, t_core, busy = run_core(args.nodes, args.cpus, args.weights, dur)
        core.append(t_core)
        ref.append(run_reference(args.nodes, args.cpus, args.weights, dur)[1])
    t_core, t_ref = sorted(core)[len(core) // 2], sorted(ref)[len(ref) // 2]
    print(f"{args.nodes} nodes x {args.cpus} CPUs, {placed:,} jobs, clients with weights "
          f"{args.weights}")
    print(f"scheduler core: {placed / t_core:>12,.0f} placements/s ({t_core:.2f} s)")
    print(f"reference loop: {placed / t_ref:>12,.0f} placements/s ({t_ref:.2f} s)  "
          f"core/reference time: {t_core / t_ref:.2f}")
    total, wsum = sum(busy), sum(args.weights)
    for c, w in enumerate(args.weights):
        print(f"  client {c} (weight {w:g}): {busy[c] / total:6.1%} of the CPU time started "
              f"while all had work (fair: {w / wsum:6.1%})")
    per_node, per_job, per_running = memory(args.nodes, args.cpus,
                                            min(args.jobs, 200_000), args.weights)
    print(f"memory: {per_node:,.0f} B per node, {per_job:,.0f} B per queued job, "
          f"{per_running:,.0f} B more per running job")
    verdict = "MET" if placed / t_core >= 100_000 else "MISS"
    print(f"{verdict}: >= 100,000 placements/s (issue 11 asks it at 1,000 nodes, "
          f"1,000,000 jobs)")


if __name__ == "__main__":
    main()
