"""Instructions per ``with _HeldInterrupts(): pass`` in the main thread, for
``valgrind --tool=callgrind`` (dpool/core/direct.py: the block around each
read of a direct call's answer)::

    valgrind --tool=callgrind --callgrind-out-file=cg.%p python bench/callgrind_held.py 1000
    valgrind --tool=callgrind --callgrind-out-file=cg.%p python bench/callgrind_held.py 11000

Per block: the difference of the two totals (``I refs``) / 10,000.  Run it
with the real interpreter, not a wrapper script (pyenv's shim), or callgrind
counts the wrapper.
"""
import sys

from dpool.core.direct import _HeldInterrupts


def main(n):
    for _ in range(n):
        with _HeldInterrupts():
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]))
