"""Counters for the fault tests: each execution of ``tasks.counted`` leaves
a file ``<i>-<pid>-<ns>`` in its folder, so a test counts executions per job
and compares them with deliveries.
"""
import collections
import os
import time

#: Heartbeat used by the fault tests: noticed within ~1.6 s of silence.
HEARTBEAT = (0.2, 1.5)


def executions(outdir):
    """{job index: times it ran}."""
    return collections.Counter(int(name.split("-")[0]) for name in os.listdir(outdir))


def pids_running(outdir, i):
    """Worker pids that started job ``i``."""
    return [int(name.split("-")[1]) for name in os.listdir(outdir)
            if name.split("-")[0] == str(i)]


def link_for(client, address):
    """The client's current link to ``address`` (host, port), or None."""
    for link in client.links:
        if tuple(link.address) == tuple(address):
            return link
    return None


def measure(row, **times):
    """One line per fault row for docs/failures.md (seen with ``pytest -s``)."""
    print(f"\nFAULT {row}: " + " ".join(f"{k}={v:.2f}s" for k, v in times.items()), flush=True)


def rerun_elsewhere(outdir, pids, jobs):
    """True once every job in ``jobs`` that ran on one of ``pids`` has also
    started on another process."""
    for i in jobs:
        ran = set(pids_running(outdir, i))
        if ran & pids and not ran - pids:
            return False
    return True


def times_of(events, t0, timeout):
    """Poll every condition of ``events`` ({name: condition}) until all have
    held; return {name: seconds from t0 to the first time it held}."""
    seen = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(events):
        for name, condition in events.items():
            if name not in seen and condition():
                seen[name] = time.monotonic() - t0
        if time.monotonic() > deadline:
            missing = sorted(set(events) - set(seen))
            raise AssertionError(f"timed out after {timeout}s waiting for {missing}")
        time.sleep(0.01)
    return seen


def check_deliveries(results, outdir, n, rerun):
    """Each of jobs 0..n-1 delivered once; only jobs in ``rerun`` may have
    run twice. Returns the number of executions."""
    assert sorted(results) == list(range(n))
    runs = executions(outdir)
    assert all(runs[i] == 1 for i in range(n) if i not in rerun), runs
    assert all(1 <= runs[i] <= 2 for i in rerun), runs
    return sum(runs.values())
