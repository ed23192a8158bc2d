"""Client instructions per local round trip, for ``valgrind --tool=callgrind``.

    valgrind --tool=callgrind --callgrind-out-file=cg.%p \\
        python bench/callgrind_roundtrip.py N [executor|pool]

200 warm-up calls, then N ``Executor(2).submit(noop, i).result()`` (or
``Pool(2).apply(noop, (i,))``).  Run it with N=500 and N=2500: the client's
instructions per call are the difference of its totals / 2000 (the client's
file is the one named by the pid this prints on stderr; the zygote and
workers are forked, so they are traced too).  Instruction counts do not
depend on the machine's load, wall-clock ratios do (bench_small.py).
"""
import os
import sys

import dpool
from dpool.futures import Executor


def noop(x=None):
    return x


def main():
    n = int(sys.argv[1])
    api = sys.argv[2] if len(sys.argv) > 2 else "executor"
    print(f"client pid {os.getpid()}", file=sys.stderr)
    if api == "executor":
        with Executor(2, connect_timeout=300) as ex:  # (slow start under valgrind)
            for i in range(200 + n):
                ex.submit(noop, i).result()
    else:
        with dpool.Pool(2, connect_timeout=300) as pool:
            for i in range(200 + n):
                pool.apply(noop, (i,))


if __name__ == "__main__":
    main()
