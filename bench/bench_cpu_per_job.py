"""CPU per job of the client + its embedded node, across commits.

    python bench/bench_cpu_per_job.py [--jobs 20000] [--runs 5] [REV ...]
    python bench/bench_cpu_per_job.py --callgrind [--jobs 2000] [REV ...]
    (either with --api Executor or --api Pool: those APIs' submit instead;
    --api mp: multiprocessing.Pool.apply_async's parent process, the
    reference; --node: through a dpool-node on 127.0.0.1 started from each
    tree, whose own CPU is not counted, instead of the embedded node)

For each REV (a git revision of this repository; default: the working
tree only) the sources are exported (git archive) to a temporary folder
and a fresh interpreter with that tree first on PYTHONPATH runs N no-op
jobs on a JobCluster's embedded node (in-process link), submitted at
once, ``--runs`` times; the figure is the best (lowest) of the runs'
``time.process_time()`` of that process (client and embedded node
threads; the workers are other processes and not counted), over N.
Rows run interleaved (rev A, rev B, ..., then again) so load on the
machine affects each alike.  The last column is the ratio to the first
row.  Compare, e.g., a release candidate with the last release:

    python bench/bench_cpu_per_job.py v1.2 HEAD WORKTREE

With ``--callgrind`` the figure is instructions per job instead, counted
by ``valgrind --tool=callgrind`` (every thread of the client process, not
the workers): the count of a run with 500 + N jobs minus that of a run
with 500, over N.  Instruction counts barely move with the machine's
load, so this is the figure to compare on a shared machine.
"""
import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import gc, os, sys, time

def noop(x=None):
    return x

n, api = int(sys.argv[1]), sys.argv[2]
port = int(os.environ.get("BENCH_NODE_PORT", "0"))  # a dpool-node's, else the embedded node
kw = {"nodes": [("127.0.0.1", port)]} if port else {}
if api == "mp":  # the reference: multiprocessing.Pool's parent process
    import multiprocessing
    pool = multiprocessing.get_context("fork").Pool(2)
    submit, get, close = ((lambda i: pool.apply_async(noop, (i,))), (lambda h: h.get()),
                          pool.terminate)
elif api == "JobCluster":
    import dpool
    # (connect_timeout: slow under valgrind)
    cluster = dpool.JobCluster(noop, loglevel=30, connect_timeout=120, **kw)
    submit, get, close = cluster.submit, (lambda job: job()), cluster.close
elif api == "Executor":
    from dpool.futures import Executor
    ex = Executor(2, connect_timeout=120, **kw)
    submit, get, close = (lambda i: ex.submit(noop, i)), (lambda f: f.result()), ex.shutdown
else:
    import dpool
    pool = dpool.Pool(2, connect_timeout=120, **kw)
    submit, get, close = ((lambda i: pool.apply_async(noop, (i,))), (lambda h: h.get()),
                          pool.terminate)
try:
    for job in [submit(i) for i in range(200)]:  # warm up
        get(job)
    gc.collect()
    t = time.process_time()
    jobs = [submit(i) for i in range(n)]
    for job in jobs:
        get(job)
    print(time.process_time() - t)
finally:
    close()
