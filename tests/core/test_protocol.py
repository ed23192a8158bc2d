"""The typed protocol: records, the one RUN and DONE decoders, compact wire."""
import pickle

import pytest

from dpool import protocol as P
from dpool.errors import ProtocolError


def test_every_op_has_one_record_and_round_trips():
    for op in P.Op:
        cls = P._RECORDS[int(op)][0]
        msg = cls._make(f"field{i}" for i in range(len(cls._fields)))
        assert P.op_of(msg) is op
        assert P.decode(P.encode(cls, *msg)) == msg
        assert type(P.decode(P.encode(cls, *msg))) is cls


def test_encode_checks_the_field_count():
    with pytest.raises(TypeError, match=r"Recover takes 2 fields \(token, terminate\), not 1"):
        P.encode(P.Recover, "token")


def test_the_wire_holds_plain_ints_not_enums():
    """An IntEnum pickles as a reference to its class; the wire must stay compact."""
    frame = P.encode(P.Done, [P.result(7, P.Outcome.CANCELLED), P.result(8, P.Outcome.OK, 1)])
    assert b"Outcome" not in frame and b"protocol" not in frame
    assert pickle.loads(frame) == (13, [(7, 3, None, None, None, None, 0, None),
                                        (8, 0, None, None, None, None, 1, None)])
    frame = P.encode(P.Run, [P.run_item(1, 2, 1, int(P.Call.MAP))])
    assert b"Call" not in frame and b"RunItem" not in frame
    assert pickle.loads(frame) == (3, [(1, 2, 1, 2, 1)])  # attempt 1 by default


def test_results_decodes_each_job_with_its_payload():
    msg = P.decode(P.encode(P.Done, [P.result(1, P.Outcome.OK, 2, 1.0, 2.0, "out", ""),
                                    P.result(2, P.Outcome.KILLED),
                                    P.result(3, P.Outcome.ERROR, 1)]))
    got = list(P.results(msg, [b"header", b"a", b"b", b"c"]))
    assert [(r.job_id, P.Outcome(r.outcome), list(payload)) for r, payload in got] == [
        (1, P.Outcome.OK, [b"a", b"b"]), (2, P.Outcome.KILLED, []), (3, P.Outcome.ERROR, [b"c"])]
    assert got[0][0].stdout == "out" and got[0][0].end - got[0][0].start == 1.0


def test_run_items_decodes_each_job_with_its_payload():
    msg = P.decode(P.encode(P.Run, [P.run_item(1, 5, 1, 0), P.run_item(2, 5, 2, 1)]))
    got = list(P.run_items(msg, [b"header", b"a", b"b", b"c"]))
    assert got == [(P.RunItem(1, 5, 1, P.Call.CALL, 1), [b"a"]),
                   (P.RunItem(2, 5, 2, P.Call.STARMAP, 1), [b"b", b"c"])]


@pytest.mark.parametrize("header", [(99, "what"), 5, (), ("RUN", []), (int(P.Op.RUN),),
                                    (int(P.Op.BYE), "extra")])
def test_a_bad_header_is_a_protocol_error(header):
    with pytest.raises(ProtocolError):
        P.decode(pickle.dumps(header))


def test_an_op_registers_one_record():
    with pytest.raises(ValueError, match="already has a record"):
        P.message(P.Op.RUN)(P.Bye)


# -- records.NamedTuple: typing.NamedTuple's classes, cheaper to define (issue 13) -----------

def _made(body, base):
    import typing
    ns = {"base": base, "typing": typing}
    exec(f"class Point(base):\n{body}", ns)
    return ns["Point"]


def _bases():
    import typing

    from dpool.records import NamedTuple
    return typing.NamedTuple, NamedTuple


def test_a_records_named_tuple_is_typings():
    import typing
    body = ('    """A point."""\n    x: int\n    y: typing.Optional[int] = None\n'
            '    def norm(self):\n        return abs(self.x)\n')
    for base in _bases():
        cls = _made(body, base)
        p = cls(-3)
        assert (p, repr(p), p.norm(), p._replace(y=1), p._asdict()) == (
            (-3, None), "Point(x=-3, y=None)", 3, (-3, 1), {"x": -3, "y": None})
        assert (cls._fields, cls._field_defaults, cls.__doc__, cls.__match_args__) == (
            ("x", "y"), {"y": None}, "A point.", ("x", "y"))
        assert cls.__annotations__ == {"x": int, "y": typing.Optional[int]}
        assert cls.__mro__[1:] == (tuple, object) and cls._make([1, 2]) == (1, 2)
    assert pickle.loads(pickle.dumps(P.Run([1]))) == P.Run([1])


@pytest.mark.parametrize("body", ["    x: int = 1\n    y: int\n",
                                  "    x: int\n    _fields = ()\n"])
def test_a_records_named_tuple_refuses_what_typings_refuses(body):
    errors = []
    for base in _bases():
        with pytest.raises((TypeError, AttributeError)) as info:
            _made(body, base)
        errors.append(info.type)
    assert errors[0] is errors[1]
