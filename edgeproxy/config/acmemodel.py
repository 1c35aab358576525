# -*- test-case-name: tests.test_config_acme -*-
"""
The frozen value of the C{[acme]} section (automatic certificates,
L{edgeproxy.acme}); part of the model (L{edgeproxy.config.model}).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


LETS_ENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
"""The default C{[acme] directory}."""


class ACMEKeyType(enum.Enum):
    """The key of every certificate ACME orders (C{[acme] key_type})."""

    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    RSA_2048 = "rsa-2048"


class ACMEChallenge(enum.Enum):
    HTTP_01 = "http-01"
    TLS_ALPN_01 = "tls-alpn-01"


@dataclass(frozen=True, slots=True)
class ACMESettings:
    """
    The C{[acme]} section: its presence turns automatic certificates on.
    See C{docs/configuration.rst} for what each key means.
    """

    storage: str
    """Absolute path of the directory holding the account, orders and
    certificates (shared between machines when on a shared filesystem)."""
    directory: str = LETS_ENCRYPT_DIRECTORY
    """The ACME directory URL (RFC 8555 §7.1.1)."""
    email: str | None = None
    """Contact of the account (C{mailto:}), or none."""
    directory_ca: str | None = None
    """PEM bundle trusted for the directory's own TLS (on top of the
    system store); L{None}: the system store alone."""
    challenges: tuple[ACMEChallenge, ...] = (ACMEChallenge.TLS_ALPN_01, ACMEChallenge.HTTP_01)
    """Challenge types in the order tried."""
    key_type: ACMEKeyType = ACMEKeyType.ECDSA_P256
    renew_before: float = 30 * 86400.0
    """Renew a certificate this many seconds before it expires (unless the
    CA's ARI window says otherwise)."""
    eab_kid: str | None = None
    """External account binding key identifier (RFC 8555 §7.3.4)."""
    eab_hmac_key: str | None = field(default=None, repr=False)
    """The base64url HMAC key of the binding, read from C{eab_hmac_key_file}."""
    names: tuple[str, ...] | None = None
    """The names to order (one certificate per name); L{None} for C{auto}:
    every exact host of every route no certificate file covers."""
    on_demand: bool = False
    """Order a certificate for a name first seen in SNI (when C{ask} allows)."""
    ask: str | None = None
    """URL asked C{GET ?domain=NAME} before an on-demand order; 2xx allows."""
    on_demand_burst: int = 10
    """On-demand orders allowed at once before the rate limit applies."""
    on_demand_interval: float = 60.0
    """Seconds between on-demand orders once the burst is spent."""
