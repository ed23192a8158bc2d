"""Large data (issue 15), two source trees interleaved: one measurement of
``bench_large.py`` (``--one``: a fresh client process; for ``node``, a
``dpool-node`` started from the same tree) from each tree in turn, the
order alternating each round, and the medians of MB/s and of the CPU seconds
of the client, the node and its workers.  On a shared machine the CPU
seconds are the figures to compare (wall time moves 2-5x with the load).

A tree is a directory holding a ``dpool`` package, or a git revision of
this repository (``main``, ``HEAD~2``, a hash: its ``dpool`` exported to a
temporary folder).  The client, the node and its workers all run the tree
given (``DPOOL_BENCH_TREE`` and ``PYTHONPATH``: this repository's editable
install and this benchmark's own tree never come first); each measurement
checks it (the client's and a worker's ``dpool.__file__``) and fails
otherwise.  This tree's ``bench_large.py`` measures every tree.

    python bench/bench_large_ab.py --trees /work/main . --mode local --dir send --mb 1000
    python bench/bench_large_ab.py --trees main WORKTREE --mode node --dir result --rounds 4
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import bench_large

HERE = os.path.abspath(bench_large.__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


def tree_of(name, into):
    """The directory of the tree ``name``: a directory holding ``dpool``,
    WORKTREE (this repository's), or a git revision exported into ``into``."""
    if name == "WORKTREE":
        return ROOT
    if os.path.isdir(os.path.join(name, "dpool")):
        return os.path.abspath(name)
    dest = os.path.join(into, name.replace("/", "_").replace("~", "_").replace("^", "_"))
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", ROOT, "archive", name, "dpool"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def tree_env(tree, **extra):
    """The environment of a process that must run ``tree``'s dpool."""
    return dict(os.environ, PYTHONPATH=tree, DPOOL_BENCH_TREE=tree, **extra)


def checked(row, tree):
    """``row``, if its client and worker ran ``tree``'s dpool (else None)."""
    want = os.path.join(os.path.realpath(tree), "dpool", "__init__.py")
    got = row.get("dpool", {})
    wrong = {side: f for side, f in got.items() if os.path.realpath(f or "") != want}
    if wrong or not got:
        print(f"{tree}: ran another dpool than {want}: {wrong or 'not reported'}")
        return None
    return row


def start_node(tree):
    env = tree_env(tree, DPOOL_SECRET="bench-large-secret-0123456789",
                   DPOOL_HOME=tempfile.mkdtemp())
    proc = subprocess.Popen([sys.executable, "-m", "dpool.daemons.node", "--port", "0",
                             "--cpus", "1", "--loglevel", "WARNING"],
                            stdout=subprocess.PIPE, env=env, text=True, cwd=tree)
    line = proc.stdout.readline()
    return proc, int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1]), env


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs="+", required=True,
                   help="source trees: directories, WORKTREE, or git revisions")
    p.add_argument("--mode", default="local", choices=["local", "node"])
    p.add_argument("--kind", default="bytes", choices=["bytes", "numpy"])
    p.add_argument("--dir", default="send", choices=["send", "result"])
    p.add_argument("--mb", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    exported = tempfile.mkdtemp(prefix="bench-large-ab-")
    trees = [tree_of(t, exported) for t in args.trees]
    print(f"python bench/bench_large_ab.py {' '.join(sys.argv[1:])}    ({bench_large.load()})")
    nodes = {}
    rows = {t: [] for t in trees}
    try:
        for tree in trees:
            nodes[tree] = (start_node(tree) if args.mode == "node"
                           else (None, None, tree_env(tree)))
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
                row = checked(json.loads(out.stdout.strip().splitlines()[-1]), tree)
                if row is None:
                    continue
                rows[tree].append(row)
                print(f"{tree}: {row['mbs']} MB/s  CPU s {row['cpu']}  channel calls "
                      f"{row.get('channel')}  ({bench_large.load()})",
                      flush=True)
    finally:
        for proc, _, _ in nodes.values():
            if proc is not None:
                proc.terminate()
                proc.wait()
        shutil.rmtree(exported, ignore_errors=True)
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
