"""Small tasks and start-up, every API, local and via a node (issue 13).

    python bench/bench_small.py [--quick] [--rounds 3] [--json FILE] [--skip cpu]
                                [--only round-trip burst startup map]

Each measure is a ratio against ``multiprocessing`` measured in the same
run: the rounds are interleaved (dpool, reference, dpool, reference...) and
each side's figure is its median over the rounds, so load from other jobs
on the machine hits both alike.  "node" is a ``dpool-node`` subprocess on
127.0.0.1, port 0, with a secret: every message after the handshake goes
in AES-GCM records, as users run it.

| measure | reference | target |
|---|---|---|
| round trip (submit, wait), local Executor / Pool.apply | mp.Pool.apply | <= 0.5x |
| round trip, local JobCluster (its lone jobs go direct as Executor's) | mp.Pool.apply | <= 0.5x |
| round trip via the node, Executor / Pool.apply / JobCluster | mp.Pool.apply | <= 1.0x |
| 10,000 no-ops at once, every API, local and via the node | mp.Pool.apply_async | >= 1.5x |
| create + 1 task + shutdown, local / via the node | (absolute) | <= 0.05 s / 0.1 s |
| the same, a fresh process's first pool, imports in | (absolute; mp shown) | <= 0.05 s / 0.1 s |
| 64 CPU-bound ~50 ms tasks, Executor.map | two bare processes | >= 0.97 |
| 1M ints (a list, and a range), Pool.map, local and via the node | mp.Pool.map | >= 1.5x |
| the same, Executor.map with mp's chunk size (1M / 8) | mp.Pool.map | >= 1.0x |
| Executor.map, default chunksize=1 (20,000 ints, one job each) | mp.Pool.map (1M) | (shown) |

The maps' figures are items per second; ``mp.Pool.map`` gets the same input
(a ``list`` or a ``range``) with its own default chunk size.

``--json FILE`` writes the ratios (what bench/check_regressions.py reads).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import traceback

from _common import (CPUS, MP, ROOT, bare_processes, clock, cpu_seconds, settle,
                     start_node_daemon, stop_node_daemon)

SECRET = "bench-small-secret"


def noop(x=None):
    return x


def inc(x):
    return x + 1


def spin(n):
    total = 0
    for i in range(n):
        total += i * i
    return total


# ------------------------------------------------------------ what is timed

class Side:
    """One API on one placement (``kind``: executor, pool or cluster): one
    task, a burst of tasks, and closing."""

    def __init__(self, name, kind, make):
        self.name, self.kind, self.make = name, kind, make
        self.obj = None

    def __enter__(self):
        self.obj = self.make()
        self.one(0)  # warm: workers started, function shipped
        return self

    def __exit__(self, *exc):
        if self.kind == "executor":
            self.obj.shutdown()
        else:
            self.obj.close()
            if self.kind == "pool":
                self.obj.join()

    def one(self, arg):
        if self.kind == "executor":
            return self.obj.submit(noop, arg).result()
        if self.kind == "pool":
            return self.obj.apply(noop, (arg,))
        return self.obj.submit(arg)()  # JobCluster(noop)

    def many(self, n):
        if self.kind == "executor":
            for f in [self.obj.submit(noop, i) for i in range(n)]:
                f.result()
        elif self.kind == "pool":
            for r in [self.obj.apply_async(noop, (i,)) for i in range(n)]:
                r.get()
        else:
            for job in [self.obj.submit(i) for i in range(n)]:
                job()


def sides(node):
    import dpool
    from dpool.futures import Executor

    kw = {} if node is None else {"nodes": [("127.0.0.1", node)], "secret": SECRET}
    ckw = {} if node is None else {"nodes": [f"127.0.0.1:{node}"], "secret": SECRET}
    where = "local" if node is None else "node"
    return {
        f"Executor {where}": Side(f"Executor.submit {where}", "executor",
                                  lambda: Executor(CPUS, **kw)),
        f"Pool {where}": Side(f"Pool.apply_async {where}", "pool",
                              lambda: dpool.Pool(CPUS, **kw)),
        f"JobCluster {where}": Side(f"JobCluster.submit {where}", "cluster",
                                    lambda: dpool.JobCluster(noop, loglevel=40, **ckw)),
    }


def mp_side():
    return Side("mp.Pool", "pool", lambda: MP.Pool(CPUS))


def interleaved(ours, ref, rounds):
    """Median seconds of ``ours()`` and ``ref()``, run in turn."""
    a, b = [], []
    for _ in range(rounds):
        a.append(clock(ours))
        b.append(clock(ref))
    return statistics.median(a), statistics.median(b)


# ------------------------------------------------------------------ a node

# ------------------------------------------------------------------- cases

def case_round_trip(results, node, trips, rounds):
    keys = ["Executor", "Pool", "JobCluster"]
    keys = [f"{key} {'local' if node is None else 'node'}" for key in keys]
    table = sides(node)
    with mp_side() as ref:
        for key in keys:
            with table[key] as ours:
                settle(ours.obj._client, lambda: ours.one(0))  # (via a node: its channel)
                t_ours, t_ref = interleaved(lambda: [ours.one(i) for i in range(trips)],
                                            lambda: [ref.one(i) for i in range(trips)], rounds)
            target = 0.5 if node is None else 1.0
            results[f"round trip {key}"] = report(
                f"round trip, {key} vs mp.Pool.apply", t_ours / trips * 1e6,
                t_ref / trips * 1e6, t_ours / t_ref, "<=", target, "us")


def case_burst(results, node, n, rounds):
    table = sides(node)
    with mp_side() as ref:
        for key, side in table.items():
            with side as ours:
                t_ours, t_ref = interleaved(lambda: ours.many(n), lambda: ref.many(n), rounds)
            results[f"10k no-ops {key}"] = report(
                f"{n} no-ops, {side.name} vs mp apply_async", n / t_ours, n / t_ref,
                t_ref / t_ours, ">=", 1.5, "/s")


def case_startup(results, node, rounds):
    from dpool.futures import Executor

    kw = {} if node is None else {"nodes": [("127.0.0.1", node)], "secret": SECRET}

    def ours():
        with Executor(CPUS, **kw) as ex:
            ex.submit(noop, 1).result()

    def ref():
        with MP.Pool(CPUS) as pool:
            pool.apply(noop, (1,))

    ours()  # imports and the scrypt key of this node warm, as in a running program
    t_ours, t_ref = interleaved(ours, ref, rounds)
    where = "local" if node is None else "node"
    target = 0.05 if node is None else 0.1
    results[f"create+1+shutdown {where}"] = report(
        f"create + 1 task + shutdown, Executor {where} (s; ref mp.Pool)", t_ours, t_ref,
        t_ours, "<=", target, "s")


# A fresh process's first pool: imports + create + 1 task + shutdown, timed
# inside the process from before its first import (the interpreter's own
# start-up, the same for both, left out).
_COLD = """
import time
start = time.perf_counter()
{body}
print(time.perf_counter() - start)
"""
_COLD_OURS = """from dpool.futures import Executor
with Executor({cpus}, **{kw!r}) as ex:
    ex.submit(abs, -1).result()"""
_COLD_REF = """import multiprocessing
with multiprocessing.get_context("fork").Pool({cpus}) as pool:
    pool.apply(abs, (-1,))"""


def _cold(body):
    """Seconds a fresh interpreter takes to run ``body`` (imports included).
    Imports read their cached bytecode, as an installed package's do (the
    first run writes it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", _COLD.format(body=body)], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    return float(out.stdout.split()[-1])


