"""Tests of dpool.serialize."""
import array
import functools
import math
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import traceback
import types

import pytest
from hypothesis import given, settings, strategies as st

from dpool.errors import RemoteError
from dpool.serialize import (
    OUT_OF_BAND_THRESHOLD,
    RemoteTraceback,
    dump_exception,
    dumps,
    dumps_call,
    dumps_function,
    load_exception,
    loads,
    loads_function,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MB = 1 << 20


# --------------------------------------------------------------------------
# Helpers (module level, so they are importable by reference)

def module_level_add(a, b=0):
    return a + b


class CallableThing:
    def __init__(self, n):
        self.n = n

    def __call__(self, x):
        return x * self.n


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)


class MyError(ValueError):
    pass


class TwoArgError(Exception):
    """Its __init__ needs 2 arguments but args holds 1: unpickling fails."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")
        self.a, self.b = a, b


def raising_function_for_tests(exc):
    raise exc


def _captured(exc):
    try:
        raising_function_for_tests(exc)
    except BaseException as e:
        return e


def _same(a, b):
    """Equality that also requires equal types and treats NaN == NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return (list(a) == list(b)
                and all(_same(a[k], b[k]) for k in a))
    return a == b


# --------------------------------------------------------------------------
# Plain data

scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text() | st.binary())
nested = st.recursive(
    scalars,
    lambda children: (st.lists(children)
                      | st.lists(children).map(tuple)
                      | st.dictionaries(st.text() | st.integers(), children)),
    max_leaves=25,
)


@settings(max_examples=100, deadline=None)
@given(nested)
def test_round_trip_nested_data(x):
    frames = dumps(x)
    assert len(frames) == 1
    assert _same(loads(frames), x)


@settings(max_examples=60, deadline=None)
@given(nested)
def test_round_trip_nested_data_general_path(x):
    # a frozenset is not fast-path material: exercises the Pickler subclass
    obj = (x, frozenset({1}))
    assert _same(loads(dumps(obj)), obj)


@settings(max_examples=60, deadline=None)
@given(st.lists(nested, max_size=4).map(tuple) | st.lists(nested, max_size=4),
       st.none() | st.dictionaries(st.text(max_size=3), nested, max_size=2))
def test_dumps_call_is_dumps_of_args_and_kwargs(args, kwargs):
    """The submit path's shortcut makes the very same bytes."""
    assert dumps_call(args, kwargs) == dumps((args, kwargs or {}))


@pytest.mark.parametrize("obj", [
    None, 1, 1.5, "s", b"b", (), [], {}, ((1,), {}), ((1, "a", b"x"), {"k": 2.0}),
    [1, [2, [3, [4]]]], {"a": {"b": {"c": 1}}}, Point(1, 2), {1, 2},
])
def test_round_trip_examples(obj):
    frames = dumps(obj)
    assert all(isinstance(f, (bytes, bytearray, memoryview)) for f in frames)
    assert loads(frames) == obj


def test_shared_and_recursive_references():
    inner = [1, 2]
    obj = [inner, inner]
    out = loads(dumps(obj))
    assert out == obj and out[0] is out[1]
    rec = [1]
    rec.append(rec)
    out = loads(dumps(rec))
    assert out[1] is out


# --------------------------------------------------------------------------
# Large buffers travel out-of-band

