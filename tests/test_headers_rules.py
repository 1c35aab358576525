"""
Tests for L{edgeproxy.headers.rules}: a route's header rules as a pure
function over fields (remove, then set, then add).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.config.stagemodel import HeaderRules
from edgeproxy.h1 import Fields
from edgeproxy.headers.rules import FieldRules


def rules(**kwargs: object) -> FieldRules:
    return FieldRules.fromConfig(HeaderRules(**kwargs))  # type: ignore[arg-type]


def test_removeExactAndPrefix() -> None:
    applied = rules(remove=("x-debug", "x-internal-*")).apply(
        Fields(
            [
                (b"X-Debug", b"1"),
                (b"X-Internal-Id", b"7"),
                (b"x-internal-", b"edge"),
                (b"X-Internalx", b"kept"),
                (b"Accept", b"*/*"),
            ]
        )
    )
    assert list(applied.pairs()) == [(b"x-internalx", b"kept"), (b"accept", b"*/*")]


def test_setReplacesEveryValueAndAddAppends() -> None:
    applied = rules(
        set=(("x-env", "prod"), ("set-cookie", "a=1"), ("set-cookie", "b=2")),
        add=(("vary", "Origin"), ("x-new", "1")),
    ).apply(
        Fields(
            [(b"X-Env", b"dev"), (b"X-Env", b"test"), (b"Vary", b"Accept"), (b"Set-Cookie", b"old=1")]
        )
    )
    assert applied.getAll(b"x-env") == [b"prod"]
    assert applied.getAll(b"set-cookie") == [b"a=1", b"b=2"]
    assert applied.getAll(b"vary") == [b"Accept", b"Origin"]
    assert applied.getAll(b"x-new") == [b"1"]


def test_orderIsRemoveSetAdd() -> None:
    """Whatever the keys' order: a removed pattern does not take what
    _set sets, and _add appends to what _set left."""
    applied = rules(remove=("x-*",), set=(("x-env", "prod"),), add=(("x-env", "extra"),)).apply(
        Fields([(b"X-Env", b"dev"), (b"X-Other", b"1"), (b"Accept", b"*/*")])
    )
    assert list(applied.pairs()) == [(b"accept", b"*/*"), (b"x-env", b"prod"), (b"x-env", b"extra")]


def test_linesAndDictionaryAlike() -> None:
    """Fields held as the lines they were read as give the same result."""
    lines = [b"X-Debug: 1", b"Accept: */*", b"X-Env: dev"]
    pairs = [(b"X-Debug", b"1"), (b"Accept", b"*/*"), (b"X-Env", b"dev")]
    applied = rules(remove=("x-debug",), set=(("x-env", "prod"),))
    assert applied.apply(Fields.fromLines(lines)) == applied.apply(Fields(pairs))


def test_theOriginalIsUntouched() -> None:
    original = Fields([(b"Vary", b"Accept"), (b"X-Debug", b"1")])
    rules(remove=("x-debug",), add=(("vary", "Origin"),)).apply(original)
    assert list(original.pairs()) == [(b"vary", b"Accept"), (b"x-debug", b"1")]


def test_equalRulesCompareEqual() -> None:
    assert rules(remove=("a",)) == rules(remove=("a",))
    assert rules(remove=("a",)) != rules(remove=("b",))
    assert hash(rules(set=(("a", "1"),))) == hash(rules(set=(("a", "1"),)))


_NAMES = st.sampled_from([b"x-a", b"x-b", b"x-internal-c", b"accept", b"cookie", b"vary"])
_VALUES = st.sampled_from([b"1", b"two", b"a, b"])


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(st.tuples(_NAMES, _VALUES), max_size=8),
    removed=st.lists(st.sampled_from(["x-a", "x-internal-*", "cookie", "x-*"]), max_size=2, unique=True),
    setting=st.lists(st.tuples(st.sampled_from(["x-a", "vary", "x-new"]), st.sampled_from(["s1", "s2"])), max_size=3),
    adding=st.lists(st.tuples(st.sampled_from(["x-b", "vary", "x-new"]), st.sampled_from(["a1"])), max_size=3),
)
def test_rulesHold(
    pairs: list[tuple[bytes, bytes]],
    removed: list[str],
    setting: list[tuple[str, str]],
    adding: list[tuple[str, str]],
) -> None:
    """
    After the rules: no removed field is left but what _set and _add put
    back; a set name has exactly its set values, then the added ones; every
    other field keeps its values in order.
    """
    applied = rules(remove=tuple(removed), set=tuple(setting), add=tuple(adding)).apply(Fields(pairs))

    def gone(name: bytes) -> bool:
        text = name.decode()
        return any(text == r or (r.endswith("*") and text.startswith(r[:-1])) for r in removed)

    setNames = {name.encode() for name, _ in setting}
    for name in {name for name, _ in pairs} | setNames | {name.encode() for name, _ in adding}:
        added = [value.encode() for n, value in adding if n.encode() == name]
        if name in setNames:
            expected = [value.encode() for n, value in setting if n.encode() == name]
        elif gone(name):
            expected = []
        else:
            expected = [value for n, value in pairs if n == name]
        assert list(applied.getAll(name)) == expected + added, name


def test_fieldsReadFromTheWireStayLines() -> None:
    """
    A request's fields as the parser read them stay field lines (the
    forward stage's and the writer's fast paths), and what the parser
    noted (User-Agent, Referer...) is looked up right after the rules
    changed it.
    """
    from edgeproxy.h1 import parseRequestHead

    head = parseRequestHead(
        b"GET / HTTP/1.1\r\nHost: a.example\r\nUser-Agent: curl\r\nReferer: r\r\nX-Debug: 1\r\n"
        b"X-Internal-A: 2",
        100,
    )
    applied = rules(
        remove=("referer", "x-internal-*", "x-debug"), set=(("user-agent", "edge"),), add=(("x-new", "1"),)
    ).apply(head.fields)
    assert applied.lines() == [b"Host: a.example", b"User-Agent: edge", b"X-New: 1"]
    assert applied.get(b"user-agent") == b"edge"
    assert applied.get(b"referer") is None and b"referer" not in applied
    assert applied.get(b"host") == b"a.example"
    assert b"x-debug" not in applied and applied.get(b"x-new") == b"1"
    # Twice: the second time from what the first learnt of each line.
    again = rules(remove=("x-debug",)).apply(head.fields)
    assert again == rules(remove=("x-debug",)).apply(head.fields)
    assert again.lines() is not None and b"x-debug" not in again
