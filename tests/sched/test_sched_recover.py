"""recover_jobs for a SharedJobCluster, as dispy's: a client with a
recover_file that dies leaves its jobs running behind the scheduler, which
keeps their results until recover_jobs collects them."""
import os
import sys

import dpool as dispy
from helpers import kill_once_ready, poll_for
from helpers_sched import SECRET

CLIENT = """
import os, sys, time
import dpool as dispy
from tasks import hold
port, secret, recover_file, tmp = sys.argv[1:]
cluster = dispy.SharedJobCluster(hold, scheduler_host="127.0.0.1", scheduler_port=int(port),
                                 secret=secret, recover_file=recover_file)
for i in range(4):  # 0 and 1 end once g1 exists, 2 and 3 never do
    job = cluster.submit(os.path.join(tmp, f"m-{i}"), os.path.join(tmp, "g1" if i < 2 else "g2"))
    job.id = ("job", i)
while not all(os.path.exists(os.path.join(tmp, f"m-{i}")) for i in range(4)):
    time.sleep(0.01)
open(os.path.join(tmp, "ready"), "w").close()
time.sleep(60)
"""


def killed_client(sched, tmp_path):
    recover_file = str(tmp_path / "_dispy_shared")
    kill_once_ready([sys.executable, "-c", CLIENT, str(sched.port), SECRET.decode(), recover_file,
                     str(tmp_path)], tmp_path, 60)
    return recover_file


def test_recover_jobs_collects_a_dead_shared_clusters_jobs(scheduler, tmp_path):
    recover_file = killed_client(scheduler, tmp_path)
    poll_for(lambda: "kept for" in scheduler.stderr(), 20,
             message="the scheduler to keep the client's session")
    (tmp_path / "g1").touch()  # jobs 0 and 1 end while their client is gone
    jobs = dispy.recover_jobs(recover_file, timeout=30, terminate_pending=True)
    by_id = {job.id: job for job in jobs}
    assert sorted(by_id) == [("job", i) for i in range(4)]
    for i in (0, 1):
        assert by_id[("job", i)].status == dispy.DispyJob.Finished
        assert by_id[("job", i)].result > 0  # the pid that ran it
    for i in (2, 3):  # still running: terminated (terminate_pending)
        assert by_id[("job", i)].status in (dispy.DispyJob.Terminated,
                                            dispy.DispyJob.Cancelled)
    assert not os.path.exists(recover_file)
    # Collected: the scheduler keeps nothing more for it.
    assert dispy.recover_jobs(recover_file, timeout=5) == []
