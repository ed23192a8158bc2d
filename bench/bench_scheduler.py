"""32 nodes x 8 CPUs on loopback: jobs through dpool-scheduler vs an explicit node list.

    python bench/bench_scheduler.py [--nodes 32] [--cpus 8] [--jobs 8000]
                                    [--seconds 0.05] [--rounds 3] [--depth2] [--trace]

Starts ``--nodes`` dpool-node processes (``--cpus`` each) on 127.0.0.2,
127.0.0.3, ... (free ports), then runs
``--jobs`` jobs of ``time.sleep(--seconds)`` with an Executor, in turns
(``--rounds`` each, the order alternating): given the node list, and given
a dpool-scheduler over the nodes (started for its turn: while it runs it
holds the nodes).  Each turn is warmed up first (two jobs per CPU, so every
worker is up) and timed from the first submit to the last result.
Efficiency is the ideal time (jobs x seconds / CPUs: 1.56 s for the
defaults) over the measured one; the figure to read on a shared machine is
the ratio of the two medians (scheduler / node list).  Each turn also
prints the CPU each process used per job (repeatable under load) and the
phases: the first result, the steady rate between 10% and 90% of the
results, the last 10%.  ``--depth2`` adds turns through the scheduler with
the client keeping 2 jobs per CPU there (as at a node; by default
client.SCHEDULER_DEPTH);
``--trace`` (bench/trace_scheduler.py) prints how long a node went from a
result to its next jobs, in the client and in the scheduler, and how often
a node's result found no job queued in the scheduler.
"""
import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import _common  # noqa: E402
import trace_scheduler  # noqa: E402
from _common import first_line, listen_port  # noqa: E402
from dpool.core import client as core_client  # noqa: E402
from dpool.core.status import query_node  # noqa: E402
from dpool.errors import DpoolError  # noqa: E402
from dpool.futures import Executor  # noqa: E402

DEPTH = core_client.SCHEDULER_DEPTH  # jobs per CPU a client keeps at a scheduler


def start(cmd, env, workdir, name):
    out = open(os.path.join(workdir, f"{name}.out"), "w+b")
    with open(os.path.join(workdir, f"{name}.err"), "ab") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=env, cwd=workdir)
    proc.out = out
    return proc


def output(proc):
    """What ``proc`` wrote so far (its stdout is a file)."""
    proc.out.seek(0)
    return proc.out.read().decode(errors="replace")


def start_nodes(args, env, workdir):
    nodes = []
    for k in range(args.nodes):
        nodes.append(start(
            [sys.executable, "-m", "dpool.daemons.node", "--host", f"127.0.0.{k + 2}",
             "--port", "0", "--cpus", str(args.cpus), "--loglevel", "WARNING"],
            env, workdir, f"node{k}"))
    return nodes, [f"127.0.0.{k + 2}:{listen_port(first_line(lambda: output(proc), proc, 120))}"
                   for k, proc in enumerate(nodes)]


def stop(proc):
    _common.stop(proc)
    proc.out.close()


class CpuMeter:
    """CPU seconds (user + system) used by each part between start() and
    stop(): this process (the client), the scheduler, the node daemons, and
    their zygotes and workers.  Repeatable under load, unlike wall time.
    Counted per process: a worker gone by stop() (a previous turn's, killed
    meanwhile) counts nothing, one born after start() all it used."""

    def __init__(self, nodes, sched=None):
        self.parts = {"client": [psutil.Process()],
                      "nodes": [psutil.Process(p.pid) for p in nodes]}
        if sched is not None:
            self.parts["scheduler"] = [psutil.Process(sched.pid)]

    def _sample(self):
        """{part: {pid: (cpu, kernel)}}"""
        used = {part: {proc.pid: _cpu(proc) for proc in procs}
                for part, procs in self.parts.items()}
        used["workers"] = {child.pid: _cpu(child) for proc in self.parts["nodes"]
                           for child in _children(proc)}
        return used

    def start(self):
        self.before = self._sample()

    def stop(self):
        after, self.used, self.kernel = self._sample(), {}, {}
        for part, procs in after.items():
            was = self.before.get(part, {})
            self.used[part] = sum(cpu - was.get(pid, (0.0, 0.0))[0]
                                  for pid, (cpu, _) in procs.items())
            self.kernel[part] = sum(kernel - was.get(pid, (0.0, 0.0))[1]
                                    for pid, (_, kernel) in procs.items())


