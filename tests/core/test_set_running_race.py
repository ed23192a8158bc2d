"""future.set_running (a RUN batch's futures, one lock) racing cancel() from
user threads: each future is either running (its cancel returned False) or
cancelled and reported so by set_running (its cancel returned True)."""
import threading
from concurrent.futures import CancelledError

import pytest

from dpool.core.future import Future, set_running

pytestmark = pytest.mark.timeout(60)


def test_set_running_against_cancels_from_other_threads():
    for _ in range(50):
        futures = [Future() for _ in range(400)]
        answers = {}
        go = threading.Barrier(5)

        def cancel(part):
            go.wait()
            for future in part:
                answers[id(future)] = future.cancel()

        threads = [threading.Thread(target=cancel, args=(futures[k::4],)) for k in range(4)]
        for thread in threads:
            thread.start()
        go.wait()
        cancelled = []
        for k in range(0, 400, 50):
            cancelled += set_running(futures[k:k + 50])
        for thread in threads:
            thread.join()
        gone = set(map(id, cancelled))
        for future in futures:
            if answers[id(future)]:
                assert id(future) in gone and future.cancelled()
                with pytest.raises(CancelledError):
                    future.result(timeout=0)
            else:
                assert id(future) not in gone and future.running()
