"""The joblib backend (dpool.joblib): joblib.Parallel and scikit-learn on dpool."""
import os

import pytest

joblib = pytest.importorskip("joblib")
import dpool.joblib  # noqa: E402  (registers the "dpool" backend)

pytestmark = pytest.mark.timeout(60)


def square(x):
    return x * x


def pid_of(_):
    return os.getpid()


def ancestors(_):
    import psutil
    return [p.pid for p in psutil.Process().parents()]


def boom(x):
    if x == 3:
        raise ValueError("boom-3")
    return x


def test_registered_on_import():
    from joblib.parallel import BACKENDS
    assert BACKENDS["dpool"] is dpool.joblib.DpoolBackend


def test_parallel_runs_in_dpool_workers():
    with joblib.parallel_backend("dpool", n_jobs=2):
        out = joblib.Parallel()(joblib.delayed(square)(x) for x in range(20))
        pids = set(joblib.Parallel()(joblib.delayed(pid_of)(x) for x in range(8)))
    assert out == [x * x for x in range(20)]
    assert os.getpid() not in pids


def test_n_jobs_minus_one_is_every_cpu():
    with joblib.parallel_config(backend="dpool", n_jobs=-1):
        parallel = joblib.Parallel()
        with parallel:
            assert parallel._effective_n_jobs() == (os.cpu_count() or 1)
        assert parallel([joblib.delayed(square)(3)]) == [9]


def test_a_task_error_reaches_the_caller_with_its_type():
    with joblib.parallel_backend("dpool", n_jobs=2):
        with pytest.raises(ValueError, match="boom-3"):
            joblib.Parallel()(joblib.delayed(boom)(x) for x in range(10))
        # the backend keeps working after an error
        assert joblib.Parallel()(joblib.delayed(square)(x) for x in range(3)) == [0, 1, 4]


def test_generator_output():
    with joblib.parallel_backend("dpool", n_jobs=2):
        gen = joblib.Parallel(return_as="generator")(joblib.delayed(square)(x) for x in range(5))
        assert list(gen) == [0, 1, 4, 9, 16]


def test_on_a_remote_node(remote_node):
    address = "127.0.0.1:%d" % remote_node.port
    with joblib.parallel_backend("dpool", nodes=address, secret=remote_node.secret):
        runs = joblib.Parallel()(joblib.delayed(ancestors)(x) for x in range(6))
    assert all(remote_node.pid in parents for parents in runs)


def test_nodes_from_the_environment(remote_node, monkeypatch):
    monkeypatch.setenv("DPOOL_NODES", "127.0.0.1:%d" % remote_node.port)
    monkeypatch.setenv("DPOOL_SECRET", remote_node.secret.decode())
    with joblib.parallel_backend("dpool"):
        runs = joblib.Parallel()(joblib.delayed(ancestors)(x) for x in range(4))
    assert all(remote_node.pid in parents for parents in runs)


def test_scikit_learn_grid_search():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import make_classification
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = make_classification(n_samples=60, n_features=5, random_state=0)
    grid = {"C": [0.1, 1.0, 10.0], "kernel": ["linear", "rbf"]}
    with joblib.parallel_backend("dpool", n_jobs=2):
        search = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(X, y)
    reference = GridSearchCV(SVC(), grid, cv=3, n_jobs=1).fit(X, y)
    assert search.best_params_ == reference.best_params_
    assert search.cv_results_["mean_test_score"].tolist() == \
        reference.cv_results_["mean_test_score"].tolist()
    assert sklearn.__version__


def test_a_given_executor_is_reused_and_left_open():
    from dpool.futures import Executor

    with Executor(2) as ex:
        with joblib.parallel_backend("dpool", executor=ex):
            first = set(joblib.Parallel(n_jobs=2)(joblib.delayed(pid_of)(x) for x in range(8)))
            with pytest.raises(ValueError, match="boom-3"):
                joblib.Parallel(n_jobs=2)(joblib.delayed(boom)(x) for x in range(10))
            second = set(joblib.Parallel(n_jobs=2)(joblib.delayed(pid_of)(x) for x in range(8)))
        assert len(first | second) <= 2  # the executor's two workers, both times
        assert ex.submit(square, 5).result() == 25  # still open