def _children(proc):
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _cpu(proc):
    """(CPU seconds, of which kernel) of ``proc`` itself (not its reaped
    children: a zygote reaping a previous turn's workers would count their
    whole lives).  The total from its threads' /proc/PID/task/TID/schedstat
    (the kernel scheduler's own count, in ns): the user and system times it
    reports are sampled at its clock tick (10 ms), and a worker that wakes
    for 30 us every 50 ms is charged far from what it used (0-150 us a job
    in the same run); the kernel part is that sampled figure."""
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0, 0.0
    try:
        total = _schedstat(proc.pid)
    except (OSError, ValueError, IndexError):
        total = times.user + times.system
    return total, times.system


def _schedstat(pid):
    """CPU seconds of the threads ``pid`` has now (the client's loop thread
    too: /proc/PID/schedstat alone is the main thread's)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # (the thread ended meanwhile)
            pass
    return total / 1e9


def phases(ends, submitted, seconds, cpus):
    """Where the time went: start (until the first result), the steady rate
    (10% to 90% of the results) against the ideal (cpus / seconds), the tail
    (the last 10%)."""
    n = len(ends)
    lo, hi = ends[n // 10], ends[9 * n // 10]
    rate = (9 * n // 10 - n // 10) / max(hi - lo, 1e-9)
    print(f"  (submitted in {submitted:.2f} s; first result {ends[0]:.3f} s (ideal {seconds}), "
          f"10% at {lo:.2f} s; steady {rate:.0f} jobs/s = {rate * seconds / cpus:.1%} of ideal; "
          f"last 10% {ends[-1] - hi:.2f} s (ideal {0.1 * n * seconds / cpus:.2f}))", flush=True)


def report_cpu(meter, jobs):
    parts = ", ".join(f"{part} {1e6 * used / jobs:.0f} (~{1e6 * meter.kernel[part] / jobs:.0f} "
                      f"kernel)" for part, used in meter.used.items())
    print(f"  (CPU per job, us: {parts}; total {1e6 * sum(meter.used.values()) / jobs:.0f})",
          flush=True)


def turn(mode, addresses, secret, env, workdir, jobs, seconds, cpus, nodes, trace=False):
    """One timed run; the scheduler (which holds the nodes while it runs)
    only for the scheduler's turn, started before the clock starts."""
    trace_scheduler.reset()
    try:
        return _turn(mode, addresses, secret, env, workdir, jobs, seconds, cpus, nodes, trace)
    finally:
        if trace:
            print(f"  (trace, client: {trace_scheduler.summary()})")
            path = env.get("DPOOL_TRACE_OUT")
            if path and os.path.exists(path):
                with open(path) as f:
                    print(f"  (trace, scheduler, warm-up included: {f.read().strip()})")
                os.remove(path)


def _turn(mode, addresses, secret, env, workdir, jobs, seconds, cpus, nodes, trace):
    core_client.SCHEDULER_DEPTH = 2 if mode == "sched depth 2" else DEPTH
    if mode == "node list":
        meter = CpuMeter(nodes)
        elapsed = timed(dict(nodes=",".join(addresses), secret=secret), jobs, seconds, cpus,
                        meter)
        report_cpu(meter, jobs)
        return elapsed
    # (a node the scheduler could not join at once, e.g. its handshake timed
    # out on a loaded machine, is retried in the background: wait for all)
    command = ["-c", "import trace_scheduler as t; t.run_scheduler()"] if trace else \
        ["-m", "dpool.daemons.scheduler"]
    sched = start([sys.executable, *command, "--port", "0",
                   "--nodes", ",".join(addresses), "--loglevel", "WARNING"],
                  env, workdir, "scheduler")
    try:
        address = f"127.0.0.1:{listen_port(first_line(lambda: output(sched), sched, 120))}"
        wait_for_nodes(address, secret, len(addresses))
        meter = CpuMeter(nodes, sched)
        elapsed = timed(dict(scheduler=address, secret=secret), jobs, seconds, cpus, meter)
        report_cpu(meter, jobs)
        return elapsed
    finally:
        stop(sched)


def meet(addresses, secret):
    """Ask each node its status, one after another: this process then holds
    the secret stretched under each node's salt (scrypt, cached), so the
    clients below do not stretch 32 at once, which on a loaded machine takes
    longer than the nodes' 3 s handshake deadline."""
    for address in addresses:
        host, port = address.rsplit(":", 1)
        for _ in range(10):
            try:
                asyncio.run(query_node(host, int(port), secret.encode(), timeout=60))
                break
            except (OSError, TimeoutError, DpoolError):
                time.sleep(1)