"""

# A dpool-node for --node: its handshake deadline raised, as the client
# under valgrind answers far slower than the 3 s it allows (nothing else
# is changed; the node itself does not run under valgrind).
NODE = r"""
import sys
import dpool.transport.tcp as tcp
tcp.start_server.__kwdefaults__["auth_timeout"] = 600.0
from dpool.daemons import node
sys.argv[0] = "dpool-node"
node.main()
"""


def export(rev, into):
    """The tree of ``rev`` (or the working tree for WORKTREE) in ``into``."""
    if rev == "WORKTREE":
        return ROOT
    dest = os.path.join(into, rev.replace("/", "_").replace("^", "_p"))
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "dpool"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


@contextlib.contextmanager
def node_env(tree, on):
    """The environment of a client of ``tree``: with ``on``, a dpool-node of
    the same tree on 127.0.0.1 (2 CPUs, AES-GCM records) for it to use."""
    env = dict(os.environ, PYTHONPATH=tree)
    if not on:
        yield env
        return
    env.update(DPOOL_SECRET=os.urandom(16).hex(), DPOOL_HOME=tempfile.mkdtemp())
    node = subprocess.Popen([sys.executable, "-c", NODE, "--port", "0", "--cpus", "2",
                             "--loglevel", "WARNING"], stdout=subprocess.PIPE, env=env,
                            cwd=tree, text=True)
    try:
        line = node.stdout.readline()
        env["BENCH_NODE_PORT"] = line.rsplit(" (pid", 1)[0].rsplit(":", 1)[1]
        yield env
    finally:
        node.terminate()
        node.wait()
        shutil.rmtree(env["DPOOL_HOME"], ignore_errors=True)


def one_run(tree, jobs, api, node=False):
    with node_env(tree, node) as env:
        return _one_run(tree, jobs, api, env)


def _one_run(tree, jobs, api, env):
    out = subprocess.run([sys.executable, "-c", CHILD, str(jobs), api], env=env, cwd=tree,
                         check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


CALLGRIND_BASE = 500


def instructions(tree, jobs, api, node=False):
    """Instructions (callgrind "I refs") of the child process running ``jobs``."""
    with node_env(tree, node) as env, tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
               os.path.realpath(sys.executable), "-c", CHILD, str(jobs), api]
        run = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"the child under valgrind failed:\n{run.stderr[-3000:]}")
    # The embedded node's zygote is forked from the client, and valgrind
    # stays in forked children: count only the process that was started.
    pid = re.search(r"==(\d+)== Command:", run.stderr).group(1)
    refs = re.search(rf"=={pid}== I\s+refs:\s+([\d,]+)", run.stderr).group(1)
    return int(refs.replace(",", ""))


def one_callgrind(tree, jobs, api, node=False):
    return (instructions(tree, CALLGRIND_BASE + jobs, api, node)
            - instructions(tree, CALLGRIND_BASE, api, node))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="*", default=["WORKTREE"],
                    help="git revisions, or WORKTREE for the working tree")
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--api", choices=["JobCluster", "Executor", "Pool", "mp"],
                    default="JobCluster",
                    help="JobCluster.submit, Executor.submit or Pool.apply_async of a no-op "
                         "(mp: multiprocessing.Pool.apply_async, the parent process)")
    ap.add_argument("--node", action="store_true",
                    help="through a dpool-node on 127.0.0.1 (started from each tree; its "
                         "own CPU is not counted) instead of the embedded node")
    ap.add_argument("--callgrind", action="store_true",
                    help="instructions per job under valgrind (default --jobs 2000, --runs 1)")
    args = ap.parse_args()
    if args.callgrind:
        return main_callgrind(args)
    with tempfile.TemporaryDirectory() as tmp:
        trees = [export(rev, tmp) for rev in args.revs]
        best = [float("inf")] * len(trees)
        for _ in range(args.runs):
            for i, tree in enumerate(trees):
                best[i] = min(best[i], one_run(tree, args.jobs, args.api, args.node))
    print(f"{args.jobs} no-op jobs, {args.api} {_where(args)}, best of {args.runs} "
          f"process_time (the client process), per job:")
    for rev, cpu in zip(args.revs, best):
        print(f"  {rev:>12}  {cpu / args.jobs * 1e6:7.2f} us   x{cpu / best[0]:.3f}")


def _where(args):
    if args.api == "mp":
        return "(multiprocessing.Pool's parent)"
    return "via a dpool-node" if args.node else "on the embedded node"


def main_callgrind(args):
    jobs = 2000 if args.jobs == 20000 else args.jobs
    runs = 1 if args.runs == 5 else args.runs
    with tempfile.TemporaryDirectory() as tmp:
        trees = [export(rev, tmp) for rev in args.revs]
        best = [float("inf")] * len(trees)
        for _ in range(runs):
            for i, tree in enumerate(trees):
                best[i] = min(best[i], one_callgrind(tree, jobs, args.api, args.node))
    print(f"{jobs} no-op jobs, {args.api} {_where(args)}, callgrind instructions "
          f"of the client process per job (best of {runs}; load average "
          f"{os.getloadavg()[0]:.1f}):")
    for rev, ins in zip(args.revs, best):
        print(f"  {rev:>12}  {ins / jobs / 1000:7.1f}k   x{ins / best[0]:.3f}")


if __name__ == "__main__":
    main()
