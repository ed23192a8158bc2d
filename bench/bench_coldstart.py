"""A fresh process's first pool (issue 13), across commits.

    python bench/bench_coldstart.py [--rounds 10] [--node] [REV ...]
    python bench/bench_coldstart.py --callgrind [--node] [REV ...]

For each REV (a git revision of this repository, exported with git archive;
``WORKTREE``, the default, for the working tree) a fresh interpreter
imports ``dpool.futures``, makes an ``Executor(2)``, runs one task and
shuts down: ``bench_small.py``'s cold row, timed inside the process from
before its first import, phase by phase (import, create, task, shutdown).
Revisions take turns, with ``multiprocessing.Pool``'s fresh process as the
reference, ``--rounds`` times; medians.  Bytecode is written first (as an
installed package's is).  ``--node``: through a ``dpool-node`` on
127.0.0.1 started from the working tree (AES-GCM records; the client's
scrypt is in the figure, as in a fresh process's).

``--callgrind``: instructions of the client process instead (``valgrind
--tool=callgrind``; not its zygote or workers), which barely move with the
machine's load: the figure to compare revisions with on a shared machine.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from _common import start_node_daemon, stop_node_daemon
from bench_cpu_per_job import export

SECRET = "bench-coldstart-secret-0123456789"
PHASES = ("import", "create", "task", "shutdown", "total")
CHILD = """
import time
start = time.perf_counter()
from dpool.futures import Executor
t1 = time.perf_counter()
with Executor(2, **{kw!r}) as ex:
    t2 = time.perf_counter()
    ex.submit(abs, -1).result()
    t3 = time.perf_counter()
t4 = time.perf_counter()
print(t1 - start, t2 - t1, t3 - t2, t4 - t3, t4 - start)
"""
REFERENCE = """
import time
start = time.perf_counter()
import multiprocessing
with multiprocessing.get_context("fork").Pool(2) as pool:
    pool.apply(abs, (-1,))
print(0, 0, 0, 0, time.perf_counter() - start)
"""


def _env(tree):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = tree
    return env


def run(tree, code, cmd=()):
    out = subprocess.run([*cmd, sys.executable, "-c", code], env=_env(tree), cwd=tree,
                         capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise SystemExit(f"{tree}: exit status {out.returncode}\n{out.stderr[-2000:]}")
    return out


def phases(tree, code):
    return [float(x) for x in run(tree, code).stdout.split()[-5:]]


def instructions(tree, code, tries=3):
    """Instructions of the client process (the first valgrind names).  Under
    valgrind the zygote forked from the client dies at once and the node
    starts a fresh one (a valgrind artefact, in every revision alike); now
    and then the first worker is asked of the dead one and the pool breaks:
    such a run is made again."""
    for attempt in range(tries):
        try:
            with tempfile.TemporaryDirectory() as out:
                res = run(tree, code, ["valgrind", "--tool=callgrind",
                                       f"--callgrind-out-file={out}/cg.%p"])
            break
        except SystemExit:
            if attempt == tries - 1:
                raise
    lines = res.stderr.splitlines()
    main = lines[0].split("==")[1]
    return next(int(line.split()[-1].replace(",", "")) for line in lines
                if line.startswith(f"=={main}== Collected"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="*", default=["WORKTREE"],
                    help="git revisions, or WORKTREE for the working tree")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--node", action="store_true", help="through a dpool-node on 127.0.0.1")
    ap.add_argument("--callgrind", action="store_true", help="instructions instead of time")
    args = ap.parse_args()
    node, env = None, {}
    with tempfile.TemporaryDirectory() as into:
        trees = {rev: export(rev, into) for rev in args.revs}
        try:
            kw = {}
            if args.node:
                node, port, env = start_node_daemon(SECRET, 2)
                kw = {"nodes": [("127.0.0.1", port)], "secret": SECRET.encode()}
            code = CHILD.format(kw=kw)
            print(f"# {' '.join(sys.argv)}; load {os.getloadavg()[0]:.1f}")
            if args.callgrind:
                for rev, tree in trees.items():
                    run(tree, code)  # bytecode written
                    print(f"{rev}: {instructions(tree, code) / 1e6:.1f}M instructions")
                return
            report(trees, code, args.rounds)
        finally:
            if node is not None:
                stop_node_daemon(node, env)
    print(f"# load {os.getloadavg()[0]:.1f} at the end")


def report(trees, code, rounds):
    rows = {rev: [] for rev in trees}
    rows["mp.Pool"] = []
    for tree in trees.values():
        run(tree, code)  # bytecode written
    for _ in range(rounds):
        for rev, tree in trees.items():
            rows[rev].append(phases(tree, code))
        rows["mp.Pool"].append(phases(next(iter(trees.values())), REFERENCE))
    first = None
    for rev, samples in rows.items():
        medians = [statistics.median(column) for column in zip(*samples)]
        first = first or medians[-1]
        named = zip(PHASES, medians) if rev != "mp.Pool" else [("total", medians[-1])]
        cells = " ".join(f"{name} {value * 1000:.1f}" for name, value in named)
        print(f"{rev:>12}: {cells} ms (medians of {rounds}); x{medians[-1] / first:.2f}")


if __name__ == "__main__":
    main()
