"""Instructions per job in a worker process (callgrind), jobs fed one at a time.

    python bench/bench_cpu_worker.py [--jobs 1000] [--notify] [--ahead N] [--capture] [REV ...]

For each REV (a git revision; default: the working tree only; exported as
bench/bench_cpu_per_job.py does) a worker (``dpool.node.worker.main``, the
code a node's zygote runs in each worker it forks) is started under
``valgrind --tool=callgrind`` on one end of a socketpair; this process plays
its node: INIT (``notify_start`` with ``--notify``: what a scheduler's
clients ask for; a worker that tells starts itself then sends a Started per
job), the function ``time.sleep``, then ``time.sleep(0)`` jobs, one RUN at a
time, each after the previous DONE.  The figure is the difference of the
instruction counts of a run of ``BASE`` jobs and one of ``BASE + --jobs``,
over ``--jobs``: the worker's own CPU per job, without its job's.

``--ahead N`` feeds a burst instead, as a node does short jobs: N jobs
outstanding, and as results come, one Run of as many new jobs as results
read (the worker has its next jobs in hand); ``--capture`` runs the jobs
with their output captured (a JobCluster's sessions).
"""
import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_cpu_per_job import export  # noqa: E402
from bench_cpu_scheduler import totals  # noqa: E402

BASE = 200

WORKER = "import sys; from dpool.node import worker; worker.main(int(sys.argv[1]))"

FEED = r"""
import os, socket, subprocess, sys, time
from dpool import protocol as P, serialize
from dpool.transport import BlockingConnection

jobs, notify, out = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
ahead, capture = int(sys.argv[5]), sys.argv[6] == "1"
ours, theirs = socket.socketpair()
child = subprocess.Popen(
    ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
     "-c", sys.argv[4], str(theirs.fileno())], pass_fds=[theirs.fileno()],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
theirs.close()
conn = BlockingConnection(ours, fds=True)
conn.send([P.encode(P.Init, {"notify_start": notify, "capture": capture})])
conn.send([P.encode(P.Func, 1), serialize.dumps_function(time.sleep)])
args = serialize.dumps_call((0,))
sent = done = 0


def run(k):
    global sent
    conn.send([P.encode(P.Run, [P.run_item(sent + i, 1, len(args), 0) for i in range(1, k + 1)]),
               *args * k])
    sent += k


run(min(ahead, jobs))
while done < jobs:
    back = 0
    while not back or conn.has_data:  # (what has come: one new job per result)
        msg = P.decode(conn.recv()[0])
        back += len(msg.results) if type(msg) is P.Done else 0
    done += back
    if sent < jobs:
        run(min(back, jobs - sent))
conn.close()
assert child.wait() == 0
"""


def instructions(tree, jobs, args):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "worker.out")
        subprocess.run([sys.executable, "-c", FEED, str(jobs), "1" if args.notify else "0", out,
                        WORKER, str(args.ahead), "1" if args.capture else "0"],
                       env=dict(os.environ, PYTHONPATH=tree), cwd=tree, check=True)
        return totals(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="*", default=["WORKTREE"])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--notify", action="store_true", help="INIT with notify_start")
    ap.add_argument("--ahead", type=int, default=1,
                    help="jobs outstanding (1: one at a time; 16: a burst of short jobs)")
    ap.add_argument("--capture", action="store_true", help="INIT with capture (JobCluster's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for rev in args.revs:
            tree = export(rev, tmp)
            small = instructions(tree, BASE, args)
            large = instructions(tree, BASE + args.jobs, args)
            print(f"  {rev:>12}  {(large - small) / args.jobs / 1000:8.1f}k instructions "
                  f"per job in the worker", flush=True)
    print(f"load {os.getloadavg()[0]:.1f}; command: python bench/bench_cpu_worker.py "
          + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
