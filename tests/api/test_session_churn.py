"""Sessions opened and closed over and over (bench/soak.py's churn, issue 16):
nothing a closed session used stays alive in the client.

The one-hour soak's client RSS grows in steps and then levels off; this shows
the part that is dpool's to keep bounded: after each Executor / Pool /
JobCluster session with 1 MB results, exceptions and no-ops, once its
results are dropped, the live gc-tracked objects and the bytes Python has
allocated (tracemalloc) come back to the same level, whatever the number of
sessions.  (What glibc keeps of freed memory is not Python's: see
docs/performance.md, "Soak: one hour through two nodes".)
"""
import gc
import tracemalloc

import dpool
import tasks
from dpool.futures import Executor
from dpool.transport import frames

MB = 1 << 20
SESSIONS = 6


def _executor_session(address, secret):
    with Executor(nodes=[address], secret=secret) as ex:
        futures = [ex.submit(tasks.make_bytes, MB) for _ in range(5)]
        futures += [ex.submit(tasks.identity, i) for i in range(200)]
        futures += [ex.submit(tasks.raise_value_error, "churn") for _ in range(5)]
        for f in futures:
            f.exception() or f.result()
    return len(futures)


def _pool_session(address, secret):
    with dpool.Pool(nodes=[address], secret=secret) as pool:
        results = [pool.apply_async(tasks.make_bytes, (MB,)) for _ in range(5)]
        results += [pool.apply_async(tasks.identity, (i,)) for i in range(200)]
        for r in results:
            r.get()
        # (not get(): an exception raised and caught keeps every frame of the
        # stack it went through, and the future keeps the exception: Python's
        # own cycle, as with concurrent.futures, collected at the gc's pass)
        bad = pool.apply_async(tasks.raise_value_error, ("churn",))
        bad.wait()
        assert not bad.successful()
    return len(results) + 1


def _cluster_session(address, secret):
    cluster = dpool.JobCluster(tasks.make_bytes, nodes=[address], secret=secret, loglevel=40)
    try:
        jobs = [cluster.submit(MB) for _ in range(5)] + [cluster.submit(2) for _ in range(100)]
        for job in jobs:
            assert job() is not None
    finally:
        cluster.close()
    return len(jobs)


SESSION_KINDS = [_executor_session, _pool_session, _cluster_session]


def _heap():
    # The frame codec's Struct caches are bounded (lru_cache(256)) but fill
    # as new frame counts appear, whatever the session: not what is measured.
    frames._lengths_struct.cache_clear()
    frames._header_struct.cache_clear()
    gc.collect()
    return len(gc.get_objects()), tracemalloc.get_traced_memory()[0]


def _traced_after(kind, address, secret):
    assert kind(address, secret) > 0
    return tracemalloc.get_traced_memory()[0]


def test_closed_sessions_leave_nothing_behind(dpool_node, node_secret):
    address = ("127.0.0.1", dpool_node.port)
    for kind in SESSION_KINDS:       # warm up: imports, caches, first-use objects
        kind(address, node_secret)
    tracemalloc.start()
    try:
        before_objects, before_bytes = _heap()
        levels = []
        for i in range(SESSIONS):
            kind = SESSION_KINDS[i % len(SESSION_KINDS)]
            # Without the garbage collector: what a session's reference
            # cycles would hold (a job and its result) stays counted.
            gc.disable()
            try:
                uncollected = _traced_after(kind, address, node_secret)
            finally:
                gc.enable()
            levels.append((*_heap(), uncollected))
    finally:
        tracemalloc.stop()
    # Each session moved 5 MB of results and ~1,000 objects through the
    # client; none of it stays, not even until the collector's next pass:
    # the levels do not climb with the sessions.
    for objects, traced, uncollected in levels:
        assert objects - before_objects < 500, levels
        assert traced - before_bytes < MB, levels
        assert uncollected - before_bytes < MB, levels
    assert levels[-1][0] - levels[len(SESSION_KINDS) - 1][0] < 200, levels
