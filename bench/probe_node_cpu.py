"""Where a job's CPU goes on one dpool-node, its workers and a dpool-scheduler
(issue 11), at the real pace: ``perf stat`` (CPU per job by task-clock,
context switches and syscalls per job) or ``strace -c`` (syscalls per job, by
name) attached to each part while an Executor runs ``--jobs`` jobs of
``time.sleep(--seconds)`` on one node of ``--cpus`` CPUs, given the node or
(``--scheduler``) through a dpool-scheduler over it.

    python bench/probe_node_cpu.py [--jobs 2000] [--cpus 8] [--scheduler]
                                   [--tool perf|strace|record] [--keep DIR]
                                   [--rounds 1] [TREE ...]

Each TREE (a directory holding a ``dpool`` package; default: this one) is run
in turn, ``--rounds`` times, the trees alternating (an A/B on a shared
machine: compare medians).  Attached after a warm-up; figures per job.  On a
machine where the load moves, the counts (syscalls, context switches) move
less than the times; neither is load-free (how many messages one loop pass
reads depends on the pace): see bench_cpu_scheduler.py for instructions.
``--tool record``: ``perf record -g`` of each part instead (``--keep DIR``
gets node.data, workers.data, scheduler.data for ``perf report -i``).
"""
import argparse
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import os, sys, time, subprocess, psutil, signal
sys.path.insert(0, sys.argv[1])
from _common import first_line, listen_port, stop
from dpool.futures import Executor

jobs, cpus, seconds, via, tool, out_dir = (int(sys.argv[2]), int(sys.argv[3]),
                                           float(sys.argv[4]), sys.argv[5] == "1",
                                           sys.argv[6], sys.argv[7])


def daemon(args, name):
    out = open(os.path.join(out_dir, name), "w+b")
    proc = subprocess.Popen([sys.executable, "-m", *args, "--loglevel", "WARNING"],
                            stdout=out, stderr=subprocess.DEVNULL)

    def text():
        out.seek(0)
        return out.read().decode(errors="replace")
    return proc, listen_port(first_line(text, proc, 120))


node, port = daemon(["dpool.daemons.node", "--host", "127.0.0.2", "--port", "0",
                     "--cpus", str(cpus)], "node")
sched = None
try:
    if via:
        sched, sport = daemon(["dpool.daemons.scheduler", "--port", "0",
                               "--nodes", f"127.0.0.2:{port}"], "scheduler")
        kwargs = dict(scheduler=f"127.0.0.1:{sport}")
    else:
        kwargs = dict(nodes=f"127.0.0.2:{port}")
    with Executor(**kwargs) as ex:
        deadline = time.monotonic() + 120
        while sum(link.cpus for link in ex._client.nodes()) < cpus:
            assert time.monotonic() < deadline, "the node did not join"
            time.sleep(0.2)
        for f in [ex.submit(time.sleep, seconds) for _ in range(4 * cpus)]:
            f.result()
        children = psutil.Process(node.pid).children(recursive=True)
        parts = {"node": [node.pid],
                 "workers": [c.pid for c in children if c.ppid() != node.pid]}
        if sched is not None:
            parts["scheduler"] = [sched.pid]
        probes = {}
        for part, pids in parts.items():
            if tool == "perf":
                cmd = ["perf", "stat", "-x", ",", "-e",
                       "task-clock,context-switches,raw_syscalls:sys_enter",
                       "-p", ",".join(map(str, pids))]
            elif tool == "record":
                cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-g",
                       "-o", os.path.join(out_dir, part + ".data"),
                       "-p", ",".join(map(str, pids))]
            else:
                cmd = ["strace", "-c", "-f", *(a for pid in pids for a in ("-p", str(pid)))]
            probes[part] = subprocess.Popen(cmd, stderr=open(os.path.join(out_dir, part + ".txt"),
                                                              "w"))
        time.sleep(1)  # (attached)
        for f in [ex.submit(time.sleep, seconds) for _ in range(jobs)]:
            f.result()
        for probe in probes.values():
            probe.send_signal(signal.SIGINT)
        for probe in probes.values():
            probe.wait()
finally:
    if sched is not None:
        stop(sched)
    stop(node)
"""


def parse(path, tool, jobs):
    """{figure: value per job} from a perf stat -x or strace -c output."""
    out = {}
    with open(path) as f:
        for line in f:
            if tool == "perf":
                fields = line.strip().split(",")
                if len(fields) > 2 and fields[0].replace(".", "").isdigit():
                    value, name = float(fields[0]), fields[2]
                    if name == "task-clock":   # (ms)
                        out["us CPU"] = 1000 * value / jobs
                    elif name == "context-switches":
                        out["switches"] = value / jobs
                    elif name.startswith("raw_syscalls"):
                        out["syscalls"] = value / jobs
            else:
                m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
                if m and m.group(2) != "total":
                    out[m.group(2)] = int(m.group(1)) / jobs
    return out


def one(tree, args):
    with tempfile.TemporaryDirectory() as out_dir:
        env = dict(os.environ, PYTHONPATH=tree, DPOOL_SECRET=secrets.token_hex(16))
        subprocess.run([sys.executable, "-c", CHILD, HERE, str(args.jobs), str(args.cpus),
                        str(args.seconds), "1" if args.scheduler else "0", args.tool, out_dir],
                       env=env, cwd=tree, check=True, timeout=1800)
        if args.tool == "record":
            for part in ("node", "workers", "scheduler"):
                data = os.path.join(out_dir, part + ".data")
                if os.path.exists(data) and args.keep:
                    os.makedirs(args.keep, exist_ok=True)
                    shutil.copy(data, os.path.join(args.keep, part + ".data"))
            return {}
        return {part: parse(os.path.join(out_dir, part + ".txt"), args.tool, args.jobs)
                for part in ("node", "workers", "scheduler")
                if os.path.exists(os.path.join(out_dir, part + ".txt"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="*", default=[os.path.dirname(HERE)])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--cpus", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=0.05)
    ap.add_argument("--scheduler", action="store_true", help="through a dpool-scheduler")
    ap.add_argument("--tool", choices=("perf", "strace", "record"), default="perf")
    ap.add_argument("--keep", metavar="DIR", help="(record) copy each part's perf.data here")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    runs = {tree: [] for tree in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            load = os.getloadavg()[0]
            runs[tree].append(one(tree, args))
            print(f"{tree} (load {load:.1f}): " + "; ".join(
                f"{part}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(figs.items()))
                for part, figs in runs[tree][-1].items()), flush=True)
    print(f"\nmedians per job over {args.rounds} rounds ({args.jobs} x sleep({args.seconds}), "
          f"1 node x {args.cpus} CPUs{', through a dpool-scheduler' if args.scheduler else ''}):")
    for tree, rows in runs.items():
        print(f"  {tree}")
        for part in rows[0]:
            keys = sorted(set().union(*(row[part] for row in rows)))
            print(f"    {part:9s} " + ", ".join(
                f"{k} {statistics.median(row[part].get(k, 0.0) for row in rows):.2f}"
                for k in keys))
    print(f"load {os.getloadavg()[0]:.1f}; command: python bench/probe_node_cpu.py "
          + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
