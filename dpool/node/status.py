"""What a node says about itself when asked STATUS (``dpool status``)."""
import functools
import os
import platform
import sys
import time

_STARTED = time.time()


@functools.cache
def dpool_version():
    """dpool's installed version, looked up at the first STATUS (not at
    import: importlib.metadata brings the email package, 20 modules and
    thousands of objects every later full collection of a client with an
    embedded node would go through)."""
    try:
        from importlib.metadata import version

        return version("dpool")
    except Exception:  # not installed (run from a source tree)
        return "unknown"

_psutil = None


def start_measuring():
    """psutil, imported and its CPU measurement started (its first
    ``cpu_percent`` call only starts it): at a TCP node's start
    (``NodeServer``), else at the first STATUS; a client's embedded node is
    never asked, and psutil's ~2,100 GC-tracked objects stay out of the
    client's heap (walked by each full collection)."""
    global _psutil
    if _psutil is None:
        import psutil

        psutil.cpu_percent(None)
        _psutil = psutil
    return _psutil


def session_jobs(session):
    """(running, queued) jobs of one session: a worker runs the first job it
    holds; the others it holds and the session's queue are waiting."""
    running = queued = 0
    for worker in session.workers:
        held = len(worker.outstanding)
        if held:
            running += 1
            queued += held - 1
    return running, queued + len(session.dispatcher.queue)


def node_status(runtime):
    """A JSON-able dict: identity, CPUs, sessions, jobs, load, versions."""
    running = queued = sessions = 0
    for session in runtime.sessions:
        if session.cpus <= 0 or session.ended:
            continue  # e.g. the STATUS connection itself
        sessions += 1
        r, q = session_jobs(session)
        running += r
        queued += q
    psutil = start_measuring()
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"name": runtime.name, "version": dpool_version(),
            "python": "%d.%d.%d" % sys.version_info[:3], "platform": platform.platform(),
            "pid": os.getpid(), "uptime": round(time.time() - _STARTED, 1),
            "cpus": runtime.cpus, "free_cpus": runtime.free_cpus, "sessions": sessions,
            "kept": len(runtime.detached), "running": running, "queued": queued,
            "load": load, "cpu_busy": round(psutil.cpu_percent(None), 1),
            "memory_free": psutil.virtual_memory().available}
