# -*- test-case-name: tests.test_security_oidc -*-
"""
Sealed cookies: a small JSON document encrypted and authenticated with
AES-256-GCM (C{cryptography}), so that the browser holds the OpenID
Connect session and login state without being able to read or change
them, and the proxy needs no session store (every worker, every machine
with the same C{cookie_secret_file} reads them).

The key is derived from C{cookie_secret_file} with HKDF-SHA256 (RFC 5869),
its C{info} being the purpose the caller gives (an OpenID Connect
section's L{edgeproxy.security.auth.oidc.sessionPurpose}: a cookie made
for one section does not open in another sharing the secret); the
cookie's name is the associated data, so a value made for one cookie (the
login state) is refused as another (the session).  A cookie carries its
own expiry, checked after decryption.

    value = base64url(12-byte nonce || ciphertext || 16-byte tag)
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["Sealer"]

MAX_COOKIE = 3800
"""Bytes of a cookie value at most (browsers keep 4096 per cookie, name
and attributes included)."""


class Sealer:
    """Seals and opens cookie values with one secret."""

    def __init__(self, secret: bytes, purpose: bytes = b"edgeproxy oidc cookies") -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)
        self._aead = AESGCM(key)

    def seal(self, name: bytes, document: dict[str, Any], expires: float) -> bytes:
        payload = dict(document)
        payload["exp"] = int(expires)
        plain = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
        nonce = os.urandom(12)
        sealed = base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, plain, name)).rstrip(b"=")
        if len(sealed) > MAX_COOKIE:
            raise ValueError(f"cookie of {len(sealed)} bytes is too large")
        return sealed

    def open(self, name: bytes, value: bytes | None, now: float) -> dict[str, Any] | None:
        """The document sealed in C{value}, or L{None} when it is missing,
        changed, made for another cookie, or expired."""
        if not value or len(value) > MAX_COOKIE:
            return None
        try:
            raw = base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < 12 + 16:
            return None
        try:
            plain = self._aead.decrypt(raw[:12], raw[12:], name)
            document = json.loads(plain)
        except (InvalidTag, ValueError):
            return None
        if not isinstance(document, dict) or not isinstance(document.get("exp"), int):
            return None
        if document["exp"] < now:
            return None
        return document
