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

Bottom layer: imports nothing of dpool.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Fields", "Record", "Value"]


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
