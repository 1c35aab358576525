# -*- test-case-name: tests.test_headers_rules -*-
"""
L{FieldRules}: a route's header rules for one direction, made from the
configuration's L{HeaderRules} once (names and values as bytes), and
applied to a message's L{Fields}: a pure function, the same for requests
and responses.

The order is fixed, whatever the order of the keys in C{edge.ini}: remove,
then set, then add.  So C{request_headers_remove = X-*} with
C{request_headers_set = X-Env: prod} sends C{X-Env: prod} and no other
C{X-} field, and C{_add} appends to what C{_set} left.  A set field comes
after the fields kept (field order matters only within one name, RFC 9110
5.3); several values of one name keep their order.

    >>> rules = FieldRules.fromConfig(HeaderRules(
    ...     remove=("x-debug", "x-internal-*"), set=(("x-env", "prod"),)))
    >>> rules.apply(Fields([(b"X-Internal-Id", b"7"), (b"Accept", b"*/*")]))
    Fields([(b'accept', b'*/*'), (b'x-env', b'prod')])
"""

from __future__ import annotations

from edgeproxy.config.stagemodel import HeaderRules
from edgeproxy.h1.fields import LINES, Fields, noteLine
from edgeproxy.h1.syntax import linePrefix

__all__ = ["FieldRules"]

_MAX_VERDICTS = 4096


class FieldRules:
    """
    One direction's rules, ready to apply.

    @ivar removed: exact names removed (lower case).
    @ivar prefixes: names that start with one of these are removed.
    @ivar setFields: (name, values) replacing any field of that name.
    @ivar addFields: (name, value) appended.
    """

    __slots__ = (
        "_lines",
        "_replaced",
        "_verdicts",
        "_written",
        "addFields",
        "prefixes",
        "removed",
        "setFields",
    )

    def __init__(
        self,
        removed: frozenset[bytes] = frozenset(),
        prefixes: tuple[bytes, ...] = (),
        setFields: tuple[tuple[bytes, tuple[bytes, ...]], ...] = (),
        addFields: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.removed = removed
        self.prefixes = prefixes
        self.setFields = setFields
        self.addFields = addFields
        # A set name is replaced, so its old values go like removed ones.
        self._replaced = removed | {name for name, _ in setFields}
        # What _set and _add write, as field lines (for fields held as the
        # lines they were read as), noted so that no one splits them again.
        lines = []
        for name, value in [(n, v) for n, values in setFields for v in values] + list(addFields):
            line = linePrefix(name) + value
            noteLine(line, name, value)
            lines.append(line)
        self._lines = lines
        self._written = frozenset(name for name, _ in setFields) | {name for name, _ in addFields}
        self._verdicts: dict[bytes, bytes] = {}
        """Field line -> the name it goes under (C{b""}: kept): the same
        lines come again and again; bounded."""

    @classmethod
    def fromConfig(cls, rules: HeaderRules) -> FieldRules:
        """The rules of C{rules} (checked by L{edgeproxy.config.headers})."""
        setFields: dict[bytes, list[bytes]] = {}
        for name, value in rules.set:
            setFields.setdefault(name.encode("ascii"), []).append(value.encode("ascii"))
        return cls(
            removed=frozenset(
                name.encode("ascii") for name in rules.remove if not name.endswith("*")
            ),
            prefixes=tuple(
                name[:-1].encode("ascii") for name in rules.remove if name.endswith("*")
            ),
            setFields=tuple((name, tuple(values)) for name, values in setFields.items()),
            addFields=tuple(
                (name.encode("ascii"), value.encode("ascii")) for name, value in rules.add
            ),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FieldRules):
            return NotImplemented
        return (self.removed, self.prefixes, self.setFields, self.addFields) == (
            other.removed, other.prefixes, other.setFields, other.addFields,
        )

    def __hash__(self) -> int:
        return hash((self.removed, self.prefixes, self.setFields, self.addFields))

    def __repr__(self) -> str:
        return (
            f"FieldRules(removed={sorted(self.removed)!r}, prefixes={self.prefixes!r}, "
            f"setFields={self.setFields!r}, addFields={self.addFields!r})"
        )

    def apply(self, fields: Fields) -> Fields:
        """C{fields} with the rules applied (a new L{Fields})."""
        replaced = self._replaced
        prefixes = self.prefixes
        lines = fields.lines()
        if lines is not None:
            # Fields as read from the wire stay lines: the forward stage and
            # the HTTP/1.1 writer keep their fast paths.
            verdicts = self._verdicts
            kept = []
            gone = []
            for line in lines:
                verdict = verdicts.get(line)
                if verdict is None:
                    pair = LINES.get(line)
                    lower = pair[0] if pair is not None else line.partition(b":")[0].lower()
                    drop = lower in replaced or (prefixes and lower.startswith(prefixes))
                    verdict = lower if drop else b""
                    if len(verdicts) >= _MAX_VERDICTS:
                        verdicts.clear()
                    verdicts[line] = verdict
                if verdict:
                    gone.append(verdict)
                else:
                    kept.append(line)
            kept += self._lines
            return fields.withLines(kept, self._written.union(gone) if gone else self._written)
        out: dict[bytes, list[bytes]] = {}
        for name, values in fields.raw().items():
            if name in replaced or (prefixes and name.startswith(prefixes)):
                continue
            # Shared with the original, which never changes (Fields are
            # immutable); an added value makes a new list below.
            out[name] = values
        for name, setValues in self.setFields:
            out[name] = list(setValues)
        for name, value in self.addFields:
            before = out.get(name)
            out[name] = [value] if before is None else [*before, value]
        return Fields.trusted(out)
