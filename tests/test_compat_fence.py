"""
The fence of L{edgeproxy._compat}: outside C{edgeproxy/_compat/}, no module
of edgeproxy imports a private name of Twisted, pyOpenSSL or the OpenSSL
bindings, or of the HTTP/2 libraries (C{h2}, C{hpack}, C{hyperframe}),
reads one as an attribute of something it imported from them,
reaches into the private state of a class of theirs it subclasses, or reads
one of their private attributes off an object it was handed (a reactor, a
transport, an C{SSL.Connection}).

Checked on the source (C{ast}) and, for subclasses, on the classes
themselves: a private name is one that starts with one underscore.  The
last check knows a name as theirs when the modules of L{THEIR_MODULES}
use it and edgeproxy never defines it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "edgeproxy"
FENCED = ("twisted", "OpenSSL", "h2", "hpack", "hyperframe")
"""The top-level packages whose private names stay behind the fence."""


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _fenced(module: str) -> bool:
    return module.split(".")[0] in FENCED


@dataclass(frozen=True)
class Trespass:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


THEIR_MODULES = (
    "OpenSSL.SSL",
    "h2.connection",
    "h2.stream",
    "hpack.hpack",
    "twisted.application.app",
    "twisted.internet.abstract",
    "twisted.internet.base",
    "twisted.internet.endpoints",
    "twisted.internet.epollreactor",
    "twisted.internet.posixbase",
    "twisted.internet.protocol",
    "twisted.internet.tcp",
    "twisted.protocols.policies",
    "twisted.protocols.tls",
    "twisted.web.http",
    "twisted.web.server",
)
"""The modules whose objects edgeproxy is handed and could reach into."""


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "_compat" not in p.relative_to(ROOT).parts)


def _bound(tree: ast.AST) -> dict[str, str]:
    """Names bound by imports from the fenced packages -> what they are."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _fenced(alias.name):
                    bound[(alias.asname or alias.name).split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _fenced(node.module):
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _root(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def trespasses(source: str, path: str = "<source>") -> list[Trespass]:
    """What C{source} does with the fenced packages' private names."""
    tree = ast.parse(source)
    bound = _bound(tree)
    found: list[Trespass] = []

    def report(node: ast.AST, what: str) -> None:
        found.append(Trespass(path, getattr(node, "lineno", 0), what))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _fenced(alias.name) and any(_private(part) for part in alias.name.split(".")):
                    report(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _fenced(node.module):
            if any(_private(part) for part in node.module.split(".")):
                report(node, f"from {node.module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    report(node, f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root = _root(node.value)
            if root in bound:
                report(node, f"{ast.unparse(node)} ({root} is {bound[root]})")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
        ):
            root = _root(node.args[0])
            if root in bound:
                report(node, f"{node.func.id}({root}, {node.args[1].value!r}) ({root} is {bound[root]})")
    return found


def _thirdPartyPrivateNames(cls: type) -> set[str]:
    """The private names the fenced classes in C{cls}'s MRO define or assign."""
    names: set[str] = set()
    for base in cls.__mro__:
        if not _fenced(base.__module__):
            continue
        names.update(n for n in vars(base) if _private(n))
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(base)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                names.add(node.attr)
    return names


def subclassTrespasses(path: Path) -> list[Trespass]:
    """
    Private names of the fenced classes that a class of C{path} (whose MRO
    holds one of theirs) overrides or reads through C{self}/C{cls}.
    """
    relative = path.relative_to(ROOT.parent)
    moduleName = ".".join(relative.with_suffix("").parts)
    if moduleName.endswith(".__init__"):
        moduleName = moduleName[: -len(".__init__")]
    module = importlib.import_module(moduleName)
    found: list[Trespass] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, node.name, None)
        if not inspect.isclass(cls) or not any(_fenced(b.__module__) for b in cls.__mro__):
            continue
        theirs = _thirdPartyPrivateNames(cls)
        for inner in ast.walk(node):
            name = None
            if isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) and inner.value.id in ("self", "cls"):
                name = inner.attr
            elif isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = inner.name
            if name is not None and _private(name) and name in theirs:
                found.append(Trespass(str(relative), inner.lineno, f"{node.name} uses {name} of its base"))
    return found


def _definedNames(tree: ast.AST) -> set[str]:
    """The private names C{tree} defines: assigned attributes and names,
    functions, classes, and strings (C{__slots__}, C{getattr} defaults)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if _private(n)}


def _theirNames() -> set[str]:
    names: set[str] = set()
    for name in THEIR_MODULES:
        tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(node.name):
                names.add(node.name)
    return names


def _onlyTheirs() -> set[str]:
    ours: set[str] = set()
    for path in _modules():
        ours |= _definedNames(ast.parse(path.read_text()))
    return _theirNames() - ours


def handedTrespasses(source: str, theirs: set[str], path: str = "<source>") -> list[Trespass]:
    """Reads of C{theirs} (private names of Twisted or pyOpenSSL that
    edgeproxy never defines) off any object, or through C{getattr}."""
    found: list[Trespass] = []
    tree = ast.parse(source)
    # os._exit and the like: reached through a module that is not theirs.
    elsewhere = {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and not _fenced(getattr(node, "module", None) or node.names[0].name)
        for alias in node.names
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in theirs and _root(node.value) not in elsewhere:
            found.append(Trespass(path, node.lineno, f"{ast.unparse(node)}: a private name of theirs"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in theirs
        ):
            found.append(Trespass(path, node.lineno, f"{ast.unparse(node)}: a private name of theirs"))
    return found


@pytest.fixture(scope="module")
def onlyTheirs() -> set[str]:
    return _onlyTheirs()


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_noPrivateNamesOutsideTheFence(path: Path, onlyTheirs: set[str]) -> None:
    name = str(path.relative_to(ROOT.parent))
    source = path.read_text()
    found = trespasses(source, name) + subclassTrespasses(path) + handedTrespasses(source, onlyTheirs, name)
    assert not found, "\n".join(map(str, found))


BENCHMARKS = sorted((ROOT.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_benchmarksStayOutsideTheFenceToo(path: Path, onlyTheirs: set[str]) -> None:
    """The benchmarks drive edgeproxy as it runs: through public names only."""
    name = str(path.relative_to(ROOT.parent))
    source = path.read_text()
    found = trespasses(source, name) + handedTrespasses(source, onlyTheirs, name)
    assert not found, "\n".join(map(str, found))


def test_handedObjectsAreSeen(onlyTheirs: set[str]) -> None:
    """Private state read off a reactor, a transport or a connection is seen."""
    source = (
        "def f(reactor, transport, connection):\n"
        "    reactor._poller.poll\n"
        "    transport._tempDataBuffer\n"
        "    connection._ssl\n"
        "    getattr(reactor, '_exitSignal', None)\n"
        "    transport.write\n"
    )
    assert len(handedTrespasses(source, onlyTheirs)) == 4


@pytest.mark.parametrize(
    "source,expected",
    [
        ("from twisted.web._newclient import ResponseDone", ["from twisted.web._newclient import ..."]),
        ("from OpenSSL._util import lib as _lib", ["from OpenSSL._util import ..."]),
        ("import twisted.internet._sslverify", ["import twisted.internet._sslverify"]),
        ("from twisted.protocols.tls import _PullToPush", ["from twisted.protocols.tls import _PullToPush"]),
        ("from OpenSSL import SSL\nSSL.Connection._reverse_mapping.pop(1)", ["SSL.Connection._reverse_mapping"]),
        (
            "from twisted.protocols.tls import TLSMemoryBIOProtocol\nTLSMemoryBIOProtocol._write(p, b'')",
            ["TLSMemoryBIOProtocol._write"],
        ),
        ("from twisted.internet import tcp\ngetattr(tcp.Server, '_realPortNumber')", ["getattr(tcp, '_realPortNumber')"]),
        # Our own private names, and third-party objects reached otherwise,
        # are not this test's business.
        ("from edgeproxy.tls import store\nstore._ServerConnection", []),
        ("import os\nos._exit(1)", []),
        ("def f(transport):\n    return transport.write", []),
    ],
)
def test_whatTheFenceSees(source: str, expected: list[str]) -> None:
    """The checker itself: each kind of trespass is seen, and nothing else."""
    found = [t.what for t in trespasses(source)]
    assert len(found) == len(expected), found
    for what, prefix in zip(found, expected):
        assert what.startswith(prefix), (what, prefix)


def test_subclassReachingIntoItsBaseIsSeen(tmp_path: Path) -> None:
    """A subclass of a Twisted class that reads its base's private state is seen."""
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    class Sneaky(TLSMemoryBIOProtocol):
        def lost(self) -> bool:
            return bool(self._lostTLSConnection)

        def _write(self, data: bytes) -> None:
            pass

    theirs = _thirdPartyPrivateNames(Sneaky)
    assert {"_lostTLSConnection", "_write"} <= theirs
    assert "_heldHello" not in theirs
