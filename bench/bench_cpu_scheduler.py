"""Instructions per job in every process on the path through dpool-scheduler.

    python bench/bench_cpu_scheduler.py [--nodes 1] [--cpus 4] [--jobs 400]
                                        [--seconds 0.05] [--nodes-list] [REV ...]
    python bench/bench_cpu_scheduler.py --only nodes [scheduler] [client] [...]
    python bench/bench_cpu_scheduler.py --profile [--profile-sort ncalls] [...]
    python bench/bench_cpu_scheduler.py --keep DIR [...]

For each REV (a git revision; default: the working tree only; exported as
bench/bench_cpu_per_job.py does) ``--nodes`` ``dpool-node``s (``--cpus``
workers each, on 127.0.0.2, .3, ...), a ``dpool-scheduler`` over them and a
client (an ``Executor`` given the scheduler's address; with
``--nodes-list``, given the nodes instead, and no scheduler) each run under
``valgrind --tool=callgrind`` (the nodes' zygotes too), and the client runs
``time.sleep(--seconds)`` jobs: a warm-up, then ``BASE`` jobs, or
``BASE + --jobs``.  The figure per process is the difference of the two
runs' instruction counts over ``--jobs``: client, scheduler, nodes (the
daemons, summed), zygotes.  The workers are not counted (their node kills
them at its end, before valgrind writes their counts; bench_scheduler.py's
CPU times put them at a sixth of the path's CPU).  Instruction counts
barely move with the machine's load: the figure to compare CPU per job on
a shared machine (``bench/bench_scheduler.py`` gives the wall time).  But
every process is ~50x slower under valgrind, so more messages wait per
pass of each loop than at full speed: a cut that batches messages shows
larger here than it is.  The handshake deadline of the daemons is raised
for the run.  ``--only``: only those parts under valgrind (the others, and
the zygotes and workers, run at full speed: quicker, and the node's or the
scheduler's loop sees messages nearer their real pace).  ``--profile``: no
valgrind, one run of ``--jobs``, and the cProfile of the scheduler and of
the first node printed.  ``--keep DIR``: each run's callgrind files are
copied to DIR/<jobs>/ (``callgrind_annotate`` on the two runs' node files,
subtracted, is where a node's instructions per job go).
"""
import argparse
import glob
import os
import secrets
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402
from _common import first_line, listen_port  # noqa: E402
from bench_cpu_per_job import export  # noqa: E402

BASE = 100
ROOT_TREE = os.path.dirname(HERE)

# A daemon under valgrind answers a handshake far slower than the 3 s the
# other side allows: the deadline is raised (nothing else is changed).
DAEMON = r"""
import sys
import dpool.transport.tcp as tcp
tcp.start_server.__kwdefaults__["auth_timeout"] = 600.0
from dpool.daemons import {module} as daemon
sys.argv[0] = "{module}"
profile = {profile!r}
if profile:
    import gc, time
    _gc = [0.0, 0, None]
    def _gc_time(phase, info):
        if phase == "start":
            _gc[2] = time.perf_counter()
        elif _gc[2] is not None:
            _gc[0] += time.perf_counter() - _gc[2]
            _gc[1] += 1
    gc.callbacks.append(_gc_time)
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
try:
    daemon.main()
finally:
    if profile:
        prof.disable()
        prof.dump_stats(profile)
        with open(profile + ".gc", "w") as f:
            f.write(f"{{_gc[0]:.6f}} {{_gc[1]}}")
"""

CLIENT = r"""
import sys, time
from dpool.futures import Executor

address, cpus, jobs, seconds, mode = sys.argv[1:6]
cpus, jobs, seconds = int(cpus), int(jobs), float(seconds)
kwargs = {"scheduler": address} if mode == "scheduler" else {"nodes": address}
with Executor(**kwargs) as ex:
    deadline = time.monotonic() + 600
    while sum(link.cpus for link in ex._client.nodes()) < cpus:
        assert time.monotonic() < deadline, "the node did not join"
        time.sleep(0.2)
    for f in [ex.submit(time.sleep, seconds) for _ in range(2 * cpus)]:
        f.result()
    for f in [ex.submit(time.sleep, seconds) for _ in range(jobs)]:
        f.result()
print("done", flush=True)
"""


