"""Soak: long runs through two ``dpool-node``\\ s, with churn and failures.

    python bench/soak.py [--minutes 60] [--out /work/soak/run] [--session-jobs 20000]

Not part of CI.  Two ``dpool-node`` processes (one CPU each) on 127.0.0.1;
the client opens a session (Executor, Pool and JobCluster in turn) on both,
runs ``--session-jobs`` jobs through it in batches, checks every outcome and
closes it, over and over.  The jobs mix no-ops, short sleeps, 100 KB
arguments, 1 MB results, exceptions and workers that die (``os._exit``).
Half-way through, node B is killed (SIGKILL) and restarted on the same port:
its jobs must be delivered anyway (rerun on node A, then on B once it is back).

Every execution appends one byte to ``OUT/executions`` (from the worker), so
executions can be compared with deliveries: executions >= deliveries (a job
killed with its node runs again), and every submitted job is delivered once,
with the right outcome.  Every ``--sample`` seconds one JSON line goes to
``OUT/samples.jsonl``: client and node RSS (node process alone and with its
zygote and workers) and open fds; the summary is printed at the end and
written to ``OUT/summary.json``.
"""
import argparse
import ctypes
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_fd = None  # the worker's executions file (opened on its first job)


def _count():
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["SOAK_EXECUTIONS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(_fd, b"x")


def noop(x):
    _count()
    return x


def nap(seconds):
    _count()
    time.sleep(seconds)
    return seconds


def big_result(n):
    _count()
    return b"r" * n


def big_arg(data):
    _count()
    return len(data)


def fail(x):
    _count()
    raise ValueError(f"soak failure {x}")


def die(x):
    _count()
    os._exit(3)


def by_name(name, arg):
    """JobCluster's one computation: the job named ``name`` (a node gives a
    client's CPUs to one session at a time, so a session has one cluster)."""
    return globals()[name](arg)


# kind -> (function, argument maker, check of the outcome); weights below.
def _kinds():
    import soak  # by reference: the workers import this module (PYTHONPATH)
    return {
        "noop": (soak.noop, lambda i: i, lambda i, r: r == i),
        "nap": (soak.nap, lambda i: random.choice((0.001, 0.01, 0.05)),
                lambda i, r: isinstance(r, float)),
        "big_result": (soak.big_result, lambda i: 1_000_000,
                       lambda i, r: isinstance(r, bytes) and len(r) == 1_000_000),
        "big_arg": (soak.big_arg, lambda i: b"a" * 100_000, lambda i, r: r == 100_000),
        "fail": (soak.fail, lambda i: i, lambda i, r: isinstance(r, ValueError)),
        "die": (soak.die, lambda i: i, lambda i, r: isinstance(r, Exception)),
    }


WEIGHTS = {"noop": 9000, "nap": 40, "big_result": 10, "big_arg": 40, "fail": 500, "die": 1}


# ------------------------------------------------------------------ nodes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, name, port, env, out):
        self.name, self.port, self.env, self.out = name, port, env, out
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        log = os.path.join(self.out, f"node-{self.name}-{self.starts}.log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dpool.daemons.node", "--port", str(self.port), "--cpus", "1",
             "--name", self.name, "--logfile", log, "--grace", "5"],
            stdout=subprocess.PIPE, env=self.env, text=True)
        line = self.proc.stdout.readline()
        if "serving" not in line:
            raise RuntimeError(f"node {self.name} did not start: {line!r}")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.stdout.close()


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    """glibc's own count (all arenas): bytes malloc'd and in use, bytes free
    but kept in its arenas, bytes in mmapped chunks; {} without glibc >= 2.33."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _Mallinfo2
    m = fn()
    mb = 1 << 20
    return {"client_malloc_used_mb": round((m.uordblks + m.hblkhd) / mb, 1),
            "client_malloc_free_mb": round(m.fordblks / mb, 1)}


def client_heap():
    """The client's Python heap, cheaply: live gc-tracked objects, glibc's
    in-use and free-but-kept bytes, and tracemalloc's count when it is on
    (``--tracemalloc``; off by default, it slows every allocation)."""
    import tracemalloc
    row = {"client_gc_objects": len(gc.get_objects())}
    row.update(_mallinfo2())
    if tracemalloc.is_tracing():
        row["client_traced_mb"] = round(tracemalloc.get_traced_memory()[0] / (1 << 20), 1)
    return row


def sample(nodes, stats, started):
    me = os.getpid()
    row = {"t": round(time.monotonic() - started, 1), "client_rss_mb": _rss_kb(me) / 1024,
           "client_fds": _fds(me), "threads": threading.active_count()}
    row.update(client_heap())
    for node in nodes:
        pid = node.proc.pid
        tree = _tree(pid)
        row[f"node_{node.name}_rss_mb"] = round(_rss_kb(pid) / 1024, 1)
        row[f"node_{node.name}_tree_rss_mb"] = round(sum(map(_rss_kb, tree)) / 1024, 1)
        row[f"node_{node.name}_fds"] = _fds(pid)
        row[f"node_{node.name}_procs"] = len(tree)
    row.update(stats.snapshot())
    return row


# --------------------------------------------------------------- sessions

class Stats:
    def __init__(self, path):
        self.lock = threading.Lock()
        self.submitted = self.delivered = self.wrong = self.sessions = 0
        self.by_kind = {}
        self.executions_path = path

    def snapshot(self):
        with self.lock:
            try:
                executions = os.path.getsize(self.executions_path)
            except OSError:
                executions = 0
            return {"submitted": self.submitted, "delivered": self.delivered,
                    "wrong": self.wrong, "sessions": self.sessions, "executions": executions}


def _outcome(future):
    try:
        return future.result()
    except Exception as exc:
        return exc


def _run_batch(api, session, jobs, stats):
    """Submit ``jobs`` [(kind, fn, arg, check)], wait for all, check each."""
    if api == "executor":
        futures = [session.submit(fn, arg) for _, fn, arg, _ in jobs]
        outcomes = [_outcome(f) for f in futures]
    elif api == "pool":
        results = [session.apply_async(fn, (arg,)) for _, fn, arg, _ in jobs]
        outcomes = []
        for r in results:
            try:
                outcomes.append(r.get())
            except Exception as exc:
                outcomes.append(exc)
    else:
        cluster_jobs = [session.submit_fn(fn, arg) for _, fn, arg, _ in jobs]
        outcomes = [job.outcome() for job in cluster_jobs]
    wrong = 0
    for (kind, _, arg, check), outcome in zip(jobs, outcomes):
        if not check(arg, outcome):
            wrong += 1
            if wrong <= 3:
                print(f"WRONG {api} {kind}: {outcome!r:.200}", flush=True)
    with stats.lock:
        stats.submitted += len(jobs)
        stats.delivered += len(outcomes)
        stats.wrong += wrong
        for kind, *_ in jobs:
            stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1


class _ClusterSession:
    """A JobCluster whose computation runs the job named by its first argument."""

    def __init__(self, nodes, secret):
        import dpool
        import soak
        self.cluster = dpool.JobCluster(soak.by_name, nodes=nodes, secret=secret, loglevel=40)

    def submit_fn(self, fn, arg):
        return _ClusterJob(self.cluster.submit(fn.__name__, arg))

    def close(self):
        self.cluster.close()


class _ClusterJob:
    """A DispyJob's outcome as the other APIs give it: the value, or an
    exception (ValueError when the job raised one, else RuntimeError)."""

    def __init__(self, job):
        self.job = job

    def outcome(self):
        import dpool
        job = self.job
        value = job()
        if job.status == dpool.DispyJob.Finished:
            return value
        text = str(job.exception)
        return ValueError(text) if "ValueError: soak failure" in text else RuntimeError(text)


def open_session(api, addresses, secret):
    import dpool
    from dpool.futures import Executor
    if api == "executor":
        return Executor(nodes=addresses, secret=secret)
    if api == "pool":
        return dpool.Pool(nodes=addresses, secret=secret)
    return _ClusterSession(addresses, secret)


def close_session(api, session):
    if api == "executor":
        session.shutdown()
    elif api == "pool":
        session.close()
        session.join()
    else:
        session.close()


def make_jobs(kinds, n, rng):
    names = list(WEIGHTS)
    weights = [WEIGHTS[k] for k in names]
    jobs = []
    for i, kind in enumerate(rng.choices(names, weights, k=n)):
        fn, make, check = kinds[kind]
        jobs.append((kind, fn, make(i), check))
    return jobs


def run(args):
    os.makedirs(args.out, exist_ok=True)
    executions = os.path.join(args.out, "executions")
    open(executions, "wb").close()
    home = tempfile.mkdtemp(prefix="soak-home-")
    secret = "soak-" + os.urandom(16).hex()
    env = dict(os.environ, DPOOL_SECRET=secret, DPOOL_HOME=home, SOAK_EXECUTIONS=executions,
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), HERE) if p))
    os.environ.update(SOAK_EXECUTIONS=executions, DPOOL_HOME=home)
    sys.path.insert(0, HERE)
    kinds = _kinds()
    nodes = [Node("A", free_port(), env, args.out), Node("B", free_port(), env, args.out)]
    for node in nodes:
        node.start()
    addresses = [("127.0.0.1", node.port) for node in nodes]
    stats = Stats(executions)
    started = time.monotonic()
    deadline = started + args.minutes * 60
    restart_at = started + args.minutes * 30
    restarted = False
    stop = threading.Event()
    samples = open(os.path.join(args.out, "samples.jsonl"), "w")

    def sampler():
        while True:
            samples.write(json.dumps(sample(nodes, stats, started)) + "\n")
            samples.flush()
            if stop.wait(args.sample):
                return

    def restarter():
        nonlocal restarted
        if stop.wait(max(0.0, restart_at - time.monotonic())):
            return
        print(f"{time.monotonic() - started:.0f}s: killing node B (SIGKILL)", flush=True)
        nodes[1].kill()
        time.sleep(3)
        nodes[1].start()
        restarted = True
        print(f"{time.monotonic() - started:.0f}s: node B restarted", flush=True)

    threads = [threading.Thread(target=sampler, daemon=True),
               threading.Thread(target=restarter, daemon=True)]
    for t in threads:
        t.start()
    rng = random.Random(1)
    apis = ["executor", "pool", "cluster"]
    try:
        while time.monotonic() < deadline:
            api = apis[stats.sessions % len(apis)]
            session = open_session(api, addresses, secret)
            with stats.lock:
                stats.sessions += 1
            done = 0
            while done < args.session_jobs and time.monotonic() < deadline:
                n = min(args.batch, args.session_jobs - done)
                _run_batch(api, session, make_jobs(kinds, n, rng), stats)
                done += n
            close_session(api, session)
    finally:
        stop.set()
        for t in threads:
            t.join()
        final = sample(nodes, stats, started)
        samples.write(json.dumps(final) + "\n")
        samples.close()
        for node in nodes:
            node.stop()
    summary = summarize(args, stats, restarted)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def summarize(args, stats, restarted):
    rows = [json.loads(line) for line in open(os.path.join(args.out, "samples.jsonl"))]
    keys = [k for k in rows[0] if k.endswith(("_mb", "_fds", "procs", "_objects"))
            or k == "threads"]
    ranges = {k: [min(r[k] for r in rows), max(r[k] for r in rows), rows[-1][k]] for k in keys}
    snap = stats.snapshot()
    return {"minutes": args.minutes, "restarted": restarted, "by_kind": stats.by_kind,
            "counts": snap, "ok": snap["wrong"] == 0 and snap["submitted"] == snap["delivered"]
            and snap["executions"] >= snap["delivered"],
            "ranges_min_max_last": ranges,
            "timeline": [rows[int(i * (len(rows) - 1) / 6)] for i in range(7)]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--out", default="/work/soak/run")
    p.add_argument("--session-jobs", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=2_000)
    p.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--tracemalloc", action="store_true",
                   help="trace the client's Python allocations (slow; for diagnosis)")
    args = p.parse_args()
    if args.tracemalloc:
        import tracemalloc
        tracemalloc.start()
    print("command: python bench/soak.py " + " ".join(sys.argv[1:]), flush=True)
    summary = run(args)
    print(json.dumps(summary, indent=1))
    print("OK" if summary["ok"] else "FAILED: see counts")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
