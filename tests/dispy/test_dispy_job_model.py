"""DispyJob as an object (no cluster): slots as dispy's, what a snapshot
copies, ``finish`` made on demand and set whichever side comes first."""
import threading

import pytest

from dpool.dispy.model import DispyJob


def test_a_dispy_job_takes_no_attribute_of_its_own_as_dispys():
    job = DispyJob(None, (1,), {})
    with pytest.raises(AttributeError):
        job.mine = 1
    job.id = "mine"  # (its id is the user's to set)
    assert job.id == "mine"


def test_kwargs_is_the_dict_given_or_an_empty_one():
    given = {"a": 1}
    assert DispyJob(None, (), given).kwargs is given
    job = DispyJob(None, (), {})
    assert job.kwargs == {} and job.kwargs is job.kwargs
    job.kwargs = None  # (a recovered job's, as dispy's)
    assert job.kwargs is None


def test_a_snapshot_copies_every_field_and_freezes_the_status():
    job = DispyJob(7, (1, 2), {"k": 3})
    job.result, job.stdout, job.ip_addr = 42, "out", "10.0.0.1"
    job.provisional(5)
    snap = job.snapshot()
    assert (snap.id, snap.args, snap.kwargs, snap.result, snap.stdout, snap.ip_addr,
            snap.submit_time) == (7, (1, 2), {"k": 3}, 5, "out", "10.0.0.1", job.submit_time)
    assert snap.status == DispyJob.ProvisionalResult
    job._set_done()
    assert snap.status == DispyJob.ProvisionalResult and not snap.is_done()


def test_finish_is_set_when_made_before_or_after_the_job_is_done():
    before = DispyJob()
    event = before.finish
    assert not event.is_set()
    before._set_done()
    assert event.is_set() and before.finish is event
    after = DispyJob()
    after._set_done()
    assert after.finish.is_set()
    assert after(timeout=0) is None


def test_finish_races_with_the_end_and_is_always_set():
    for _ in range(200):
        job = DispyJob()
        ender = threading.Thread(target=job._set_done)
        ender.start()
        event = job.finish
        ender.join()
        assert event.wait(5)
