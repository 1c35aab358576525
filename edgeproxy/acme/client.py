# -*- test-case-name: tests.test_acme_client -*-
"""
The ACME protocol (RFC 8555), through the C{acme} library and C{josepy}:
the account (created once, with an external account binding when
configured, then reused from storage), one order per name, its
authorization answered by the first configured challenge the CA offers,
the finalization, and the certificate's ARI window (RFC 9773).

Everything here I{blocks} (the library uses C{requests}): the manager
(L{edgeproxy.acme.manager}) only ever calls it in a thread, and what must
happen on the reactor (presenting a challenge to the listeners) is a
callback it passes in, which it runs on the reactor and waits for.

L{ACMEFailure} carries what an operator needs to act: the CA's problem
document (type, detail, the subproblems' details) and the C{Retry-After}
of a refused request (RFC 8555 §6.6: rate limits).
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import json
import os
import time
from collections.abc import Callable
from typing import Any

import josepy as jose
import requests
from acme import client as acmeClient
from acme import crypto_util, errors, messages
from acme import challenges as acmeChallenges
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import edgeproxy
from edgeproxy.acme.policy import RenewalWindow
from edgeproxy.acme.storage import Storage
from edgeproxy.config.acmemodel import ACMEKeyType, ACMESettings

__all__ = ["ACMEClient", "ACMEFailure", "Presenter", "ariCertID", "newKey", "parseRetryAfter"]

ORDER_TIMEOUT = 90.0
"""Seconds an order may take from its creation to its certificate."""

NETWORK_TIMEOUT = 30
"""Seconds of one request to the CA."""

Presenter = Callable[[str, str, str, str], None]
"""C{present(kind, name, token, keyAuthorization)}: make a challenge
answerable (C{kind} is C{"http-01"} or C{"tls-alpn-01"}) and return when it
is, on every listener (in every worker).  The manager withdraws them once
the order is over."""


class ACMEFailure(Exception):
    """
    An order (or the account) failed.

    @ivar problem: the CA's problem document type (RFC 8555 §6.7), if any.
    @ivar retryAfter: seconds the CA asked us to wait, if it said.
    """

    def __init__(self, message: str, problem: str | None = None, retryAfter: float | None = None) -> None:
        super().__init__(message)
        self.problem = problem
        self.retryAfter = retryAfter


def parseRetryAfter(value: str | None, now: float) -> float | None:
    """Seconds from C{now} a C{Retry-After} value (RFC 9110 §10.2.3) asks for."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now)


def newKey(keyType: ACMEKeyType) -> bytes:
    """A new private key of C{keyType}, PEM (PKCS#8)."""
    key: Any
    if keyType is ACMEKeyType.RSA_2048:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif keyType is ACMEKeyType.ECDSA_P384:
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@acmeChallenges.ChallengeResponse.register
class TLSALPN01Response(acmeChallenges.KeyAuthorizationChallengeResponse):
    """RFC 8737 §3: the (empty) response to a TLS-ALPN-01 challenge.  The
    C{acme} library dropped its own class; this registers the type with the
    library's decoder, nothing more."""

    typ = "tls-alpn-01"


