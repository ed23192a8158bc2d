"""Instructions per round trip via a dpool-node, leg by leg: client, node, worker.

    python bench/bench_roundtrip_legs.py [--calls 1000] [--api executor|cluster] [REV ...]

For each REV (a git revision, or WORKTREE for the working tree, the
default; exported as bench_cpu_per_job.py does) a client process and a
``dpool-node`` on 127.0.0.1 (AES-GCM records, as users run it) run under
``valgrind --tool=callgrind``, the node's zygote and workers with it.
After 200 warm-up calls, instrumentation is switched on in all of them
(``callgrind_control -i on``) for ``--calls`` lone round trips
(``Executor.submit(noop, i).result()``, or ``JobCluster.submit(i)()``),
then off.  The figures are instructions per call of each process: the
client (every thread), the node, and its workers together.  Instruction
counts barely move with the machine's load (about 1% between runs), so
this is what to compare on a shared machine, e.g. before and after a
change to the node:

    python bench/bench_roundtrip_legs.py main WORKTREE

(The wall-clock round trip against ``mp.Pool.apply``:
bench_roundtrip_node.py and bench_small.py.)
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

from bench_cpu_per_job import export

SECRET = "bench-roundtrip-legs-secret"
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe_offpath.py")

CHILD = r"""
import os, subprocess, sys

api, calls, out, secret = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
daemon = ["-m", "dpool.daemons.node"] if sys.argv[5] == "node" \
    else [sys.argv[5], "--probe-node"]  # (bench/probe_offpath.py)
env = dict(os.environ, DPOOL_SECRET=secret, DPOOL_HOME=out)
node = subprocess.Popen(
    ["valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no",
     f"--callgrind-out-file={out}/cg.%p", sys.executable, *daemon,
     "--port", "0", "--cpus", "2", "--loglevel", "WARNING"],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
line = node.stdout.readline()
port = int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1])


def noop(x=None):
    return x


def tree(pid):
    found = [pid]
    for p in found:
        for task in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{task}/children") as f:
                found += [int(x) for x in f.read().split()]
    return found


def instrument(pids, on):
    for pid in pids:
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)],
                       capture_output=True)


try:
    if api == "cluster":
        import dpool
        client = dpool.JobCluster(noop, nodes=[f"127.0.0.1:{port}"], secret=secret,
                                  loglevel=40, connect_timeout=120)
        one = lambda i: client.submit(i)()
    else:
        from dpool.futures import Executor
        client = Executor(2, nodes=[("127.0.0.1", port)], secret=secret,
                          connect_timeout=120, heartbeat=(60.0, 240.0) if daemon[0] != "-m"
                          else None)
        one = lambda i: client.submit(noop, i).result()
    for i in range(200):
        one(i)
    pids = [os.getpid(), *tree(node.pid)]
    instrument(pids, True)
    for i in range(calls):
        one(i)
    instrument(pids, False)
    for pid in pids[2:]:  # killed when the session ends: dumped now
        subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True)
    print("client", os.getpid(), "node", node.pid)
    client.close() if api == "cluster" else client.shutdown()
finally:
    node.terminate()
    node.wait()
"""


def legs(tree, api, calls, probe=False, tries=3):
    """{"client", "node", "workers"}: instructions per call in ``tree``.
    (Under valgrind on a loaded machine the handshake may miss the node's
    deadline: the run is tried again.)"""
    for attempt in range(tries):
        try:
            return _legs(tree, api, calls, probe)
        except RuntimeError as exc:
            if attempt == tries - 1:
                raise
            print(f"(tried again: {str(exc).splitlines()[-1]})", file=sys.stderr)


def _legs(tree, api, calls, probe):
    env = dict(os.environ, PYTHONPATH=tree)
    with tempfile.TemporaryDirectory() as out:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={out}/cg.%p", os.path.realpath(sys.executable), "-c",
               CHILD, api, str(calls), out, SECRET, PROBE if probe else "node"]
        run = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
        found = re.search(r"client (\d+) node (\d+)", run.stdout)
        if run.returncode or not found:
            raise RuntimeError(f"the child under valgrind failed:\n{run.stderr[-3000:]}\n"
                               f"{_last_error(run.stderr)}")
        client, node = found.groups()
        total = {"client": 0, "node": 0, "workers": 0}
        for name in os.listdir(out):
            if not name.startswith("cg."):
                continue
            with open(os.path.join(out, name)) as f:
                text = f.read()
            pid = re.search(r"^pid: (\d+)", text, re.M)
            count = re.search(r"^totals: (\d+)", text, re.M)
            if pid is None or count is None:  # (a process that never counted: cut short)
                continue
            pid = pid.group(1)
            leg = "client" if pid == client else "node" if pid == node else "workers"
            total[leg] += int(count.group(1))
    return {leg: count / calls for leg, count in total.items()}


def _last_error(stderr):
    lines = [line for line in stderr.splitlines() if line and not line.startswith("==")]
    return lines[-1] if lines else "no output"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="*", default=["WORKTREE"],
                    help="git revisions, or WORKTREE for the working tree")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--api", choices=["executor", "cluster"], default="executor")
    ap.add_argument("--probe", action="store_true",
                    help="a row more per revision: bench/probe_offpath.py's node (the "
                         "node off a lone call's path: its calls run in the node's process)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for rev in args.revs:
            tree = export(rev, tmp)
            rows.append((rev, legs(tree, args.api, args.calls)))
            if args.probe:
                rows.append((f"{rev} probe", legs(tree, args.api, args.calls, probe=True)))
    probe = " --probe" if args.probe else ""
    print(f"python bench/bench_roundtrip_legs.py --calls {args.calls} --api {args.api}{probe} "
          f"{' '.join(args.revs)}  (load average {os.getloadavg()[0]:.1f})")
    print(f"{args.api} via a dpool-node, callgrind instructions per round trip:")
    first = sum(rows[0][1].values())
    for rev, leg in rows:
        whole = sum(leg.values())
        print(f"  {rev:>18}  client {leg['client'] / 1000:6.1f}k  node {leg['node'] / 1000:6.1f}k"
              f"  workers {leg['workers'] / 1000:6.1f}k  total {whole / 1000:6.1f}k"
              f"  x{whole / first:.3f}")


if __name__ == "__main__":
    main()
