# -*- test-case-name: tests.test_h1 -*-
"""
L{Fields}: the header (or trailer) fields of one message, as an immutable,
ordered multimap from lower-case name to values.

Names are compared case-insensitively (RFC 9110 5.1), so they are kept in
lower case; L{edgeproxy.h1.syntax.canonicalName} gives the spelling they are
written with.  Repeated fields keep their order, and several field lines of
one name stay several values (never joined: RFC 9110 5.3 only allows that for
list fields, and C{Set-Cookie} is not one).

Every change makes a new L{Fields}; the one a message carries never changes
under a stage that holds it.  The parsers build theirs with L{Fields.trusted}
(no second check of what they just checked); anything else goes through the
checking constructor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from edgeproxy.h1.errors import LocalProtocolError
from edgeproxy.h1.syntax import CONTROLS_EXCEPT_HTAB, isToken

__all__ = ["Fields"]

_EMPTY: tuple[bytes, ...] = ()


class Fields:
    """
    The fields of a message: lower-case name to values, in the order they
    came.
    """

    __slots__ = ("_fields",)

    _fields: dict[bytes, list[bytes]]

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """
        @param pairs: C{(name, value)} in order; names in any case.
        @raise LocalProtocolError: a name that is not a token, or a value
            holding a control character other than HTAB (or leading or
            trailing whitespace, which a parser would not give back).
        """
        fields: dict[bytes, list[bytes]] = {}
        for name, value in pairs:
            lower = _checkedName(name)
            _checkValue(lower, value)
            values = fields.get(lower)
            if values is None:
                fields[lower] = [value]
            else:
                values.append(value)
        self._fields = fields

    @classmethod
    def trusted(cls, fields: dict[bytes, list[bytes]]) -> Fields:
        """
        Wrap C{fields} without checking or copying it: for the parsers and
        the code that builds fields from fields it already holds.  The names
        must be lower-case tokens, the values checked, and nobody may change
        C{fields} afterwards.
        """
        made = cls.__new__(cls)
        made._fields = fields
        return made

    # Reading -------------------------------------------------------------

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of the field C{name} (lower case), or C{default}."""
        values = self._fields.get(name)
        return default if values is None else values[0]

    def getAll(self, name: bytes) -> Sequence[bytes]:
        """Every value of the field C{name} (lower case), in order."""
        return self._fields.get(name, _EMPTY)

    def __contains__(self, name: object) -> bool:
        return name in self._fields

    def __iter__(self) -> Iterator[bytes]:
        """The names, in the order they first came."""
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __bool__(self) -> bool:
        return bool(self._fields)

    def pairs(self) -> Iterator[tuple[bytes, bytes]]:
        """Every C{(name, value)}, grouped by name in first-seen order."""
        for name, values in self._fields.items():
            for value in values:
                yield name, value

    def raw(self) -> dict[bytes, list[bytes]]:
        """
        The dictionary behind these fields, for code on the hot path that
        builds new fields from them.  Reading only: it is shared.
        """
        return self._fields

    def copyRaw(self) -> dict[bytes, list[bytes]]:
        """A copy of L{raw} (its lists copied too) that the caller owns."""
        return {name: list(values) for name, values in self._fields.items()}

    # Changing (a new Fields each time) -------------------------------------

    def withField(self, name: bytes, *values: bytes) -> Fields:
        """These fields with C{name} set to C{values} (in place of any it had)."""
        lower = _checkedName(name)
        for value in values:
            _checkValue(lower, value)
        fields = dict(self._fields)
        fields.pop(lower, None)
        if values:
            fields[lower] = list(values)
        return Fields.trusted(fields)

    def withAdded(self, name: bytes, value: bytes) -> Fields:
        """These fields with one more C{name} field line, after the others."""
        lower = _checkedName(name)
        _checkValue(lower, value)
        fields = dict(self._fields)
        fields[lower] = [*fields.get(lower, _EMPTY), value]
        return Fields.trusted(fields)

    def without(self, *names: bytes) -> Fields:
        """These fields without any of C{names} (any case)."""
        drop = {name.lower() for name in names}
        if not drop.intersection(self._fields):
            return self
        return Fields.trusted(
            {name: values for name, values in self._fields.items() if name not in drop}
        )

    # Comparing -------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fields):
            return NotImplemented
        return self._fields == other._fields

    def __hash__(self) -> int:
        return hash(tuple((name, tuple(values)) for name, values in self._fields.items()))

    def __repr__(self) -> str:
        return f"Fields({list(self.pairs())!r})"


def _checkedName(name: bytes) -> bytes:
    if not isToken(name):
        raise LocalProtocolError(f"invalid field name {name[:64]!r}")
    return name.lower()


def _checkValue(name: bytes, value: bytes) -> None:
    if (
        len(value.translate(None, CONTROLS_EXCEPT_HTAB)) != len(value)
        or value[:1] in (b" ", b"\t")
        or value[-1:] in (b" ", b"\t")
    ):
        raise LocalProtocolError(f"invalid value for field {name!r}")
