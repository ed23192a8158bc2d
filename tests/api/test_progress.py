"""Progress bars: progress= on the maps, dpool.progress() around futures and
DispyJobs; off by default."""
import io
import sys

import pytest

import dpool
from dpool.futures import Executor
from tasks import double, nap

tqdm = pytest.importorskip("tqdm")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def no_tqdm_monitor(monkeypatch):
    """tqdm's monitor thread lives forever; the leak check would flag it."""
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)


def bar_text(buf):
    return buf.getvalue().replace("\r", "\n")


def test_maps_print_nothing_by_default(capfd):
    with dpool.Pool(2) as pool:
        assert pool.map(double, range(10)) == [2 * x for x in range(10)]
        assert list(pool.imap(double, range(3))) == [0, 2, 4]
    with Executor(2) as ex:
        assert list(ex.map(double, range(5))) == [0, 2, 4, 6, 8]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize("method", ["map", "starmap", "imap", "imap_unordered", "map_async"])
def test_pool_maps_count_items(method):
    buf = io.StringIO()
    items = [(x,) for x in range(20)] if method == "starmap" else list(range(20))
    with dpool.Pool(2) as pool:
        out = getattr(pool, method)(double, items, 3, progress={"file": buf, "desc": "work"})
        if method == "map_async":
            out = out.get(30)
        assert sorted(out) == [2 * x for x in range(20)]
    text = bar_text(buf)
    assert "work" in text and "20/20" in text


def test_imap_of_an_iterator_without_length():
    buf = io.StringIO()
    with dpool.Pool(2) as pool:
        out = list(pool.imap(double, iter(range(7)), progress={"file": buf}))
    assert out == [2 * x for x in range(7)]
    assert "7it" in bar_text(buf)


def test_executor_map():
    buf = io.StringIO()
    with Executor(2) as ex:
        assert list(ex.map(double, range(12), chunksize=5, progress={"file": buf})) == \
            [2 * x for x in range(12)]
        # the bar closes when the last chunk ends, even if nobody iterates
        ex.map(double, range(4), progress={"file": buf})
    assert "12/12" in bar_text(buf) and "4/4" in bar_text(buf)


def test_progress_over_futures_yields_them_as_they_finish():
    buf = io.StringIO()
    with Executor(2) as ex:
        futures = [ex.submit(nap, 0.5, "slow"), ex.submit(nap, 0, "fast")]
        done = [f.result() for f in dpool.progress(futures, file=buf)]
    assert done == ["fast", "slow"]
    assert "2/2" in bar_text(buf)


def test_progress_over_dispy_jobs():
    buf = io.StringIO()
    with dpool.JobCluster(double, cpus=2) as cluster:
        jobs = [cluster.submit(x) for x in range(6)]
        finished = list(dpool.progress(jobs, file=buf))
        assert sorted(job.result for job in finished) == [0, 2, 4, 6, 8, 10]
        assert all(job.status == dpool.DispyJob.Finished for job in finished)
    assert "6/6" in bar_text(buf)


def test_progress_over_finished_dispy_jobs():
    buf = io.StringIO()
    with dpool.JobCluster(double, cpus=1) as cluster:
        jobs = [cluster.submit(x) for x in range(3)]
        assert [job() for job in jobs] == [0, 2, 4]   # finished before progress()
        assert sorted(job.result for job in dpool.progress(jobs, file=buf)) == [0, 2, 4]
    assert "3/3" in bar_text(buf)


def test_progress_over_a_plain_iterable():
    buf = io.StringIO()
    assert list(dpool.progress([1, 2, 3], file=buf)) == [1, 2, 3]
    assert list(dpool.progress([])) == []
    assert "3/3" in bar_text(buf)


def test_a_bad_option_and_a_missing_tqdm(monkeypatch):
    with dpool.Pool(1) as pool:
        with pytest.raises(TypeError, match="progress must be"):
            pool.map(double, [1], progress="yes")
        assert pool._client.pending() == 0  # refused before anything was submitted
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
        with pytest.raises(ImportError, match="pip install"):
            pool.map(double, [1], progress=True)
        assert pool.map(double, [1]) == [2]
