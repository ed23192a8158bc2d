"""The joblib backend and the dashboard's cost, against references in the
same run.

    python bench/bench_ecosystem.py

- joblib: ``Parallel(n_jobs=2)`` over 2,000 tiny calls and 16 calls of
  ~50 ms of CPU each, on the "dpool" backend (an executor per call, and a
  given executor) vs joblib's default (loky); prints each time and the
  ratios to loky.
- dashboard: ``Pool.map`` of 20,000 items in 2,000 chunks with and without
  a dashboard being polled every 50 ms; prints the ratio with/without.
"""
import statistics
import threading
import urllib.request

import joblib
from _common import best

import dpool
import dpool.joblib  # registers "dpool"
from dpool.dashboard import serve


def tiny(x):
    return x + 1


def burn(n):
    total = 0
    for i in range(n):
        total += i * i
    return total


def joblib_case(backend, calls, **options):
    def run():
        with joblib.parallel_backend(backend, n_jobs=2, **options):
            joblib.Parallel()(calls)
    return best(run)


def joblib_given_executor(calls):
    from dpool.futures import Executor

    with Executor(2) as ex:
        ex.submit(tiny, 0).result()  # workers up
        return joblib_case("dpool", calls, executor=ex)


def dashboard_case(watched):
    with dpool.Pool(2) as pool:
        board = serve(pool, poll_sec=0.05) if watched else None
        stop = threading.Event()

        def poll():
            url = board.url.split("?")[0] + "api/status"
            while not stop.is_set():
                urllib.request.urlopen(url, timeout=10).read()
                stop.wait(0.05)
        poller = threading.Thread(target=poll) if watched else None
        if poller:
            poller.start()
        try:
            return best(lambda: pool.map(tiny, range(20000), chunksize=10))
        finally:
            stop.set()
            if poller:
                poller.join()
            if board:
                board.shutdown()


def main():
    cases = {"2000 tiny calls": [joblib.delayed(tiny)(i) for i in range(2000)],
             "16 x ~50 ms CPU": [joblib.delayed(burn)(1_500_000) for _ in range(16)]}
    for name, calls in cases.items():
        loky = joblib_case("loky", calls)
        ours = joblib_case("dpool", calls)
        given = joblib_given_executor(calls)
        print(f"joblib {name:18s} loky {loky:7.3f} s  dpool {ours:7.3f} s "
              f"(executor= {given:7.3f} s)  dpool/loky {ours / loky:5.2f} "
              f"(executor= {given / loky:5.2f})")
    without = statistics.median(dashboard_case(False) for _ in range(2))
    with_board = statistics.median(dashboard_case(True) for _ in range(2))
    print(f"Pool.map 20,000 items: no dashboard {without:.3f} s, dashboard polled every "
          f"50 ms {with_board:.3f} s, ratio {with_board / without:.2f}")


if __name__ == "__main__":
    main()
