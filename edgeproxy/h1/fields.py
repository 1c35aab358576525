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
or L{Fields.fromLines} (no second check of what they just checked); anything
else goes through the checking constructor.

Fields read from the wire keep their field lines as they came
(L{Fields.fromLines}): a message passed on unchanged (the usual case for a
proxy) is written from those lines, and the name-to-values dictionary is
made only if something asks for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from edgeproxy.h1.errors import LocalProtocolError
from edgeproxy.h1.syntax import CONTROLS_EXCEPT_HTAB, isToken, linePrefix

__all__ = ["LINES", "Fields", "linesOf", "linesWithout", "noteLine", "splitLine"]

_EMPTY: tuple[bytes, ...] = ()
_NONE: frozenset[bytes] = frozenset()
_NOTHING: dict[bytes, list[bytes]] = {}


class Fields:
    """
    The fields of a message: lower-case name to values, in the order they
    came.
    """

    __slots__ = ("_fields", "_lines", "_noted", "_notedNames")

    _fields: dict[bytes, list[bytes]] | None
    _lines: list[bytes] | None
    _noted: dict[bytes, list[bytes]] | None
    _notedNames: frozenset[bytes]

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
        self._lines = None
        self._noted = None
        self._notedNames = _NONE

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
        made._lines = None
        made._noted = None
        made._notedNames = _NONE
        return made

    @classmethod
    def fromLines(
        cls,
        lines: list[bytes],
        noted: dict[bytes, list[bytes]] | None = None,
        notedNames: frozenset[bytes] = frozenset(),
    ) -> Fields:
        """
        Fields held as their field lines (C{Name: value}, without line end),
        each already checked (a parser's), and nobody may change C{lines}
        afterwards.  Lines the parser noted (L{noteLine}) are not split
        again when the dictionary is asked for.

        @param noted: the values of every field named in C{notedNames} that
            the lines hold (a parser reads those fields anyway): asking for
            one of those names makes no dictionary.
        """
        made = cls.__new__(cls)
        made._fields = None
        made._lines = lines
        made._noted = noted
        made._notedNames = notedNames
        return made

    def withoutLines(self, lines: list[bytes], names: frozenset[bytes]) -> Fields:
        """
        These fields held as C{lines}: their own lines less those of the
        fields named in C{names} (the caller's work: this only keeps what
        was noted of the others).
        """
        noted = self._noted
        if noted is not None and not names.isdisjoint(noted):
            noted = {name: values for name, values in noted.items() if name not in names}
        return Fields.fromLines(lines, noted, self._notedNames)

    def withLines(self, lines: list[bytes], changed: frozenset[bytes]) -> Fields:
        """
        These fields held as C{lines}: their own lines with those of the
        fields named in C{changed} removed, replaced or added to (the
        caller's work; every line checked and, for the dictionary's sake,
        noted), keeping what was noted of the others.
        """
        noted = self._noted
        notedNames = self._notedNames
        if not changed.isdisjoint(notedNames):
            notedNames = notedNames - changed
            if noted is not None:
                noted = {name: values for name, values in noted.items() if name not in changed}
        return Fields.fromLines(lines, noted, notedNames)

    def asLines(self) -> Fields:
        """
        These fields held both ways: as their dictionary, and as the field
        lines the HTTP/1.1 writer would make of it (each name in its usual
        spelling, in the dictionary's order).  For fields written many times
        over (a stored response's): each response joins the lines instead of
        building them again, and a lookup still finds the dictionary.
        """
        raw = self.raw()
        made = Fields.fromLines(linesOf(raw), raw, frozenset(raw))
        made._fields = raw
        return made

    def withLinesAfter(self, extra: list[bytes]) -> Fields:
        """
        These fields (held as lines: L{lines} is not L{None}) with the
        field lines C{extra} after them: checked lines of fields these do
        not hold.
        """
        return Fields.fromLines(self._lines + extra, self._noted, self._notedNames)  # type: ignore[operator]

    def lines(self) -> list[bytes] | None:
        """
        The field lines these fields were read as or prepared as
        (L{asLines}; shared: reading only), or L{None} when they were made
        otherwise.
        """
        return self._lines

    # Reading -------------------------------------------------------------

    def _lookup(self, name: bytes) -> dict[bytes, list[bytes]]:
        """Where to look C{name} up: the dictionary, or the noted fields."""
        fields = self._fields
        if fields is not None:
            return fields
        if name in self._notedNames:
            return self._noted or _NOTHING
        return self.raw()

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of the field C{name} (lower case), or C{default}."""
        values = self._lookup(name).get(name)
        return default if values is None else values[0]

    def getAll(self, name: bytes) -> Sequence[bytes]:
        """Every value of the field C{name} (lower case), in order."""
        return self._lookup(name).get(name, _EMPTY)

    def __contains__(self, name: object) -> bool:
        fields = self._fields
        if fields is not None:
            return name in fields
        if name in self._notedNames:
            return name in (self._noted or _NOTHING)
        # Without the dictionary: the names of the lines, looked up.
        names = LINES
        for line in self._lines:  # type: ignore[union-attr]
            known = names.get(line)
            if (known[0] if known is not None else splitLine(line)[0]) == name:
                return True
        return False

    def hasAny(self, names: frozenset[bytes]) -> bool:
        """Whether any of the fields C{names} (lower case) is here."""
        fields = self._fields
        if fields is None:
            if names <= self._notedNames:
                return not names.isdisjoint(self._noted or _NOTHING)
            fields = self.raw()
        return not names.isdisjoint(fields)

    def __iter__(self) -> Iterator[bytes]:
        """The names, in the order they first came."""
        return iter(self.raw())

    def __len__(self) -> int:
        return len(self.raw())

    def __bool__(self) -> bool:
        if self._fields is None:
            return bool(self._lines)
        return bool(self._fields)

    def pairs(self) -> Iterator[tuple[bytes, bytes]]:
        """Every C{(name, value)}, grouped by name in first-seen order."""
        for name, values in self.raw().items():
            for value in values:
                yield name, value

    def raw(self) -> dict[bytes, list[bytes]]:
        """
        The dictionary behind these fields, for code on the hot path that
        builds new fields from them.  Reading only: it is shared.
        """
        fields = self._fields
        if fields is None:
            fields = self._fields = _fromLines(self._lines)  # type: ignore[arg-type]
        return fields

    def copyRaw(self) -> dict[bytes, list[bytes]]:
        """A copy of L{raw} (its lists copied too) that the caller owns."""
        return {name: list(values) for name, values in self.raw().items()}

    # Changing (a new Fields each time) -------------------------------------

    def withField(self, name: bytes, *values: bytes) -> Fields:
        """These fields with C{name} set to C{values} (in place of any it had)."""
        lower = _checkedName(name)
        for value in values:
            _checkValue(lower, value)
        fields = dict(self.raw())
        fields.pop(lower, None)
        if values:
            fields[lower] = list(values)
        return Fields.trusted(fields)

    def withAdded(self, name: bytes, value: bytes) -> Fields:
        """These fields with one more C{name} field line, after the others."""
        lower = _checkedName(name)
        _checkValue(lower, value)
        fields = dict(self.raw())
        fields[lower] = [*fields.get(lower, _EMPTY), value]
        return Fields.trusted(fields)

    def without(self, *names: bytes) -> Fields:
        """These fields without any of C{names} (any case)."""
        drop = {name.lower() for name in names}
        raw = self.raw()
        if not drop.intersection(raw):
            return self
        return Fields.trusted({name: values for name, values in raw.items() if name not in drop})

    # Comparing -------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fields):
            return NotImplemented
        return self.raw() == other.raw()

    def __hash__(self) -> int:
        return hash(tuple((name, tuple(values)) for name, values in self.raw().items()))

    def __repr__(self) -> str:
        return f"Fields({list(self.pairs())!r})"


LINES: dict[bytes, tuple[bytes, bytes]] = {}
"""Field lines already checked by a parser, to their lower-case name and
their value (L{noteLine}); bounded, short lines only."""
_MAX_LINES = 8192
_MAX_LINE = 1024


def noteLine(line: bytes, lower: bytes, value: bytes) -> None:
    """Remember what a checked field line holds (for L{Fields.fromLines})."""
    if len(line) <= _MAX_LINE:
        if len(LINES) >= _MAX_LINES:
            LINES.clear()
        LINES[line] = (lower, value)


def linesOf(fields: dict[bytes, list[bytes]]) -> list[bytes]:
    """
    The HTTP/1.1 field lines of C{fields} (names lower-case tokens, values
    checked: no control but HTAB, no whitespace around), each name in its
    usual spelling, noted as checked (L{noteLine}).
    """
    lines = []
    for name, values in fields.items():
        prefix = linePrefix(name)
        for value in values:
            line = prefix + value
            noteLine(line, name, value)
            lines.append(line)
    return lines


def linesWithout(lines: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """C{lines} (checked field lines) less those of the fields in C{names}."""
    known = LINES
    kept = []
    for line in lines:
        pair = known.get(line)
        if (pair[0] if pair is not None else line.partition(b":")[0].lower()) not in names:
            kept.append(line)
    return kept


def splitLine(line: bytes) -> tuple[bytes, bytes]:
    """The lower-case name and the value of a checked field line."""
    name, _, value = line.partition(b":")
    return name.lower(), value.strip(b" \t")


def _fromLines(lines: list[bytes]) -> dict[bytes, list[bytes]]:
    fields: dict[bytes, list[bytes]] = {}
    known = LINES
    for line in lines:
        pair = known.get(line)
        lower, value = pair if pair is not None else splitLine(line)
        values = fields.get(lower)
        if values is None:
            fields[lower] = [value]
        else:
            values.append(value)
    return fields


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