def test_bad_backend_arguments():
    from dpool.futures import Executor

    with pytest.raises(TypeError, match="Executor"):
        dpool.joblib.DpoolBackend(executor=object())
    with Executor(1) as ex:
        with pytest.raises(ValueError, match="not both"):
            dpool.joblib.DpoolBackend(executor=ex, nodes="127.0.0.1:1")


INITIALIZED = None  # what init_worker set, in a worker


def init_worker(value):
    global INITIALIZED
    INITIALIZED = (value, os.getpid())


def initialized(_):
    return INITIALIZED


def check_initializer_ran_in_every_worker(results, value):
    assert results and all(r is not None and r[0] == value for r in results), results
    assert all(r[1] != os.getpid() for r in results)


def test_an_initializer_given_to_parallel_runs_in_every_worker():
    # joblib's Parallel(initializer=, initargs=) (as its loky and
    # multiprocessing backends; joblib's own test_initializer_parallel)
    out = joblib.Parallel(backend="dpool", n_jobs=2, initializer=init_worker,
                          initargs=("p",))(joblib.delayed(initialized)(x) for x in range(20))
    check_initializer_ran_in_every_worker(out, "p")


@pytest.mark.parametrize("context", ["parallel_config", "parallel_backend"])
def test_an_initializer_given_to_the_backend_context_runs_in_every_worker(context):
    with getattr(joblib, context)("dpool", n_jobs=2, initializer=init_worker,
                                  initargs=("c",)):
        out = joblib.Parallel()(joblib.delayed(initialized)(x) for x in range(20))
    check_initializer_ran_in_every_worker(out, "c")


def test_an_initializer_on_a_remote_node(remote_node):
    address = "127.0.0.1:%d" % remote_node.port
    out = joblib.Parallel(backend="dpool", nodes=address, secret=remote_node.secret,
                          initializer=init_worker, initargs=("r",))(
        joblib.delayed(initialized)(x) for x in range(8))
    check_initializer_ran_in_every_worker(out, "r")


def test_an_initializer_with_a_given_executor_is_refused():
    from dpool.futures import Executor

    with Executor(1) as ex:
        with pytest.raises(ValueError, match="initializer"):
            joblib.Parallel(backend=dpool.joblib.DpoolBackend(executor=ex),
                            initializer=init_worker, initargs=("x",))(
                joblib.delayed(initialized)(x) for x in range(2))


def fill(out, start, value):
    out[start:start + 2] = value


def total(array):
    return float(array.sum())


def test_a_tasks_writes_into_a_memmap_argument_are_seen_by_the_caller(tmp_path):
    # joblib's docs, "Writing parallel computation results in shared
    # memory": its process backends hand memmap arguments over as memmaps
    # of the same file (pickled as is they would be copies, writes lost)
    np = pytest.importorskip("numpy")
    path = str(tmp_path / "out.mmap")
    out = np.memmap(path, dtype=np.float64, shape=(12,), mode="w+", offset=24)
    view = out[2:]  # a view: its own offset in the file
    with joblib.parallel_backend("dpool", n_jobs=2):
        joblib.Parallel()(joblib.delayed(fill)(view, i, i + 1) for i in range(0, 10, 2))
        sums = joblib.Parallel()(joblib.delayed(total)(a) for a in (out, view, out[::2]))
    assert out.tolist() == [0, 0, 1, 1, 3, 3, 5, 5, 7, 7, 9, 9]
    assert sums == [50.0, 50.0, 25.0]
    read_only = np.memmap(path, dtype=np.float64, shape=(12,), mode="r", offset=24)
    with joblib.parallel_backend("dpool", n_jobs=2):
        assert joblib.Parallel()([joblib.delayed(total)(read_only)]) == [50.0]


def test_the_backend_is_registered_in_the_workers_that_run_its_tasks(remote_node):
    # a task naming backend="dpool" (a nested Parallel; joblib's
    # test_nested_loop, test_backend_nesting_level) finds it registered, in
    # a worker that is a fresh interpreter (a node's) too.  (A lambda: sent
    # by value, it does not import this module, which imports dpool.joblib.)
    address = "127.0.0.1:%d" % remote_node.port
    registered = lambda _: "dpool" in __import__("joblib.parallel").parallel.BACKENDS  # noqa: E731
    out = joblib.Parallel(backend="dpool", nodes=address, secret=remote_node.secret)(
        joblib.delayed(registered)(x) for x in range(4))
    assert out == [True] * 4