@acmeChallenges.Challenge.register
class TLSALPN01(acmeChallenges.KeyAuthorizationChallenge):
    """RFC 8737 §3: a TLS-ALPN-01 challenge (the validation certificate is
    made by L{edgeproxy.acme.challenges.tlsALPN01Certificate})."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: jose.JWK, **kwargs: Any) -> str:
        return self.key_authorization(account_key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ariCertID(certificate: x509.Certificate) -> str:
    """
    RFC 9773 §4.1: the certificate's identifier in the renewalInfo URL,
    base64url(authority key identifier) "." base64url(serial, DER content
    octets).

    @raise ValueError: the certificate has no authority key identifier.
    """
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise ValueError("the certificate has no authority key identifier") from None
    if aki.key_identifier is None:
        raise ValueError("the certificate's authority key identifier has no key identifier")
    serial = certificate.serial_number
    # DER INTEGER content: big-endian two's complement, a leading zero
    # byte when the top bit is set.
    serialBytes = serial.to_bytes((serial.bit_length() + 8) // 8 or 1, "big")
    return _b64(aki.key_identifier) + "." + _b64(serialBytes)


def _problemText(error: messages.Error) -> str:
    parts = [f"{error.typ}: {error.detail or ''}".strip()]
    for sub in error.subproblems or ():
        identifier = getattr(getattr(sub, "identifier", None), "value", None)
        parts.append(f"{identifier or ''} {sub.typ}: {sub.detail or ''}".strip())
    return "; ".join(parts)


class _Network(acmeClient.ClientNetwork):
    """The library's network, remembering the C{Retry-After} of the last
    refused request (the library raises the problem document without
    it)."""

    lastRetryAfter: str | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        if response.status_code >= 400:
            self.lastRetryAfter = response.headers.get("Retry-After")
        return response


def _accountJWK(keyPEM: bytes) -> tuple[jose.JWK, jose.JWASignature]:
    key = serialization.load_pem_private_key(keyPEM, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return jose.JWKEC(key=key), jose.ES256
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key), jose.RS256
    raise ACMEFailure("the stored account key is neither ECDSA nor RSA")


class ACMEClient:
    """
    One ACME account at one directory.  Blocking: call from a thread.
    """

    def __init__(self, settings: ACMESettings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self._client: acmeClient.ClientV2 | None = None
        self._net: _Network | None = None

    def _verify(self) -> str | bool:
        ca = self.settings.directory_ca
        if ca is None:
            return True
        # requests trusts one bundle: the system's (certifi's) plus ours.
        import certifi

        bundle = os.path.join(self.storage.root, "directory-ca.pem")
        with open(certifi.where(), "rb") as f:
            system = f.read()
        with open(ca, "rb") as f:
            extra = f.read()
        from edgeproxy.acme.storage import writeAtomically

        writeAtomically(bundle, system + b"\n" + extra)
        return bundle

    def _failure(self, error: BaseException, doing: str) -> ACMEFailure:
        retryAfter = None
        if self._net is not None:
            retryAfter = parseRetryAfter(self._net.lastRetryAfter, time.time())
            self._net.lastRetryAfter = None
        if isinstance(error, ACMEFailure):
            return error
        if isinstance(error, errors.ValidationError):
            details = []
            for authzr in error.failed_authzrs:
                for challb in authzr.body.challenges:
                    if challb.error is not None:
                        details.append(f"{authzr.body.identifier.value} {challb.chall.typ}: {_problemText(challb.error)}")
            return ACMEFailure(f"{doing}: validation failed: " + ("; ".join(details) or str(error)),
                               "urn:ietf:params:acme:error:unauthorized", retryAfter)
        if isinstance(error, messages.Error):
            return ACMEFailure(f"{doing}: the CA refused: {_problemText(error)}", error.typ, retryAfter)
        if isinstance(error, errors.TimeoutError):
            return ACMEFailure(f"{doing}: the CA did not finish the order within {ORDER_TIMEOUT:.0f}s", None, retryAfter)
        if isinstance(error, requests.RequestException):
            return ACMEFailure(f"{doing}: cannot reach the CA at {self.settings.directory}: {error}", None, retryAfter)
        return ACMEFailure(f"{doing}: {type(error).__name__}: {error}", None, retryAfter)

    def connect(self) -> acmeClient.ClientV2:
        """The directory and the account: the stored one, else a new one."""
        if self._client is not None:
            return self._client
        try:
            return self._connect()
        except Exception as e:
            raise self._failure(e, "account") from e

    def _connect(self) -> acmeClient.ClientV2:
        keyPEM, registration = self.storage.loadAccount()
        if keyPEM is None:
            keyPEM = newKey(ACMEKeyType.ECDSA_P256)
            self.storage.saveAccountKey(keyPEM)
            registration = None
        jwk, alg = _accountJWK(keyPEM)
        net = _Network(
            jwk, alg=alg, verify_ssl=self._verify(),  # type: ignore[arg-type]
            user_agent=f"edgeproxy/{edgeproxy.__version__}", timeout=NETWORK_TIMEOUT,
        )
        self._net = net
        directory = acmeClient.ClientV2.get_directory(self.settings.directory, net)
        client = acmeClient.ClientV2(directory, net)
        uri = (registration or {}).get("uri")
        if uri and (registration or {}).get("directory") == self.settings.directory:
            net.account = messages.RegistrationResource(body=messages.Registration(), uri=uri)
        else:
            contact = (f"mailto:{self.settings.email}",) if self.settings.email else ()
            eab = None
            if self.settings.eab_kid and self.settings.eab_hmac_key:
                eab = messages.ExternalAccountBinding.from_data(
                    account_public_key=jwk.public_key(),
                    kid=self.settings.eab_kid,
                    hmac_key=self.settings.eab_hmac_key,
                    directory=directory,
                )
            elif client.external_account_required():
                raise ACMEFailure(
                    "account: the CA requires an external account binding (set eab_kid and eab_hmac_key_file)",
                    "urn:ietf:params:acme:error:externalAccountRequired",
                )
            body = messages.NewRegistration.from_data(
                email=None, terms_of_service_agreed=True, external_account_binding=eab
            )
            if contact:
                body = body.update(contact=contact)
            try:
                regr = client.new_account(body)
                uri = regr.uri
            except errors.ConflictError as conflict:
                # RFC 8555 §7.3.1: the key has an account already.
                uri = conflict.location
                net.account = messages.RegistrationResource(body=messages.Registration(), uri=uri)
            self.storage.saveAccount({"uri": uri, "directory": self.settings.directory,
                                      "contact": list(contact)})
        self._client = client
        return client

    def order(self, name: str, keyPEM: bytes, present: Presenter) -> bytes:
        """
        Order a certificate for C{name} with the key C{keyPEM}.

        @return: the certificate chain (PEM, leaf first).
        @raise ACMEFailure: the order failed (problem document, Retry-After).
        """
        client = self.connect()
        try:
            return self._order(client, name, keyPEM, present)
        except Exception as e:
            raise self._failure(e, f"order for {name}") from e

    def _order(self, client: acmeClient.ClientV2, name: str, keyPEM: bytes, present: Presenter) -> bytes:
        assert self._net is not None and self._net.key is not None
        csr = crypto_util.make_csr(keyPEM, [name])
        orderr = client.new_order(csr)
        wanted = [c.value for c in self.settings.challenges]
        for authzr in orderr.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue
            offered = {
                challb.chall.typ: challb
                for challb in authzr.body.challenges
                if isinstance(challb.chall.typ, str)
            }
            chosen = next((kind for kind in wanted if kind in offered), None)
            if chosen is None:
                raise ACMEFailure(
                    f"the CA offers {', '.join(sorted(offered)) or 'no challenge'} for "
                    f"{authzr.body.identifier.value}, none of challenges = {', '.join(wanted)}"
                )
            challb = offered[chosen]
            keyAuthorization = challb.chall.key_authorization(self._net.key)
            present(chosen, authzr.body.identifier.value, challb.chall.encode("token"), keyAuthorization)
            client.answer_challenge(challb, challb.chall.response(self._net.key))
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
        finished = client.poll_and_finalize(orderr, deadline)
        if not finished.fullchain_pem:
            raise ACMEFailure("the CA finished the order without a certificate")
        return finished.fullchain_pem.encode("ascii")

    def renewalWindow(self, certificate: x509.Certificate) -> tuple[RenewalWindow | None, float | None]:
        """
        The CA's suggested renewal window for C{certificate} (RFC 9773),
        and the seconds it asked us to wait before asking again.

        @return: C{(None, None)} when the CA offers no renewalInfo.
        @raise ACMEFailure: the CA offers it and the request failed.
        """
        client = self.connect()
        try:
            base = client.directory["renewalInfo"]
        except KeyError:
            return None, None
        url = str(base).rstrip("/") + "/" + ariCertID(certificate)
        try:
            response = self._net.get(url, content_type="application/json")  # type: ignore[union-attr]
            document = json.loads(response.content)
            window = document["suggestedWindow"]
            start = _rfc3339(window["start"])
            end = _rfc3339(window["end"])
        except Exception as e:
            raise self._failure(e, "renewal information") from e
        return RenewalWindow(start, end), parseRetryAfter(response.headers.get("Retry-After"), time.time())


def _rfc3339(text: str) -> float:
    value = text.strip().replace("Z", "+00:00")
    # Python before 3.11 cannot read fractions of other lengths than 3 or 6.
    if "." in value:
        head, _, rest = value.partition(".")
        digits = "".join(ch for ch in rest if ch.isdigit())
        zone = rest[len(digits):]
        value = f"{head}.{(digits + '000000')[:6]}{zone}"
    when = datetime.datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()
