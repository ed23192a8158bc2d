"""Before a release: is anything slower than the stored thresholds?

    python bench/check_regressions.py [--skip-wall] [--from FILE] [--quick]

Two kinds of checks, thresholds in ``bench/thresholds.json``:

- instruction counts (``valgrind --tool=callgrind``; they barely move with
  the machine's load, so they are the ones to trust on a shared machine):
  the client's instructions per no-op JobCluster job on the embedded node
  (``bench_cpu_per_job.py --callgrind``), and the instructions a zygote and
  its worker spend importing what they run (the start-up every pool's first
  task waits for);
- ratios against multiprocessing measured in the same run
  (``bench_small.py --json``): round trips, 10,000 no-ops per API, create +
  1 task + shutdown, CPU-bound tasks.  These move with the load: re-run a
  failure on a quiet machine before believing it (``--from`` re-checks a
  saved ``bench_small.py --json`` output).

A threshold is a guard against regressions, not the issue's target: it is
the figure measured when it was set plus a margin (see the file's notes).
Prints one line per check and exits 1 if any failed.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ZYGOTE_IMPORTS = "from dpool.node.zygote import main; from dpool.node import worker"


def callgrind(code, env=None):
    """Instructions (callgrind's "I refs") of ``python -c code``."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
               os.path.realpath(sys.executable), "-c", code]
        err = subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True,
                             text=True).stderr
    return int(re.search(r"I\s+refs:\s+([\d,]+)", err).group(1).replace(",", ""))


def instruction_checks():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(HERE, "bench_cpu_per_job.py"),
                          "--callgrind"], check=True, stdout=subprocess.PIPE, text=True).stdout
    per_job = float(re.search(r"WORKTREE\s+([\d.]+)k", out).group(1)) * 1000
    imports = callgrind(ZYGOTE_IMPORTS, env) - callgrind("pass", env)
    return {"instructions per no-op JobCluster job": per_job,
            "instructions to import the zygote and worker": imports}


def wall_checks(args):
    if args.from_file:
        path = args.from_file
    else:
        path = os.path.join(tempfile.mkdtemp(prefix="dpool-check-"), "small.json")
        cmd = [sys.executable, os.path.join(HERE, "bench_small.py"), "--json", path]
        subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
    with open(path) as f:
        data = json.load(f)
    print(f"(bench_small load average at its start: {data['load'][0]:.1f})")
    return {key: r["value"] for key, r in data["results"].items()}


def check(name, value, limit):
    op, bound = limit["op"], limit["limit"]
    ok = value <= bound if op == "<=" else value >= bound
    shown = f"{value:,.0f}" if value >= 1000 else f"{value:.3f}"
    print(f"[{'ok  ' if ok else 'FAIL'}] {name:<52} {shown:>14}  (threshold {op} {bound:,})")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-wall", action="store_true", help="instruction counts only")
    ap.add_argument("--skip-instructions", action="store_true", help="wall-clock ratios only")
    ap.add_argument("--from", dest="from_file", help="a saved bench_small.py --json output")
    ap.add_argument("--quick", action="store_true", help="bench_small.py --quick")
    args = ap.parse_args()
    with open(os.path.join(HERE, "thresholds.json")) as f:
        limits = json.load(f)["thresholds"]
    values = {}
    if not args.skip_instructions:
        values.update(instruction_checks())
    if not args.skip_wall:
        values.update(wall_checks(args))
    failed = [name for name, value in values.items()
              if name in limits and not check(name, value, limits[name])]
    unchecked = sorted(set(values) - set(limits))
    if unchecked:
        print("no threshold for:", ", ".join(unchecked))
    print(f"\n{len(failed)} regression(s)" + (": " + ", ".join(failed) if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