def case_startup_cold(results, node, rounds):
    kw = {} if node is None else {"nodes": [("127.0.0.1", node)], "secret": SECRET}
    ours, ref = _COLD_OURS.format(cpus=CPUS, kw=kw), _COLD_REF.format(cpus=CPUS)
    _cold(ours)  # bytecode written, as on a program's second run (a client's scrypt is in)
    a, b = [], []
    for _ in range(rounds):
        a.append(_cold(ours))
        b.append(_cold(ref))
    t_ours, t_ref = statistics.median(a), statistics.median(b)
    where = "local" if node is None else "node"
    target = 0.05 if node is None else 0.1
    results[f"cold first pool {where}"] = report(
        f"a fresh process's first Executor {where}, imports in (s; ref mp)", t_ours, t_ref,
        t_ours, "<=", target, "s")


def case_map(results, node, n, rounds):
    """issue 13's map rows: items/s of dpool's maps vs mp.Pool.map's, same
    input.  One dpool side open at a time: a node serves one client."""
    import dpool
    from dpool.futures import Executor

    kw = {} if node is None else {"nodes": [("127.0.0.1", node)], "secret": SECRET}
    where = "local" if node is None else "node"
    chunk = -(-n // (CPUS * 4))  # what mp.Pool.map picks for n items
    small = max(n // 50, 100)
    inputs = (("list", list(range(n))), ("range", range(n)))
    with MP.Pool(CPUS) as ref:
        ref.map(inc, range(10))
        with dpool.Pool(CPUS, **kw) as pool:
            for kind, data in inputs:
                _map_row(results, f"Pool.map {kind} {where}", lambda: pool.map(inc, data),
                         lambda: ref.map(inc, data), n, rounds, 1.5)
        with Executor(CPUS, **kw) as ex:
            for kind, data in inputs:
                _map_row(results, f"Executor.map chunksize={chunk} {kind} {where}",
                         lambda: list(ex.map(inc, data, chunksize=chunk)),
                         lambda: ref.map(inc, data), n, rounds, 1.0)
            few, data = list(range(small)), list(range(n))
            t_ours, t_ref = interleaved(lambda: list(ex.map(inc, few)),
                                        lambda: ref.map(inc, data), rounds)
            results[f"map Executor chunksize=1 {where}"] = report(
                f"map {small} ints, Executor.map chunksize=1 {where} vs mp.Pool.map {n}",
                small / t_ours, n / t_ref, small / t_ours / (n / t_ref), ">=", 1.0, "/s")


def _map_row(results, name, ours, ref, n, rounds, target):
    ours()  # warm: workers started, function shipped
    t_ours, t_ref = interleaved(lambda: _check(ours(), n), lambda: _check(ref(), n), rounds)
    results[f"map {name}"] = report(f"map {n} ints, {name} vs mp.Pool.map", n / t_ours,
                                    n / t_ref, t_ref / t_ours, ">=", target, "/s")


def _check(out, n):
    assert len(out) == n and out[-1] == n, "wrong map result"


def case_cpu_bound(results, rounds):
    """Executor.map of 64 ~50 ms tasks vs the same split over two bare
    processes, in the same session as dpool's workers (see
    _common.bare_processes: with autogroup scheduling the reference is
    otherwise measured against the machine's load).  Rounds alternate which
    side goes first; also shown: the client process's own CPU time per
    dpool run (what it takes from the workers on a 2-core machine)."""
    from dpool.futures import Executor

    n = calibrate()
    tasks = 64
    ours, ref, client_cpu = [], [], []

    def run_ours():
        before = cpu_seconds()
        ours.append(clock(lambda: list(ex.map(spin, [n] * tasks))))
        client_cpu.append(cpu_seconds() - before)

    def run_ref():
        ref.append(clock(lambda: bare_processes(spin, n, tasks)))

    with Executor(CPUS) as ex:
        ex.submit(noop).result()
        for i in range(max(3, rounds)):
            first, second = (run_ours, run_ref) if i % 2 == 0 else (run_ref, run_ours)
            first()
            second()
    t_ours, t_ref = statistics.median(ours), statistics.median(ref)
    results["cpu-bound"] = report("64 CPU-bound ~50 ms tasks vs 2 bare processes", t_ours,
                                  t_ref, t_ref / t_ours, ">=", 0.97, "s")
    print(f"       (client process CPU per dpool run: median {statistics.median(client_cpu):.3f}"
          f" s, {statistics.median(client_cpu) / t_ours:.1%} of its wall time)", flush=True)


def calibrate(seconds=0.05):
    n = 100_000
    while clock(lambda: spin(n)) < seconds / 4:
        n *= 2
    return int(n * seconds / clock(lambda: spin(n)))


# ------------------------------------------------------------------ report

def report(name, ours, ref, ratio, op, target, unit):
    met = ratio <= target if op == "<=" else ratio >= target
    print(f"[{'MET ' if met else 'MISS'}] {name:<58} dpool {ours:10.1f}{unit:<3} "
          f"ref {ref:10.1f}{unit:<3} ratio {ratio:6.3f} (target {op} {target})"
          if unit != "s" else
          f"[{'MET ' if met else 'MISS'}] {name:<58} dpool {ours:10.4f}s   "
          f"ref {ref:10.4f}s   value {ratio:6.3f} (target {op} {target})", flush=True)
    return {"value": ratio, "op": op, "target": target}


def _failed(what):
    print(f"[FAIL] {what}", flush=True)
    return what


def _run_case(name, case, failed):
    """Run a case; one that fails is reported (and kept in ``failed``) and
    the run goes on with the next."""
    try:
        case()
    except Exception as exc:  # (a bench reports what it could not measure)
        traceback.print_exc()
        failed.append(_failed(f"{name}: {type(exc).__name__}: {exc}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tasks")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the ratios here")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["local", "node", "cpu"], help="parts to leave out")
    ap.add_argument("--only", nargs="*", default=["round-trip", "burst", "startup", "map"],
                    choices=["round-trip", "burst", "startup", "map"],
                    help="the cases to run on each placement (default: all)")
    args = ap.parse_args()
    trips, n = (200, 2000) if args.quick else (1000, 10_000)
    load = os.getloadavg()
    print(f"python {' '.join(sys.argv)}  (Python {sys.version.split()[0]}, {os.cpu_count()} "
          f"CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})\n")
    results, failed = {}, []
    placements = [p for p in ("local", "node") if p not in args.skip]
    for where in placements:
        if where == "local":
            proc, node, env = None, None, None
        else:
            try:
                proc, node, env = start_node_daemon(SECRET, CPUS)
            except (SystemExit, Exception) as exc:
                failed.append(_failed(f"starting the node ({exc})"))
                continue
        try:
            cases = [("round-trip", lambda: case_round_trip(results, node, trips, args.rounds)),
                     ("burst", lambda: case_burst(results, node, n, args.rounds)),
                     ("startup", lambda: case_startup(results, node, max(args.rounds, 5))),
                     ("startup", lambda: case_startup_cold(results, node, max(args.rounds, 5))),
                     ("map", lambda: case_map(results, node, 200_000 if args.quick
                                              else 1_000_000, args.rounds))]
            for name, case in cases:
                if name in args.only:
                    _run_case(f"{name} {where}", case, failed)
        finally:
            if env is not None:
                stop_node_daemon(proc, env)
    if "cpu" not in args.skip:
        _run_case("cpu", lambda: case_cpu_bound(results, args.rounds), failed)
    met = sum(1 for r in results.values()
              if (r["value"] <= r["target"] if r["op"] == "<=" else r["value"] >= r["target"]))
    print(f"\n{met}/{len(results)} targets met; load average now "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if failed:
        print(f"{len(failed)} failed: {'; '.join(failed)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