def _big(kind, n=MB):
    data = bytes(range(256)) * (n // 256)
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    return memoryview(data)


PLACEMENTS = {
    "top": lambda d: d,
    "args": lambda d: (1, d),
    "kwargs": lambda d: {"data": d, "n": 1},
    "args_kwargs": lambda d: ((d,), {}),
    "kwargs_in_pair": lambda d: ((), {"data": d}),
    "list": lambda d: [d, "x"],
}


def _get(placement, obj):
    return {
        "top": lambda o: o,
        "args": lambda o: o[1],
        "kwargs": lambda o: o["data"],
        "args_kwargs": lambda o: o[0][0],
        "kwargs_in_pair": lambda o: o[1]["data"],
        "list": lambda o: o[0],
    }[placement](obj)


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_large_buffers_out_of_band(kind, placement):
    data = _big(kind)
    frames = dumps(PLACEMENTS[placement](data))
    assert len(frames) == 2
    assert len(frames[0]) < 1024
    assert frames[1].nbytes == MB
    out = _get(placement, loads(frames))
    assert type(out) is type(data)
    assert bytes(out) == bytes(data)


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
def test_large_buffers_zero_copy_and_from_transport_frames(kind):
    data = _big(kind)
    frames = dumps(((data,), {}))
    base = data.obj if kind == "memoryview" else data
    # a view of the caller's object, no copy
    assert frames[1].obj is base or frames[1].obj is data
    # as received by a transport: bytes / bytearray / memoryview frames
    for convert in (bytes, bytearray, memoryview):
        received = [convert(f) for f in frames]
        out = loads(received)[0][0]
        assert type(out) is type(data) and bytes(out) == bytes(data)


def test_same_buffer_twice_is_one_frame():
    data = _big("bytes")
    frames = dumps(((data, data), {"again": data}))
    assert len(frames) == 2
    (a, b), kw = loads(frames)
    assert a == data and a is b is kw["again"]


def test_small_buffers_stay_in_band():
    small = b"x" * (OUT_OF_BAND_THRESHOLD - 1)
    for obj in (small, bytearray(small), memoryview(small), ((small,), {})):
        frames = dumps(obj)
        assert len(frames) == 1
        out = loads(frames)
        assert type(out) is type(obj)
    big = b"x" * OUT_OF_BAND_THRESHOLD
    assert len(dumps(big)) == 2


def test_memoryview_format_shape_and_noncontiguous():
    mv = memoryview(array.array("d", range(20000))).cast("B").cast("d", [100, 200])
    out = loads(dumps((mv,)))[0]
    assert type(out) is memoryview
    assert (out.format, out.shape) == ("d", (100, 200))
    assert out.tolist() == mv.tolist()
    strided = memoryview(bytes(range(256)) * 1024)[::2]
    assert not strided.c_contiguous
    out = loads(dumps({"v": strided}))["v"]
    assert type(out) is memoryview and out.tobytes() == strided.tobytes()


def test_memoryview_deep_inside_structure():
    # memoryviews are handled by the pickler itself, at any depth
    data = _big("memoryview")
    obj = {"a": [[[data]]]}
    frames = dumps(obj)
    assert len(frames) == 2 and len(frames[0]) < 1024
    assert loads(frames)["a"][0][0][0].tobytes() == data.tobytes()


def test_numpy_arrays_out_of_band():
    np = pytest.importorskip("numpy")
    arr = np.arange(MB // 8, dtype=np.float64).reshape(256, -1)
    # deep inside, and non-contiguous (sent as a contiguous copy)
    obj = ((arr, "x"), {"deep": [{"arr": arr[:, ::2]}], "f": arr.T})
    frames = dumps(obj)
    assert len(frames) == 4
    assert len(frames[0]) < 1024
    (a, s), kw = loads(frames)
    assert s == "x"
    assert np.array_equal(a, arr) and a.dtype == arr.dtype
    assert np.array_equal(kw["deep"][0]["arr"], arr[:, ::2])
    assert np.array_equal(kw["f"], arr.T)
    small = np.arange(10)
    frames = dumps((small,))
    assert len(frames) == 1
    assert np.array_equal(loads(frames)[0], small)


# --------------------------------------------------------------------------
# Functions

def test_module_level_function_by_reference():
    blob = dumps_function(module_level_add)
    assert isinstance(blob, bytes)
    assert len(blob) < 200
    assert b"cloudpickle" not in blob
    assert b"module_level_add" in blob
    assert loads_function(blob) is module_level_add


@pytest.mark.parametrize("fn", [len, print, dict.fromkeys, str.upper, Point,
                                functools.reduce])
def test_builtins_and_classes_by_reference(fn):
    blob = dumps_function(fn)
    assert b"cloudpickle" not in blob
    assert loads_function(blob) == fn


def test_lambda():
    fn = loads_function(dumps_function(lambda x, y=2: x * y))
    assert fn(3) == 6 and fn(3, y=3) == 9


def test_closure():
    k = 10
    items = [1, 2]

    def add_k(x):
        return x + k + sum(items)

    blob = dumps_function(add_k)
    assert loads_function(blob)(1) == 14


def test_closure_values():
    def make_adder(k):
        def adder(x):
            return x + k
        return adder

    assert loads_function(dumps_function(make_adder(5)))(1) == 6


def test_nested_function_and_class():
    def outer():
        def inner(x):
            return module_level_add(x, 1)
        return inner

    class Local:
        def __init__(self, v):
            self.v = v

        def twice(self):
            return 2 * self.v

    assert loads_function(dumps_function(outer()))(1) == 2
    cls = loads_function(dumps_function(Local))
    assert cls(4).twice() == 8
    out = loads(dumps((Local(3),)))[0]
    assert out.twice() == 6


def test_partial_and_callable_instance_and_method():
    p = functools.partial(module_level_add, 1, b=2)
    out = loads_function(dumps_function(p))
    assert out() == 3 and out.func is module_level_add
    assert loads_function(dumps_function(functools.partial(lambda a, b: a - b, 10)))(3) == 7
    assert loads_function(dumps_function(CallableThing(3)))(2) == 6
    assert loads_function(dumps_function(CallableThing(3).__call__))(2) == 6


def test_functions_inside_dumps():
    k = 3
    frames = dumps(((lambda x: x * k, module_level_add), {}))
    (f, g), _ = loads(frames)
    assert f(2) == 6 and g is module_level_add


def test_function_of_unimportable_module_by_value():
    mod = types.ModuleType("dpool_test_dynamic_mod")
    exec("def f(x):\n    return x + 41\n", mod.__dict__)
    assert mod.__name__ not in sys.modules
    blob = dumps_function(mod.f)
    assert b"cloudpickle" in blob
    assert loads_function(blob)(1) == 42


def test_main_function_and_instance_in_fresh_process(tmp_path):
    script = tmp_path / "producer.py"
    out_file = tmp_path / "payload.pkl"
    script.write_text(textwrap.dedent(f"""
        import pickle, sys
        sys.path.insert(0, {REPO!r})
        from dpool.serialize import dumps, dumps_function

        FACTOR = 3

        def helper():
            return 1

        def triple_plus_one(x):
            return x * FACTOR + helper()

        class Vector:
            def __init__(self, x, y):
                self.x, self.y = x, y

            def norm2(self):
                return self.x ** 2 + self.y ** 2

        frames = dumps(((Vector(3, 4),), {{}}))
        with open(sys.argv[1], "wb") as f:
            pickle.dump((dumps_function(triple_plus_one),
                         [bytes(fr) for fr in frames]), f)
    """))
    env = dict(os.environ, PYTHONPATH=REPO)
    subprocess.run([sys.executable, str(script), str(out_file)], check=True,
                   env=env, cwd=tmp_path, timeout=30)
    consumer = textwrap.dedent("""
        import pickle, sys
        from dpool.serialize import loads, loads_function
        with open(sys.argv[1], "rb") as f:
            blob, frames = pickle.load(f)
        fn = loads_function(blob)
        (v,), kw = loads(frames)
        print(fn(2), type(v).__name__, v.norm2(), kw)
    """)
    res = subprocess.run([sys.executable, "-c", consumer, str(out_file)],
                         check=True, env=env, cwd=tmp_path, timeout=30,
                         capture_output=True, text=True)
    assert res.stdout.split() == ["7", "Vector", "25", "{}"]


# --------------------------------------------------------------------------
# Unpicklable objects

def test_unpicklable_argument_names_type():
    with pytest.raises(TypeError, match="lock") as info:
        dumps(((1, threading.Lock()), {}))
    assert "_thread.lock" in str(info.value) or "lock" in str(info.value)
    with pytest.raises(TypeError, match="lock"):
        dumps(threading.Lock())


def test_unpicklable_function_names_type():
    lock = threading.Lock()

    def uses_lock():
        return lock

    with pytest.raises(TypeError, match="lock"):
        dumps_function(uses_lock)
    with pytest.raises(TypeError, match="generator"):
        dumps(((x for x in ()),))


# --------------------------------------------------------------------------
# Exceptions

def test_builtin_exception():
    exc = load_exception(dump_exception(_captured(ValueError("bad value"))))
    assert type(exc) is ValueError and exc.args == ("bad value",)
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    text = str(cause)
    assert text.startswith('\n"""\n') and text.endswith('"""')
    assert "raising_function_for_tests" in text
    assert "ValueError: bad value" in text


def test_custom_exception_and_raise_shows_remote_traceback():
    exc = load_exception(dump_exception(_captured(MyError("mine", 2))))
    assert type(exc) is MyError and exc.args == ("mine", 2)
    try:
        raise exc
    except MyError as e:
        shown = "".join(traceback.format_exception(e))
    assert "raising_function_for_tests" in shown
    assert "RemoteTraceback" in shown
    assert "direct cause" in shown


def test_exception_that_does_not_round_trip():
    original = _captured(TwoArgError("x", "y"))
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(original))  # the premise of this test
    exc = load_exception(dump_exception(original))
    assert isinstance(exc, RemoteError)
    assert "TwoArgError" in exc.type_name
    assert exc.message == "x/y"
    assert "TwoArgError" in str(exc) and "x/y" in str(exc)
    assert "raising_function_for_tests" in exc.traceback
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raising_function_for_tests" in str(exc.__cause__)


def test_exception_with_unpicklable_attribute():
    exc = ValueError("locked")
    exc.lock = threading.Lock()
    out = load_exception(dump_exception(_captured(exc)))
    assert isinstance(out, RemoteError)
    assert out.type_name == "ValueError" and out.message == "locked"


def test_exception_with_explicit_traceback():
    exc = _captured(KeyError("k"))
    out = load_exception(dump_exception(exc, exc.__traceback__))
    assert type(out) is KeyError
    assert "raising_function_for_tests" in out.__cause__.tb


def test_exception_unloadable_on_client_becomes_remote_error():
    frames = dump_exception(_captured(MyError("m")))
    frames = [frames[0], pickle.dumps(Point)
              .replace(b"test_serialize", b"no_such_module")]
    out = load_exception(frames)
    assert isinstance(out, RemoteError)
    assert out.type_name.endswith("MyError") and out.message == "m"
    assert isinstance(out.__cause__, RemoteTraceback)


def test_frames_of_exceptions_are_bytes_like():
    frames = dump_exception(_captured(MyError("m")))
    assert all(isinstance(f, (bytes, bytearray, memoryview)) for f in frames)
    frames = [bytes(f) for f in frames]
    assert type(load_exception(frames)) is MyError


# ------------------------------------- large buffers shared or in cycles, keyed exceptions


BIG = b"x" * (2 * OUT_OF_BAND_THRESHOLD)


def test_shared_list_holding_a_large_buffer_stays_shared():
    shared = [BIG]
    out = loads(dumps((shared, shared)))
    assert out == (shared, shared)
    assert out[0] is out[1]
    out = loads(dumps(((shared,), {"k": shared})))    # an (args, kwargs) pair
    assert out[0][0] is out[1]["k"]


def test_shared_list_seen_first_below_the_scan_depth_stays_shared():
    inner = [BIG]
    obj = [[inner], inner]
    out = loads(dumps(obj))
    assert out == obj and out[0][0] is out[1]


def test_recursive_list_holding_a_large_buffer_keeps_its_cycle():
    rec = [BIG]
    rec.append(rec)
    out = loads(dumps(rec))
    assert out[0] == BIG and out[1] is out


class Key:
    """Default repr: ``<... Key object at 0x...>``, different in every process."""


def test_exception_with_an_object_in_its_message_keeps_its_type():
    try:
        {}[Key()]
    except KeyError as exc:
        frames = dump_exception(exc)
    out = load_exception(frames)
    assert type(out) is KeyError and not isinstance(out, RemoteError)
    assert isinstance(out.args[0], Key)


def _module_with(tmp_name, source):
    module = types.ModuleType(tmp_name)
    exec(textwrap.dedent(source), module.__dict__)
    return module


def test_by_value_functions_of_one_module_share_one_namespace_first_value_wins(monkeypatch):
    from dpool import serialize

    module = _module_with("dpool_test_unimportable", """
        G = None
        def init(x):
            global G
            G = x
        def f(i):
            return G + i
    """)
    import cloudpickle

    monkeypatch.setattr(serialize, "_shared_globals", {})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    cloudpickle.register_pickle_by_value(module)
    try:
        init_blob = dumps_function(module.init)
        f_blob = dumps_function(module.f)             # the client's G (None) comes along
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    monkeypatch.delitem(sys.modules, module.__name__)   # (as in a worker)
    loads_function(init_blob)(10)
    f = loads_function(f_blob)
    assert f(1) == 11                                  # what init set is kept
    assert f.__globals__["__name__"] == "dpool_test_unimportable"
    loads_function(init_blob)(20)                      # set later: seen
    assert f(1) == 21


def test_a_redefined_helper_function_is_seen_but_data_a_worker_set_is_kept(monkeypatch):
    """A notebook user fixes a helper and submits again: the worker must run
    the new helper (each pickle carried it before the shared namespace);
    data the worker's own code set (an initializer's cache) stays."""
    from dpool import serialize
    import cloudpickle

    src_v1 = """
        cache = {}
        def init():
            cache["k"] = 5
        def helper(x):
            return x + 1
        def f(x):
            return helper(x) + cache["k"]
    """
    module = _module_with("dpool_test_redefined", src_v1)
    monkeypatch.setattr(serialize, "_shared_globals", {})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    cloudpickle.register_pickle_by_value(module)
    try:
        init_blob = dumps_function(module.init)
        f_blob = dumps_function(module.f)
        exec("def helper(x):\n    return x + 100\n", module.__dict__)   # redefined
        f2_blob = dumps_function(module.f)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    monkeypatch.delitem(sys.modules, module.__name__)
    loads_function(init_blob)()
    assert loads_function(f_blob)(1) == 2 + 5
    assert loads_function(f2_blob)(1) == 101 + 5      # the new helper, the worker's cache


def test_importable_functions_still_go_by_reference():
    blob = dumps_function(os.path.join)
    assert b"cloudpickle" not in blob and b"dpool-globals" not in blob
    assert loads_function(blob) is os.path.join
