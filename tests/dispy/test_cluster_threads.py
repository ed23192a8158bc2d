"""JobCluster's job set (no lock of its own since 5fd16cc) under many user
threads submitting while the loop thread finishes jobs: every job is done
when wait() returns, none is left in the set, close() returns."""
import threading

import pytest

import dpool
from helpers import cluster_on
from tasks import double

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("status", [False, True])
def test_threads_submitting_while_jobs_finish(dpool_node, status):
    seen = []
    kwargs = {"cluster_status": lambda *a: seen.append(a[0])} if status else {}
    with cluster_on(dpool_node, double, **kwargs) as cluster:
        jobs, start = [[] for _ in range(8)], threading.Barrier(8)

        def submit(mine, base):
            start.wait()
            for i in range(base, base + 100):
                mine.append((i, cluster.submit(i)))

        threads = [threading.Thread(target=submit, args=(jobs[k], 100 * k)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert cluster.wait(timeout=40)
        done = [pair for mine in jobs for pair in mine]
        assert len(done) == 800
        assert all(job.status == dpool.DispyJob.Finished and job.result == 2 * i
                   for i, job in done)
        assert not cluster._jobs
    if status:
        assert seen.count(dpool.DispyJob.Created) == 800
        assert seen.count(dpool.DispyJob.Finished) == 800
