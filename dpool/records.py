"""Small record classes without :mod:`dataclasses` (issue 13).

A ``@dataclass`` costs about 3M instructions to define (it writes and
compiles its methods), and a fresh process's first pool defined 23 of them:
~15% of its start-up.  These bases give what dpool's records used of a
dataclass, with the fields named once in ``_fields`` and an ``__init__``
written out in each class:

- :class:`Fields`: the dataclass ``repr`` (``Name(a=1, b=2)``); identity
  ``==`` and hash (a dataclass with ``eq=False``);
- :class:`Record`: ``==`` by the fields' values, between records of the same
  class, and unhashable (a dataclass with ``eq=True``);
- :class:`Value`: a :class:`Record` hashable by its values (a frozen
  dataclass's hash), not changed once made (by convention: not enforced,
  which would make every ``__init__`` 3x slower).

And :class:`NamedTuple`, ``typing.NamedTuple``'s classes made for half its
cost (~55 instead of ~120 us each: the protocol's 40 messages and items).

Bottom layer: imports nothing of dpool.
"""
from __future__ import annotations

import collections
import typing
from typing import Any

__all__ = ["Fields", "NamedTuple", "Record", "Value"]


class Fields:
    """Base: ``repr`` from ``_fields``."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, name) for name in self._fields])

    def __repr__(self) -> str:
        values = ", ".join([f"{name}={getattr(self, name)!r}" for name in self._fields])
        return f"{type(self).__qualname__}({values})"


class Record(Fields):
    """Equal to a record of the same class with equal fields; unhashable."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()  # type: ignore[attr-defined]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class Value(Record):
    """A record hashable by its fields' values."""

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(self._values())


# typing.NamedTuple's (3.11) names it keeps out of a class, and refuses in one
_SPECIAL = frozenset({"__module__", "__name__", "__annotations__"})
_PROHIBITED = frozenset({"__new__", "__init__", "__slots__", "__getnewargs__", "_fields",
                         "_field_defaults", "_make", "_replace", "_asdict", "_source"})


class _NamedTupleMeta(type):
    def __new__(mcls, name: str, bases: tuple, ns: dict[str, Any]) -> Any:
        if ns.get("_base_of_named_tuples"):
            return super().__new__(mcls, name, bases, ns)
        types = ns.get("__annotations__", {})
        defaults = [field for field in types if field in ns]
        if defaults and list(types)[-len(defaults):] != defaults:
            raise TypeError(f"Non-default namedtuple field follows default field "
                            f"{defaults[0]} in {name}")
        cls = collections.namedtuple(name, types, module=ns["__module__"],
                                     defaults=[ns[field] for field in defaults])
        cls.__annotations__ = cls.__new__.__annotations__ = dict(types)
        cls.__orig_bases__ = (typing.NamedTuple,)
        for key, value in ns.items():
            if key in _PROHIBITED:
                raise AttributeError("Cannot overwrite NamedTuple attribute " + key)
            if key not in _SPECIAL and key not in cls._fields:
                setattr(cls, key, value)
        return cls


class NamedTuple(metaclass=_NamedTupleMeta):
    """``class Point(NamedTuple): x: int; y: int = 0`` makes the class
    ``typing.NamedTuple`` makes (a ``collections.namedtuple`` with the
    class's annotations, defaults, docstring and methods), without checking
    each annotation is a type (mypy does: modules import ``typing``'s
    under ``TYPE_CHECKING``, this one otherwise)."""

    _base_of_named_tuples = True