PROFILE = False  # --profile: cProfile instead of valgrind
PROFILE_SORT, PROFILE_LINES = "tottime", 25  # --profile-sort, --profile-lines
KEEP = None  # --keep DIR: the callgrind output files of each run are copied there
ONLY = ()  # --only: the parts run under valgrind (the others natively, at full speed)


def _part(name):
    return "nodes" if name.startswith("node") else name


def valgrind(out_dir, name, trace_children=False):
    if PROFILE or (ONLY and _part(name) not in ONLY):
        return [sys.executable]
    if ONLY:
        trace_children = False  # (the zygote and workers at full speed too)
    children = "yes" if trace_children else "no"
    return ["valgrind", "--tool=callgrind", f"--trace-children={children}",
            f"--callgrind-out-file={out_dir}/{name}.%p", os.path.realpath(sys.executable)]


def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def daemon(tree, env, out_dir, module, args, name, trace_children=False):
    out = os.path.join(out_dir, f"{name}.stdout")
    with open(out, "wb") as o, open(os.path.join(out_dir, f"{name}.stderr"), "wb") as e:
        profile = os.path.join(out_dir, f"{name}.prof") if PROFILE else ""
        proc = subprocess.Popen(valgrind(out_dir, name, trace_children)
                                + ["-c", DAEMON.format(module=module, profile=profile), *args],
                                stdout=o, stderr=e, env=env, cwd=tree)
    return proc, listen_port(first_line(lambda: read_text(out), proc, 600, 0.2))


def stop(proc):
    _common.stop(proc, 300)  # (a daemon under valgrind: slow to end)


def totals(path):
    """The instruction count in one callgrind output file."""
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    return 0


def one_run(tree, args, jobs):
    """Instructions per part for a run of ``jobs`` (after the warm-up)."""
    env = dict(os.environ, PYTHONPATH=tree, DPOOL_SECRET=secrets.token_hex(16),
               DPOOL_CONNECT_TIMEOUT="600")
    with tempfile.TemporaryDirectory() as out_dir:
        nodes, addresses, sched = [], [], None
        try:
            for k in range(args.nodes):
                node, port = daemon(tree, env, out_dir, "node",
                                    ["--host", f"127.0.0.{k + 2}", "--port", "0",
                                     "--cpus", str(args.cpus), "--loglevel", "WARNING"],
                                    f"node{k}", trace_children=True)
                nodes.append(node)
                addresses.append(f"127.0.0.{k + 2}:{port}")
            address = ",".join(addresses)
            mode = "nodes" if args.nodes_list else "scheduler"
            if not args.nodes_list:
                sched, port = daemon(tree, env, out_dir, "scheduler",
                                     ["--port", "0", "--nodes", address, "--loglevel", "WARNING"],
                                     "scheduler")
                address = f"127.0.0.1:{port}"
            cpus = args.nodes * args.cpus
            subprocess.run(valgrind(out_dir, "client") + [
                "-c", CLIENT, address, str(cpus), str(jobs), str(args.seconds), mode],
                env=env, cwd=tree, check=True, capture_output=True, timeout=3600)
        finally:
            if sched is not None:
                stop(sched)
            for node in nodes:
                stop(node)
        if PROFILE:
            show_profiles(out_dir)
            return {}
        if KEEP:
            _keep(out_dir, jobs)
        # (the workers are SIGKILLed when their node stops: they leave no
        # counts; the zygotes' are counted, as "zygotes")
        parts = {"client": 0, "scheduler": 0, "nodes": 0, "zygotes": 0}
        daemons = {node.pid for node in nodes}
        for path in glob.glob(os.path.join(out_dir, "*.[0-9]*")):
            name, pid = os.path.basename(path).rsplit(".", 1)
            if name.startswith("node"):
                name = "nodes" if int(pid) in daemons else "zygotes"
            parts[name] += totals(path)
        return parts


