"""Large data (issue 15), two source trees interleaved: one measurement of
``bench_large.py`` (``--one``: a fresh client process; for ``node``, a
``dpool-node`` started from the same tree) from each tree in turn, the
order alternating each round, and the medians of MB/s and of the CPU seconds
of the client, the node and its workers.  On a shared machine the CPU
seconds are the figures to compare (wall time moves 2-5x with the load).

    python bench/bench_large_ab.py --trees /work/main . --mode local --dir send --mb 1000
    python bench/bench_large_ab.py --trees OLD NEW --mode node --dir result --rounds 4
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import bench_large

HERE = os.path.abspath(bench_large.__file__)


def start_node(tree):
    env = dict(os.environ, PYTHONPATH=tree, DPOOL_SECRET="bench-large-secret-0123456789",
               DPOOL_HOME=tempfile.mkdtemp())
    proc = subprocess.Popen([sys.executable, "-m", "dpool.daemons.node", "--port", "0",
                             "--cpus", "1", "--loglevel", "WARNING"],
                            stdout=subprocess.PIPE, env=env, text=True, cwd=tree)
    line = proc.stdout.readline()
    return proc, int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1]), env


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs="+", required=True, help="source trees (PYTHONPATH)")
    p.add_argument("--mode", default="local", choices=["local", "node"])
    p.add_argument("--kind", default="bytes", choices=["bytes", "numpy"])
    p.add_argument("--dir", default="send", choices=["send", "result"])
    p.add_argument("--mb", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    trees = [os.path.abspath(t) for t in args.trees]
    print(f"python bench/bench_large_ab.py {' '.join(sys.argv[1:])}    ({bench_large.load()})")
    nodes = {}
    rows = {t: [] for t in trees}
    try:
        for tree in trees:
            nodes[tree] = (start_node(tree) if args.mode == "node"
                           else (None, None, dict(os.environ, PYTHONPATH=tree)))
        for r in range(args.rounds):
            for tree in (trees if r % 2 == 0 else trees[::-1]):
                proc, port, env = nodes[tree]
                cmd = [sys.executable, HERE, "--one", args.mode, args.kind, args.dir, str(args.mb)]
                if proc is not None:
                    cmd += ["--node", str(proc.pid), str(port)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree,
                                     timeout=900)
                if out.returncode:
                    print(f"{tree} failed: {out.stderr[-500:]}")
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows[tree].append(row)
                print(f"{tree}: {row['mbs']} MB/s  CPU s {row['cpu']}  ({bench_large.load()})",
                      flush=True)
    finally:
        for proc, _, _ in nodes.values():
            if proc is not None:
                proc.terminate()
                proc.wait()
    print(f"\nmedians, {args.mode} {args.kind} {args.dir} {args.mb} MB, {args.rounds} rounds:")
    for tree in trees:
        got = rows[tree]
        if not got:
            continue
        cpu = {role: round(statistics.median(r["cpu"][role] for r in got), 5)
               for role in ("client", "node", "workers")}
        print(f"  {tree}: {round(statistics.median(r['mbs'] for r in got), 1)} MB/s, CPU s {cpu}, "
              f"total {round(sum(cpu.values()), 5)}")


if __name__ == "__main__":
    main()
