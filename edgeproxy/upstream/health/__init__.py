"""
Backend health: the state of every backend of an upstream, and what
changes it.

  - L{rules <edgeproxy.upstream.health.rules>}: the rules as pure
    functions (the state transition, the rise/fall verdict of active
    checks, passive ejection), returning the next state and the effects
    to apply.
  - L{state <edgeproxy.upstream.health.state>}: L{transition} (the only
    way a backend's state changes), L{PassiveHealth} (ejection by the
    failures of real traffic), L{availability} (the balancer's predicate:
    up and not ejected, or unknown while no backend of the upstream is up,
    to fail open at start), L{enable}.
  - L{checker <edgeproxy.upstream.health.checker>}: L{HealthChecker}, the
    active checks' I/O.

Health and administration are kept apart: a backend's health verdict
(C{unknown}, C{up}, C{down}) is remembered even while an administrative
state (C{draining}, C{disabled}) is what it shows, so L{enable} can put it
back where its health says.
"""

from edgeproxy.upstream.health.rules import ADMIN_STATES, HEALTH_STATES, initialState
from edgeproxy.upstream.health.state import (
    PassiveHealth,
    availability,
    enable,
    healthState,
    transition,
)
from edgeproxy.upstream.health.checker import (  # noqa: I001 (after state: it uses it)
    HealthChecker,
    checkHost,
    checkRequest,
    describeFailure,
)

__all__ = [
    "HEALTH_STATES",
    "ADMIN_STATES",
    "HealthChecker",
    "PassiveHealth",
    "availability",
    "checkHost",
    "checkRequest",
    "describeFailure",
    "enable",
    "healthState",
    "initialState",
    "transition",
]
