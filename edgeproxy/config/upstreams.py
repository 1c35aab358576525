# -*- test-case-name: tests.test_config -*-
"""
Reading one C{[upstream:NAME]} section (L{readUpstream}): its servers,
backend TLS, timeouts, balancing, retries and passive and active health
settings, with the rules between its keys.  Part of L{edgeproxy.config.parse}.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from edgeproxy.config import security, syntax
from edgeproxy.config.model import BALANCE_POLICIES, Server, Upstream
from edgeproxy.config.section import Section

__all__ = ["HEALTH_KEYS", "UPSTREAM_KEYS", "readUpstream"]

HEALTH_KEYS = (
    "health_path",
    "health_interval",
    "health_timeout",
    "health_status",
    "health_host",
    "health_initial",
    "rise",
    "fall",
)

UPSTREAM_KEYS = (
    "servers",
    "tls",
    "ca",
    "server_name",
    "client_certificate",
    "insecure",
    "connect_timeout",
    "response_timeout",
    "idle_timeout",
    "keepalive",
    "keepalive_timeout",
    "host_header",
    "balance",
    "hash_key",
    "queue_size",
    "queue_timeout",
    "resolve_interval",
    "retries",
    "retry_budget",
    "max_fails",
    "fail_window",
    "eject_time",
    "eject_max_time",
    "fail_status",
    "slow_start",
    *HEALTH_KEYS,
    *security.UPSTREAM_KEYS,
)
"""The keys of C{[upstream:NAME]}."""


def readUpstream(section: Section, name: str) -> Upstream:
    section.require("servers", "host:port entries, at least one")
    noServers: tuple[Server, ...] = ()
    servers = section.convert("servers", noServers, syntax.parseServers)
    defaults = Upstream(name=name, servers=servers)
    tls = section.boolean("tls", defaults.tls)
    insecure = section.boolean("insecure", defaults.insecure)
    if not tls and section.ok("tls"):
        for key in ("ca", "server_name", "client_certificate", "insecure"):
            if section.has(key):
                # A backend setting that does nothing usually means the
                # operator believes this hop is encrypted when it is not.
                section.report(key, "only used with tls = yes (this upstream speaks plain HTTP)")
    balance = section.choice(
        "balance", defaults.balance, {policy: policy for policy in BALANCE_POLICIES}
    )
    hashKey = section.convert("hash_key", defaults.hash_key, syntax.checkHashKey)
    if section.has("hash_key") and balance != "hash" and section.ok("balance"):
        section.report("hash_key", "only used with balance = hash")
    if section.has("health_path"):
        health = _readHealth(section, defaults)
    else:
        for key in HEALTH_KEYS[1:]:
            if section.has(key):
                section.report(key, "only used with health_path (active health checks are off)")
        health = {}
    ca = section.optionalFile("ca")
    if insecure and ca is not None:
        section.report(
            "insecure", "insecure = yes turns verification off, which contradicts ca; remove one"
        )
    return Upstream(
        name=name,
        servers=servers,
        tls=tls,
        ca=ca,
        server_name=section.convert("server_name", defaults.server_name, _checkServerName),
        client_certificate=section.optionalFile("client_certificate"),
        insecure=insecure,
        connect_timeout=section.duration("connect_timeout", defaults.connect_timeout),
        response_timeout=section.duration("response_timeout", defaults.response_timeout),
        idle_timeout=section.duration("idle_timeout", defaults.idle_timeout),
        keepalive=section.integer("keepalive", defaults.keepalive, minimum=0),
        keepalive_timeout=section.duration("keepalive_timeout", defaults.keepalive_timeout),
        host_header=section.convert("host_header", defaults.host_header, syntax.checkHostHeader),
        balance=balance,
        hash_key=hashKey,
        queue_size=section.integer("queue_size", defaults.queue_size, minimum=0),
        queue_timeout=section.duration("queue_timeout", defaults.queue_timeout),
        resolve_interval=section.duration("resolve_interval", defaults.resolve_interval),
        retries=section.integer("retries", defaults.retries, minimum=0, maximum=10),
        retry_budget=section.convert("retry_budget", defaults.retry_budget, syntax.parsePercent),
        max_fails=section.integer("max_fails", defaults.max_fails, minimum=0),
        fail_window=section.duration("fail_window", defaults.fail_window),
        eject_time=section.duration("eject_time", defaults.eject_time),
        eject_max_time=_ejectMax(section, defaults),
        fail_status=section.convert("fail_status", defaults.fail_status, _failStatus),
        slow_start=section.duration("slow_start", defaults.slow_start, allowZero=True),
        proxy_protocol=security.readUpstreamProxyProtocol(section),
        **health,
    )


def _failStatus(text: str) -> tuple[int, ...]:
    codes: list[int] = []
    for low, high in syntax.parseStatusRanges(text):
        codes.extend(code for code in range(low, high + 1) if code not in codes)
    return tuple(codes)


def _ejectMax(section: Section, defaults: Upstream) -> float:
    # Read without reporting again: eject_time's own problem is reported once.
    first = defaults.eject_time if not section.ok("eject_time") else section.duration(
        "eject_time", defaults.eject_time
    )
    cap = section.duration("eject_max_time", max(defaults.eject_max_time, first))
    if cap < first and section.ok("eject_time", "eject_max_time"):
        section.report("eject_max_time", "must be at least eject_time")
    return max(cap, first)


def _readHealth(section: Section, defaults: Upstream) -> dict[str, Any]:
    interval = section.duration("health_interval", defaults.health_interval)
    timeout = section.duration("health_timeout", min(defaults.health_timeout, interval))
    if timeout > interval and section.ok("health_interval", "health_timeout"):
        section.report(
            "health_timeout", "must not exceed health_interval (checks of one backend would overlap)"
        )
    return {
        "health_path": section.convert("health_path", None, syntax.checkOriginPath),
        "health_interval": interval,
        "health_timeout": timeout,
        "health_status": section.convert(
            "health_status", defaults.health_status, syntax.parseStatusRanges
        ),
        "health_host": section.convert("health_host", None, syntax.checkHostHeader),
        "health_initial": section.choice(
            "health_initial", defaults.health_initial, {"unknown": "unknown", "up": "up"}
        ),
        "rise": section.integer("rise", defaults.rise, minimum=1, maximum=100),
        "fall": section.integer("fall", defaults.fall, minimum=1, maximum=100),
    }


def _checkServerName(text: str) -> str:
    try:
        return ipaddress.ip_address(text.strip("[]")).compressed
    except ValueError:
        return syntax.checkHostname(text)