def wait_for_nodes(address, secret, count, timeout=300):
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = asyncio.run(query_node(host, int(port), secret.encode(), timeout=30))
        except (OSError, TimeoutError, DpoolError):
            status = {"nodes": []}
        if sum(node["ready"] for node in status["nodes"]) == count:
            return
        time.sleep(1)
    raise SystemExit(f"the scheduler did not join all {count} nodes within {timeout} s")


def all_cpus(ex, cpus, timeout=300):
    """Wait until the executor has every CPU (nodes it could not join at once
    are retried in the background)."""
    deadline = time.monotonic() + timeout
    while sum(link.cpus for link in ex._client.nodes()) < cpus:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {ex._client.nodes()} joined within {timeout} s")
        time.sleep(0.5)


def timed(executor_args, jobs, seconds, cpus, meter):
    with Executor(**executor_args) as ex:
        all_cpus(ex, cpus)
        for f in [ex.submit(time.sleep, seconds) for _ in range(2 * cpus)]:
            f.result()
        meter.start()
        ends = []
        start = time.perf_counter()
        futures = []
        for _ in range(jobs):
            futures.append(ex.submit(time.sleep, seconds))
            futures[-1].add_done_callback(lambda _: ends.append(time.perf_counter()))
        submitted = time.perf_counter() - start
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - start
        meter.stop()
        phases(sorted(t - start for t in ends), submitted, seconds, cpus)
        return elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=32)
    p.add_argument("--cpus", type=int, default=8)
    p.add_argument("--jobs", type=int, default=8000)
    p.add_argument("--seconds", type=float, default=0.05)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth2", action="store_true",
                   help="also turns through the scheduler with 2 jobs per CPU at it")
    p.add_argument("--trace", action="store_true", help="trace the message flow")
    args = p.parse_args()
    if args.trace:
        trace_scheduler.patch_client()
    secret = secrets.token_hex(16)
    # Connecting to 32 nodes stretches the secret under 32 salts (scrypt, ~50 ms
    # of CPU each): on a loaded machine that takes longer than the default 10 s.
    os.environ.setdefault("DPOOL_CONNECT_TIMEOUT", "120")
    env = dict(os.environ, DPOOL_SECRET=secret, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.path.join(ROOT, "bench"), os.environ.get("PYTHONPATH")])))
    cpus = args.nodes * args.cpus
    ideal = args.jobs * args.seconds / cpus
    with tempfile.TemporaryDirectory() as workdir:
        nodes, addresses = start_nodes(args, env, workdir)
        try:
            meet(addresses, secret)
            modes = ["node list", "scheduler"] + (["sched depth 2"] if args.depth2 else [])
            times = {mode: [] for mode in modes}
            for r in range(args.rounds):
                for mode in modes if r % 2 == 0 else reversed(modes):
                    if args.trace:
                        env["DPOOL_TRACE_OUT"] = os.path.join(workdir, "trace.json")
                    elapsed = turn(mode, addresses, secret, env, workdir, args.jobs,
                                   args.seconds, cpus, nodes, args.trace)
                    times[mode].append(elapsed)
                    print(f"round {r + 1} {mode:13s} {elapsed:6.2f} s  efficiency "
                          f"{ideal / elapsed:6.1%}", flush=True)
        finally:
            for proc in nodes:
                stop(proc)
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    print(f"\n{args.jobs} jobs of sleep({args.seconds}) on {args.nodes} nodes x {args.cpus} "
          f"CPUs: ideal {ideal:.2f} s")
    for mode, median in medians.items():
        print(f"  {mode:13s} median {median:6.2f} s  efficiency {ideal / median:6.1%}")
    print(f"  scheduler / node list: {medians['scheduler'] / medians['node list']:.3f} "
          f"(1.0 = the scheduler costs nothing)")
    print(f"load: {os.getloadavg()[0]:.1f}; command: python bench/bench_scheduler.py "
          f"--nodes {args.nodes} --cpus {args.cpus} --jobs {args.jobs} --seconds {args.seconds} "
          f"--rounds {args.rounds}" + " --depth2" * args.depth2 + " --trace" * args.trace)


if __name__ == "__main__":
    main()
