"""bench/bench_queues.py: every dpool cell runs as many workers as its
multiprocessing partner (CPUS), whatever the host's CPU count."""
import os

from helpers import load_bench


def test_a_local_jobcluster_cell_runs_as_many_workers_as_mp_on_a_larger_host(monkeypatch):
    """mp.Pool(CPUS) is the reference: a local JobCluster took every CPU of
    the host (its cpus=None), so on a host of more than CPUS the ratio was
    against a pool of fewer workers than dpool's."""
    bench = load_bench("bench_queues", monkeypatch)
    monkeypatch.setattr(os, "cpu_count", lambda: bench.CPUS + 2)
    submit, get, close = bench._open("JobCluster.submit", 0)
    try:
        assert get(submit(3)) == 3
        cluster = close.__self__
        assert [node.cpus for node in cluster._client.nodes()] == [bench.CPUS]
    finally:
        close()
