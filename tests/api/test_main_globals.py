"""Functions and classes of a script's __main__ (pickled by value) share one
module namespace per worker, as the stdlib's workers share one __main__: what
an initializer sets with ``global`` is seen by the tasks."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys
    G = None
    SCALE = 1

    def init(x):
        global G
        G = x

    def f(i):
        return G + i * SCALE

    class Box:
        def __init__(self, v):
            self.v = v

    def boxed(i):
        return Box(G + i)

    def main(kind, address, secret):
        kw = {}
        if address:
            kw = dict(nodes=[address], secret=secret.encode())
        if kind == 'mp':
            from multiprocessing import Pool
            from concurrent.futures import ProcessPoolExecutor as Executor
            kw = {}
        else:
            from dpool import Pool
            from dpool.futures import Executor
        out = {}
        with Pool(2, initializer=init, initargs=(10,), **kw) as p:
            out['map'] = p.map(f, range(4))
            out['apply'] = p.apply(f, (5,))
            out['async'] = p.apply_async(f, (6,)).get(60)
            out['box'] = [b.v for b in p.map(boxed, range(2))]
            out['lambda'] = 10 if kind == 'mp' else p.apply(lambda: G)  # (mp: unpicklable)
        with Pool(1, initializer=init, initargs=(20,), maxtasksperchild=1, **kw) as p:
            out['maxtasks'] = p.map(f, range(3), chunksize=1)
        with Executor(2, initializer=init, initargs=(30,), **kw) as ex:
            out['ex_map'] = list(ex.map(f, range(4)))
            out['ex_submit'] = ex.submit(f, 1).result(60)
        print(json.dumps(out))

    if __name__ == '__main__':
        main(*sys.argv[1:])
''')


def _run(tmp_path, *argv, zygote=None):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    env = dict(os.environ)
    if zygote:
        env["DPOOL_ZYGOTE"] = zygote
    proc = subprocess.run([sys.executable, str(path), *argv], capture_output=True,
                          text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    out = _run(tmp_path_factory.mktemp("mp"), "mp", "", "")
    assert '"map": [10, 11, 12, 13]' in out
    return out


@pytest.mark.parametrize("zygote", [None, "exec"])
def test_an_initializers_globals_are_seen_by_tasks_locally(tmp_path, expected, zygote):
    assert _run(tmp_path, "dpool", "", "", zygote=zygote) == expected


def test_an_initializers_globals_are_seen_by_tasks_via_a_node(tmp_path, expected,
                                                               dpool_node, node_secret):
    assert _run(tmp_path, "dpool", "%s:%d" % tuple(dpool_node.address),
                node_secret.decode()) == expected
