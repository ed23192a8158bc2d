"""Instructions a ``dpool-node`` (or, ``--side client``, its client) spends
on large results relayed through the node (issue 15), per 100 MB, for each
source tree given: that process runs under ``valgrind --tool=callgrind``
(the workers do not), once with ``--jobs`` results of ``--mb`` MB
(``b"y" * n``, AES-GCM records from the node to the client) and once with
none; the difference of the two totals per 100 MB.  User-space instructions
only (the kernel's copies and page faults are not counted): the figure for
the process's own work (the interpreter, AES-GCM, ``memset``/``memmove``),
repeatable on a loaded machine.

    python bench/callgrind_relay.py --trees OLD NEW [--side node|client] [--mb 100] [--jobs 2]
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

SECRET = "bench-callgrind-relay-0123456789"
CLIENT = """
import os, sys
import dpool.futures

def make(n):
    return b"y" * n

port, n, jobs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
with dpool.futures.Executor(max_workers=1, nodes=[("127.0.0.1", port)],
                            secret=os.environ["DPOOL_SECRET"], connect_timeout=300) as ex:
    ex.submit(len, b"x").result()
    for _ in range(jobs):
        assert len(ex.submit(make, n).result()) == n
"""


def python():
    """The real interpreter (callgrind would count pyenv's shim instead)."""
    return os.path.realpath(sys.executable)


# (a client under valgrind takes longer than the node's default to authenticate)
NODE = ("import sys; import dpool.transport.tcp as tcp; "
        "tcp.start_server.__kwdefaults__['auth_timeout'] = 600.0; "
        "from dpool.daemons import node; sys.argv[0] = 'dpool-node'; node.main()")


def instructions(tree, side, mb, jobs):
    env = dict(os.environ, PYTHONPATH=tree, DPOOL_SECRET=SECRET, DPOOL_HOME=tempfile.mkdtemp())
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        node = subprocess.Popen(
            (valgrind if side == "node" else []) +
            [python(), "-c", NODE, "--port", "0", "--cpus", "1", "--loglevel", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, cwd=tree)
        try:
            line = node.stdout.readline()
            port = int(re.search(r" on \S+:(\d+)", line).group(1))
            client = subprocess.run(
                (valgrind if side == "client" else []) +
                [python(), "-c", CLIENT, str(port), str(mb * 1_000_000), str(jobs)],
                env=env, cwd=tree, timeout=1800, capture_output=True, text=True)
            if client.returncode:
                raise RuntimeError(f"the client failed: {client.stderr[-1000:]}")
        finally:
            node.send_signal(signal.SIGINT)
            _, err = node.communicate(timeout=600)
        refs = re.search(r"I\s+refs:\s+([\d,]+)", err if side == "node" else client.stderr)
        if refs is None:
            raise RuntimeError(f"no callgrind total from the {side}")
        return int(refs.group(1).replace(",", ""))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs="+", default=["."], help="source trees (PYTHONPATH)")
    p.add_argument("--side", default="node", choices=["node", "client"])
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    print(f"python bench/callgrind_relay.py {' '.join(sys.argv[1:])}    "
          f"(load average {os.getloadavg()[0]:.1f}, {time.strftime('%H:%M UTC', time.gmtime())})")
    first = None
    for tree in [os.path.abspath(t) for t in args.trees]:
        idle = instructions(tree, args.side, args.mb, 0)
        busy = instructions(tree, args.side, args.mb, args.jobs)
        per = (busy - idle) / (args.jobs * args.mb / 100)
        first = first or per
        print(f"  {tree}: {per / 1e6:.1f}M instructions in the {args.side} per 100 MB relayed "
              f"({per / first:.2f}x the first)")


if __name__ == "__main__":
    main()
