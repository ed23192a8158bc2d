"""CPython's _test_multiprocessing test classes of the "processes" kind,
with ``dpool.Pool`` in place of ``multiprocessing.Pool``.  A module of its
own, importable by the workers, so that the test classes' methods pickle by
reference as in CPython's own run."""
import multiprocessing

from test import _test_multiprocessing as m

import dpool

multiprocessing.Pool = dpool.Pool
m.ProcessesMixin.Pool = staticmethod(dpool.Pool)
m.install_tests_in_module_dict(globals(), "fork", only_type="processes")
