"""Large data (issue 15): one ``bytes`` argument (the job returns its length)
and one ``bytes`` result (the job returns ``b"y" * n``), at several sizes, and
the same with a NumPy ``float64`` array (``--kinds numpy``; pickle protocol 5
out-of-band buffers; left out when NumPy is not installed), for

* ``local``: ``dpool.futures.Executor(max_workers=1)`` (embedded node),
* ``node``:  the same against a ``dpool-node`` subprocess on 127.0.0.1 (TCP,
  every message in AES-GCM records),
* ``mp``:    ``multiprocessing.Pool(1)``, the reference,

each measurement in a fresh client process.  Below 100 MB a measurement is
several jobs of that size in a row (100 MB's worth, 5-50; ``--jobs``) after
one more, and its MB/s is their median: a 1 MB job takes about a
millisecond, and the first of its size in a process pays one-off costs (its
rate is printed as "first").  Reports MB/s, the client's peak
RSS above its baseline (the user's own object excluded) and the far side's
(the workers; for ``node``, the node and its workers), both in multiples of
the payload, from the kernel's high-water marks (Linux), and the CPU seconds
each side used (user + system, all threads: the figure to compare on a
loaded machine).  The last table gives each dpool
path's speed as a ratio to ``mp`` measured in the same run (median of
``--repeat`` rounds, the modes interleaved within each round).

    python bench/bench_large.py                    # 1 MB, 100 MB, 1 GB, 2 GB; bytes and NumPy
    python bench/bench_large.py --sizes 1 100 --kinds bytes --repeat 3

The machine is shared: run it alone, compare with ``mp`` in the same run.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import psutil
from _common import start_node_daemon, stop_node_daemon


def size_of(data):
    return data.nbytes if hasattr(data, "nbytes") else len(data)


def make(n):
    return b"y" * n


def make_array(n):
    import numpy
    return numpy.full(n // 8, 1.5)


def where(_=None):
    """The dpool source file a process (a worker, as a job) runs."""
    return sys.modules["dpool"].__file__


def channel_calls(ex, submit, wait=10.0):
    """Via a node, lone calls go on a channel once the client opened one
    at an idle moment (docs/performance.md, "taking the node off the
    path"): wait for it (small calls meanwhile, up to ``wait`` s), as a
    program does that made a call before.  Returns a function giving the
    number of calls the channel answered since (None: this dpool has no
    channel, or none opened)."""
    line = getattr(ex._client, "_direct", None)
    chan = getattr(line, "chan", None)
    if chan is None or os.environ.get("BENCH_LARGE_CHANNEL") == "off":
        return None
    deadline = time.monotonic() + wait
    while not (line.on_chan and line.free()) and time.monotonic() < deadline:
        submit(size_of, b"")
        time.sleep(0.01)
    if not line.on_chan:
        return None
    before = chan.calls
    return lambda: chan.calls - before


def argument(kind, n):
    if kind == "numpy":
        import numpy
        return numpy.full(n // 8, 2.5)
    return b"x" * n


def _status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class HighWater:
    """Peak RSS above the start of some processes: the kernel's high-water
    mark of each (Linux ``VmHWM``, reset through ``/proc/PID/clear_refs`` on
    entry), summed (an upper bound of their total's peak).  Nothing runs
    meanwhile: a sampling thread would take a share of the 2 cores measured."""

    def __init__(self, pids_fn):
        self._pids = pids_fn()
        self.grown = 0

    def __enter__(self):
        self.base = {}
        for pid in self._pids:
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
                self.base[pid] = _status(pid, "VmRSS")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        for pid, rss in self.base.items():
            try:
                self.grown += max(0, _status(pid, "VmHWM") - rss)
            except OSError:
                pass


def cpu_times(pids):
    """CPU seconds (user + system, all threads) of each process in ``pids``."""
    out = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            out[pid] = times.user + times.system
        except psutil.Error:
            pass
    return out


def tree(pid):
    try:
        proc = psutil.Process(pid)
        return [pid] + [c.pid for c in proc.children(recursive=True)]
    except psutil.Error:
        return []


def clock(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def default_jobs(mb):
    """Jobs per measurement: one at 100 MB and up, enough below for ~100 MB."""
    return 1 if mb >= 100 else max(5, min(50, 100 // mb))


def one(mode, kind, direction, mb, node_pid=None, port=None, jobs=1):
    """A measurement (run in its own process): ``jobs`` jobs in a row (after
    one more of the same size when ``jobs`` > 1), their median; returns a dict
    (CPU seconds per job)."""
    n = mb * 1_000_000
    me = os.getpid()
    if mode == "mp":
        import multiprocessing
        pool = multiprocessing.Pool(1)
        submit = lambda fn, arg: pool.apply_async(fn, (arg,)).get()  # noqa: E731
        node_tree = lambda: [c.pid for c in psutil.Process(me).children(recursive=True)]  # noqa: E731
        close = pool.terminate
    else:
        import dpool.futures
        kwargs = {}
        if mode == "node":
            kwargs = dict(nodes=[("127.0.0.1", port)], secret=os.environ["DPOOL_SECRET"])
        if os.environ.get("BENCH_LARGE_CHANNEL") == "off":   # (the node's path, to compare)
            from dpool.core.channel import ClientChannel
            ClientChannel.maybe_open = lambda self, link: None
        ex = dpool.futures.Executor(max_workers=1, **kwargs)
        submit = lambda fn, arg: ex.submit(fn, arg).result()  # noqa: E731
        node_tree = ((lambda: tree(node_pid)) if mode == "node"
                     else (lambda: [c.pid for c in psutil.Process(me).children(recursive=True)]))
        close = ex.shutdown
    def job():
        if direction == "send":
            assert submit(size_of, data) == n
        else:
            assert size_of(submit(make_array if kind == "numpy" else make, n)) == n

    try:
        submit(size_of, argument(kind, 64))   # (imports NumPy in the worker too)
        worker_dpool = submit(where, None) if mode != "mp" else None
        calls = channel_calls(ex, submit) if mode == "node" else None
        data = argument(kind, n) if direction == "send" else None
        # several jobs: the first of this size in the process apart (its
        # one-off costs: fresh buffers, lazily made objects), the median of
        # the others (one job of 1 MB is ~1 ms: one sample is noise)
        first = clock(job) if jobs > 1 else None
        far_pids = node_tree()
        cpu_before = cpu_times([me] + far_pids)
        with HighWater(lambda: [me]) as client, HighWater(node_tree) as far:
            times = [clock(job) for _ in range(jobs)]
        cpu_after = cpu_times([me] + far_pids)
        channel = calls() if calls else None
    finally:
        close()
    elapsed = median(times)
    # a result is the user's own object: count it out, as the argument is
    # (after a first job, below 100 MB, the heap may hold its memory already:
    # never below 0)
    own = n if direction == "result" else 0
    used = {pid: (cpu_after[pid] - cpu_before[pid]) / jobs
            for pid in cpu_after if pid in cpu_before}
    roles = {"client": used.get(me, 0.0), "node": used.get(node_pid, 0.0),
             "workers": sum(v for pid, v in used.items() if pid not in (me, node_pid))}
    return {"mode": mode, "kind": kind, "dir": direction, "mb": mb, "mbs": round(mb / elapsed, 1),
            "client_x": round(max(0, client.grown - own) / n, 2),
            "far_x": round(max(0, far.grown - own) / n, 2),
            "cpu": {role: round(v, 6) for role, v in roles.items()}, "jobs": jobs,
            "first_mbs": round(mb / first, 1) if first else None,
            "channel": channel,
            "dpool": {"client": sys.modules["dpool"].__file__ if mode != "mp" else None,
                      "worker": worker_dpool}}


def start_node():
    return start_node_daemon("bench-large-secret-0123456789", 1, prefix="dpool-bench-large-")


def measure(proc, port, env, mode, kind, direction, mb, jobs=None):
    cmd = [sys.executable, __file__, "--one", mode, kind, direction, str(mb),
           "--node", str(proc.pid), str(port), "--jobs", str(jobs or default_jobs(mb))]
    cell = f"{mode} {kind} {direction} {mb} MB"
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CELL_TIMEOUT)
    except subprocess.TimeoutExpired:
        return _failed(cell, f"no answer within {CELL_TIMEOUT} s")
    if out.returncode:
        return _failed(cell, out.stderr[-500:])
    try:
        r = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return _failed(cell, f"no result in its output: {out.stdout[-500:]!r}")
    first = f" (first {r['first_mbs']})" if r.get("first_mbs") else ""
    print(f"{r['mb']:>6} MB {r['kind']:<6} {r['mode']:<6} {r['dir']:<7} {r['mbs']:>6} MB/s"
          f"{first}  "
          f"client +{r['client_x']:.2f}x  node/workers +{r['far_x']:.2f}x  "
          f"CPU s client {r['cpu']['client']} node {r['cpu']['node']} "
          f"workers {r['cpu']['workers']}", flush=True)
    return r


CELL_TIMEOUT = 900  # seconds a measurement may take (its process is killed then)
FAILED = []  # the cells that failed in this run (reported at the end)


def _failed(cell, why):
    print(f"{cell} failed: {why}", flush=True)
    FAILED.append(cell)
    return None


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def report(rows, args):
    """The table of medians, with each dpool path's ratio to mp.Pool."""
    print(f"\n{' '.join(sys.argv)}    ({load()})")
    print("| size | kind | path | send MB/s (x mp) | result MB/s (x mp) "
          "| client send / result | node+workers send / result |")
    print("|---|---|---|---|---|---|---|")
    def med(mode, kind, direction, mb, key):
        return median([r[key] for r in rows if (r["mode"], r["kind"], r["dir"], r["mb"])
                       == (mode, kind, direction, mb)])
    for mb in args.sizes:
        for kind in args.kinds:
            for mode in args.modes:
                cells = []
                for direction in ("send", "result"):
                    speed, ref = med(mode, kind, direction, mb, "mbs"), med("mp", kind,
                                                                           direction, mb, "mbs")
                    ratio = f" ({speed / ref:.2f}x)" if speed and ref and mode != "mp" else ""
                    cells.append(f"{speed}{ratio}")
                mem = [med(mode, kind, d, mb, key) for key in ("client_x", "far_x")
                       for d in ("send", "result")]
                print(f"| {mb} MB | {kind} | {mode} | {cells[0]} | {cells[1]} | "
                      f"{mem[0]} / {mem[1]} | {mem[2]} / {mem[3]} |")


def load():
    one_min, five, fifteen = os.getloadavg()
    return f"load average {one_min:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1000, 2000], help="MB")
    p.add_argument("--modes", nargs="+", default=["local", "node", "mp"])
    p.add_argument("--kinds", nargs="+", default=["bytes", "numpy"])
    p.add_argument("--repeat", type=int, default=1, help="rounds (medians are reported)")
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--node", nargs=2, type=int, help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=int, help="jobs per measurement (default: 1 at 100 MB and "
                   "up, else 100 MB's worth, 5-50; the median)")
    args = p.parse_args()
    if args.one:
        mode, kind, direction, mb = args.one
        node_pid, port = args.node or (None, None)
        jobs = args.jobs or default_jobs(int(mb))
        print(json.dumps(one(mode, kind, direction, int(mb), node_pid, port, jobs)))
        return
    if "numpy" in args.kinds and importlib.util.find_spec("numpy") is None:
        print("NumPy is not installed: the numpy rows are left out")
        args.kinds = [k for k in args.kinds if k != "numpy"]
    print(load())
    proc, port, env = start_node()
    rows = []
    try:
        for _ in range(args.repeat):
            for mb in args.sizes:
                for kind in args.kinds:
                    for direction in ("send", "result"):
                        for mode in args.modes:
                            r = measure(proc, port, env, mode, kind, direction, mb,
                                        args.jobs)
                            if r is not None:
                                rows.append(r)
    finally:
        stop_node_daemon(proc, env)
    report(rows, args)
    if FAILED:
        print(f"\n{len(FAILED)} cells failed (left out above): {', '.join(FAILED)}")


if __name__ == "__main__":
    main()
