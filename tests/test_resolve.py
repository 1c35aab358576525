"""
Tests for L{edgeproxy.upstream.resolve}: resolution through an in-memory
C{IHostnameResolver}, driven by a fake clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.upstream.resolve import PeriodicResolver, isIPLiteral, resolveAddresses


@implementer(IHostResolution)
class Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class FakeResolver:
    """
    Answers from C{answers} (name -> addresses, or an exception to raise),
    at once, or when L{complete} is called if C{manual}.
    """

    def __init__(self, answers: dict[str, Any] | None = None, manual: bool = False) -> None:
        self.answers: dict[str, Any] = dict(answers or {})
        self.manual = manual
        self.asked: list[tuple[str, tuple[type, ...]]] = []
        self.pending: list[tuple[Any, str]] = []

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.asked.append((hostName, tuple(addressTypes or ())))
        answer = self.answers.get(hostName, [])
        if isinstance(answer, Exception):
            raise answer
        resolution = Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if self.manual:
            self.pending.append((resolutionReceiver, hostName))
        else:
            self._answer(resolutionReceiver, hostName)
        return resolution

    def _answer(self, receiver: Any, name: str) -> None:
        for address in self.answers.get(name, []):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, 0))
        receiver.resolutionComplete()

    def complete(self) -> None:
        pending, self.pending = self.pending, []
        for receiver, name in pending:
            self._answer(receiver, name)


def outcome(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def test_isIPLiteral() -> None:
    assert isIPLiteral("10.0.0.1")
    assert isIPLiteral("::1")
    assert isIPLiteral("2001:db8::5")
    assert not isIPLiteral("app.internal")
    assert not isIPLiteral("localhost")
    assert not isIPLiteral("[::1]")
    assert not isIPLiteral("10.0.0")


def test_asksForAAndAAAAAndKeepsEachAddressOnce() -> None:
    resolver = FakeResolver({"app.internal": ["10.0.0.1", "2001:db8::1", "10.0.0.1", "10.0.0.2"]})
    addresses = outcome(resolveAddresses(resolver, "app.internal"))
    assert addresses == ("10.0.0.1", "2001:db8::1", "10.0.0.2")
    [(name, types)] = resolver.asked
    assert name == "app.internal"
    assert set(types) == {IPv4Address, IPv6Address}


def test_noAddressIsALookupFailure() -> None:
    failure = outcome(resolveAddresses(FakeResolver(), "nowhere.internal"))
    assert isinstance(failure, Failure) and failure.check(DNSLookupError)
    assert "nowhere.internal" in failure.getErrorMessage()


def test_resolverRaisingIsALookupFailure() -> None:
    resolver = FakeResolver({"bad.internal": RuntimeError("thread pool gone")})
    failure = outcome(resolveAddresses(resolver, "bad.internal"))
    assert failure.check(DNSLookupError)
    assert "thread pool gone" in failure.getErrorMessage()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    def resolved(self, name: str, addresses: tuple[str, ...]) -> None:
        self.events.append(("resolved", name, addresses))

    def failed(self, name: str, why: str) -> None:
        self.events.append(("failed", name, why))


def periodic(resolver: FakeResolver, names: list[str], interval: float = 30.0) -> tuple[PeriodicResolver, Clock, Recorder]:
    clock = Clock()
    recorder = Recorder()
    return PeriodicResolver(clock, resolver, names, interval, recorder.resolved, recorder.failed), clock, recorder


def test_resolvesAtStartAndEveryInterval() -> None:
    resolver = FakeResolver({"a.internal": ["10.0.0.1"], "b.internal": ["10.0.0.2"]})
    loop, clock, recorder = periodic(resolver, ["a.internal", "b.internal"])
    loop.start()
    assert recorder.events == [
        ("resolved", "a.internal", ("10.0.0.1",)),
        ("resolved", "b.internal", ("10.0.0.2",)),
    ]
    resolver.answers["a.internal"] = ["10.0.0.9"]
    clock.advance(29.9)
    assert len(recorder.events) == 2
    clock.advance(0.1)
    assert recorder.events[2:] == [
        ("resolved", "a.internal", ("10.0.0.9",)),
        ("resolved", "b.internal", ("10.0.0.2",)),
    ]


def test_failureIsReported() -> None:
    resolver = FakeResolver({"a.internal": ["10.0.0.1"]})
    loop, clock, recorder = periodic(resolver, ["a.internal"])
    loop.start()
    del resolver.answers["a.internal"]
    clock.advance(30)
    assert recorder.events[-1][0:2] == ("failed", "a.internal")
    assert "no A or AAAA record" in recorder.events[-1][2]


def test_slowResolutionsDoNotPileUp() -> None:
    resolver = FakeResolver({"a.internal": ["10.0.0.1"]}, manual=True)
    loop, clock, recorder = periodic(resolver, ["a.internal"], interval=1.0)
    loop.start()
    clock.advance(1)
    clock.advance(1)
    assert len(resolver.asked) == 1  # still waiting for the first answer
    resolver.complete()
    assert recorder.events == [("resolved", "a.internal", ("10.0.0.1",))]
    clock.advance(1)
    assert len(resolver.asked) == 2


def test_stopEndsResolutionAndIgnoresLateAnswers() -> None:
    resolver = FakeResolver({"a.internal": ["10.0.0.1"]}, manual=True)
    loop, clock, recorder = periodic(resolver, ["a.internal"])
    loop.start()
    loop.stop()
    resolver.complete()
    clock.advance(300)
    assert recorder.events == []
    assert len(resolver.asked) == 1
    assert clock.getDelayedCalls() == []


def test_brokenCallbackDoesNotStopTheLoop() -> None:
    resolver = FakeResolver({"a.internal": ["10.0.0.1"]})
    calls: list[str] = []

    def resolved(name: str, addresses: tuple[str, ...]) -> None:
        calls.append(name)
        raise ValueError("bug")

    clock = Clock()
    loop = PeriodicResolver(clock, resolver, ["a.internal"], 5.0, resolved, lambda n, w: None)
    loop.start()
    clock.advance(5)
    assert calls == ["a.internal", "a.internal"]
    loop.stop()
