"""How a worker reads a spooled argument (issue 15; transport/spool.py): a
frame in a memory file read through a 256 KiB scratch buffer and appended
to the growing ``bytes`` object (what frames.FrameDecoder did before
2026-12-01), against ``preadv`` straight into the growing object's room
(``GrowingBytes.room``, what it does now).  CPU time of this process, the
two interleaved, medians; the ratio is what to compare.

    python bench/bench_spool_read.py [--mib 256] [--rounds 7]
"""
import argparse
import os
import statistics
import time

from dpool.transport import inplace, spool
from dpool.transport.frames import RECV_BUFFER_SIZE


def make_file(n):
    fd = os.memfd_create("bench-spool")
    chunk = b"x" * (8 << 20)
    while n > 0:
        n -= os.write(fd, chunk[:n])
    return fd


def via_scratch(fd, n):
    big = inplace.GrowingBytes(n)
    scratch = bytearray(RECV_BUFFER_SIZE)
    view = memoryview(scratch)
    address, holder = inplace.address_of(scratch)
    spool.read_file(fd, n, False, lambda k: view[:k], lambda k: big.extend(address, k))
    return big.finish()


def direct(fd, n):
    big = inplace.GrowingBytes(n)
    spool.read_file(fd, n, False, big.room, big.advance)
    return big.finish()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n = args.mib << 20
    fd = make_file(n)
    cpu = {"scratch": [], "direct": []}
    ways = [("scratch", via_scratch), ("direct", direct)]
    for r in range(args.rounds):
        for name, read in (ways if r % 2 else ways[::-1]):
            start = time.process_time()
            data = read(fd, n)
            cpu[name].append(time.process_time() - start)
            assert len(data) == n
            del data
    medians = {name: statistics.median(v) for name, v in cpu.items()}
    print(f"python bench/bench_spool_read.py --mib {args.mib} --rounds {args.rounds}; "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, value in medians.items():
        print(f"{name:8s} CPU {value:.3f} s ({args.mib / value:.0f} MiB/s)")
    print(f"direct / scratch: {medians['direct'] / medians['scratch']:.2f}")


if __name__ == "__main__":
    main()
