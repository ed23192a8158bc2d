"""Other clients' latency while an authenticated peer declares a 3 GiB frame
and streams its bytes (issue 8, finding 4): median and worst round trip of a
no-op job on a ``dpool-node``, quiet vs during the attack, in the same run.

    python bench/bench_frame_attack.py [--trips 200] [--attack-mb 1024]
"""
import argparse
import collections
import pathlib
import statistics
import struct
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import dpool.futures
from bench_large import start_node
from helpers import authenticated_socket


def noop(x=None):
    return x


def round_trips(ex, trips):
    times = []
    for _ in range(trips):
        t = time.perf_counter()
        ex.submit(noop).result()
        times.append(time.perf_counter() - t)
    return times


def attack(port, secret, total, stop):
    """Declare a 3 GiB frame, then send ``total`` bytes of it, sealed."""
    with authenticated_socket(port, secret, timeout=30) as sock:
        sock.sendall(struct.pack("<IQ", 1, 3 * 2**30))
        block, sent = b"z" * (1 << 20), 0
        while sent < total and not stop.is_set():
            for piece in sock.sealer.seal_all(collections.deque([block])):
                sock.sock.sendall(piece)
            sent += len(block)
        stop.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trips", type=int, default=200)
    p.add_argument("--attack-mb", type=int, default=1024)
    args = p.parse_args()
    proc, port, env = start_node()
    secret = env["DPOOL_SECRET"].encode()
    try:
        with dpool.futures.Executor(max_workers=1, nodes=[("127.0.0.1", port)],
                                    secret=secret) as ex:
            round_trips(ex, 20)
            quiet = round_trips(ex, args.trips)
            stop = threading.Event()
            thread = threading.Thread(target=attack,
                                      args=(port, secret, args.attack_mb << 20, stop))
            thread.start()
            try:
                loud = round_trips(ex, args.trips)
            finally:
                stop.set()
                thread.join()
        for name, times in (("quiet", quiet), ("during attack", loud)):
            print(f"{name:>14}: median {statistics.median(times) * 1e3:7.2f} ms, "
                  f"worst {max(times) * 1e3:7.2f} ms")
        worst = max(loud) * 1e3
        print(f"worst round trip during the attack: {worst:.1f} ms "
              f"({'MET' if worst < 50 else 'MISS'} < 50 ms)")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