def _keep(out_dir, jobs):
    """Copy a run's callgrind files to KEEP/<jobs>/ (for callgrind_annotate)."""
    import shutil

    dest = os.path.join(KEEP, str(jobs))
    os.makedirs(dest, exist_ok=True)
    for path in glob.glob(os.path.join(out_dir, "*.[0-9]*")):
        shutil.copy(path, dest)


def show_profiles(out_dir):
    import pstats
    import shutil

    for name in ("scheduler", "node0"):
        path = os.path.join(out_dir, f"{name}.prof")
        if os.path.exists(path):
            print(f"==== {name}")
            if os.path.exists(path + ".gc"):
                with open(path + ".gc") as f:
                    seconds, count = f.read().split()
                print(f"(the garbage collector: {count} collections, {float(seconds):.3f} s)")
            pstats.Stats(path).sort_stats(PROFILE_SORT).print_stats(PROFILE_LINES)
            if os.environ.get("BENCH_KEEP_PROFILES"):
                shutil.copy(path, os.path.join(os.environ["BENCH_KEEP_PROFILES"], f"{name}.prof"))


def per_job(tree, args):
    small, large = one_run(tree, args, BASE), one_run(tree, args, BASE + args.jobs)
    return {part: (large[part] - small[part]) / args.jobs for part in small}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="*", default=["WORKTREE"])
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=0.05)
    ap.add_argument("--nodes-list", action="store_true",
                    help="the client given the node, no scheduler")
    ap.add_argument("--only", nargs="+", choices=("client", "scheduler", "nodes"),
                    help="run only these parts under valgrind, the others natively: "
                         "quicker, and the timing nearer a real run's (without the zygotes)")
    ap.add_argument("--keep", metavar="DIR",
                    help="copy each run's callgrind files to DIR/<jobs>/ (callgrind_annotate "
                         "--inclusive=yes on the node's shows where its CPU goes)")
    ap.add_argument("--profile", action="store_true",
                    help="no valgrind: print each daemon's cProfile (one run of --jobs)")
    ap.add_argument("--profile-sort", default="tottime",
                    help="the profile's order (pstats: tottime, ncalls, cumtime...)")
    ap.add_argument("--profile-lines", type=int, default=25)
    args = ap.parse_args()
    global ONLY, KEEP
    ONLY = tuple(args.only or ())
    KEEP = args.keep and os.path.abspath(args.keep)
    if args.profile:
        global PROFILE, PROFILE_SORT, PROFILE_LINES
        PROFILE, PROFILE_SORT, PROFILE_LINES = True, args.profile_sort, args.profile_lines
        return one_run(ROOT_TREE, args, args.jobs)
    with tempfile.TemporaryDirectory() as tmp:
        trees = [export(rev, tmp) for rev in args.revs]
        rows = [per_job(tree, args) for tree in trees]
    print(f"{args.jobs} jobs of sleep({args.seconds}), {args.nodes} nodes x {args.cpus} CPUs, "
          f"{'node list' if args.nodes_list else 'through dpool-scheduler'}: callgrind "
          f"instructions per job (thousands), load {os.getloadavg()[0]:.1f}")
    print(f"  {'':>12}  " + "  ".join(f"{part:>9}" for part in rows[0]) + "      total")
    for rev, row in zip(args.revs, rows):
        print(f"  {rev:>12}  " + "  ".join(f"{v / 1000:9.1f}" for v in row.values())
              + f"  {sum(row.values()) / 1000:9.1f}")
    print("command: python bench/bench_cpu_scheduler.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
