"""Nothing a job starts outlives it: child subreapers (Linux).

A process that calls ``setsid`` (or is double-forked) leaves its worker's
process group, so killing the group misses it, and its parent's death
hands it to init.  With ``PR_SET_CHILD_SUBREAPER`` such an orphan is handed
to its nearest subreaper ancestor instead, so it stays within reach:

- each worker is a subreaper: after each batch of jobs (in a burst, with
  the next batch already read, at most every ``worker.REAP_EVERY``
  seconds) it kills every child it did not have before the jobs (a job's leftovers and orphans),
  repeating until none is left (their children come to it in turn);
- the zygote is a subreaper: when a worker dies (cancel, client gone, node
  stopping), the worker's leftovers come to the zygote, which kills every
  child of its own that is not a worker, and does so again at its exit.

Children are listed from ``/proc/self/task/*/children``.  Elsewhere (no
``prctl``) these functions do nothing, and a job's own process group is
all that is killed.
"""
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36
_TASKS = "/proc/self/task"


def set_subreaper() -> bool:
    """Make this process a child subreaper; False where that is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def children() -> set:
    """The pids of this process's children (all threads')."""
    pids = set()
    try:
        tasks = os.listdir(_TASKS)
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"{_TASKS}/{tid}/children", "rb") as f:
                pids.update(map(int, f.read().split()))
        except OSError:     # the thread ended meanwhile
            pass
    return pids


def has_children() -> bool:
    """False only if this process has no child at all, alive or not (one
    syscall: what a worker checks after each batch of jobs, instead of
    reading /proc, on the round trip's path)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    except OSError:
        return True
    return True


def kill_children(keep=frozenset(), reap=True, rounds=100) -> int:
    """SIGKILL every child not in ``keep`` (and reap it), round after round
    until none is left: what they leave behind comes to us, a subreaper.
    Returns how many were killed."""
    if not keep and not has_children():
        return 0
    killed = 0
    for _ in range(rounds):
        doomed = children() - keep
        if not doomed:
            break
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        if reap:
            for pid in doomed:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
    return killed
