# -*- test-case-name: tests.test_example_origin -*-
"""
A small origin server for the README's first command: it answers every
request with an HTML page saying "edgeproxy is working" and listing the
request line and headers it received, so the headers the proxy adds
(C{X-Forwarded-For}, C{X-Forwarded-Proto}, C{Forwarded}, C{Via}) can be
seen in a browser or with curl.

    python -m edgeproxy.example_origin --port 9001 --cert certs/internal/origin.pem
    python -m edgeproxy.example_origin --port 9001 --plain

It listens on 127.0.0.1 only unless told otherwise.  It is a demonstration
origin, not a part of the proxy.
"""

from __future__ import annotations

import html
import sys
from typing import Any

from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>edgeproxy is working</title></head>
<body>
<h1>edgeproxy is working</h1>
<p>This page comes from the example origin ({scheme} on port {port}), through the proxy.</p>
<h2>Request</h2>
<pre>{requestLine}</pre>
<p>Connection from {peer}</p>
<h2>Headers received by the origin</h2>
<table>
{rows}
</table>
</body>
</html>
"""


def _text(value: bytes) -> str:
    return html.escape(value.decode("utf-8", "replace"))


class ShowRequest(Resource):
    """Every path: the page listing what was received."""

    isLeaf = True

    def __init__(self, scheme: str, port: int) -> None:
        super().__init__()
        self._scheme = scheme
        self._port = port

    def render(self, request: Request) -> bytes:
        rows = "\n".join(
            f"<tr><th>{_text(name)}</th><td>{_text(value)}</td></tr>"
            for name, values in sorted(request.requestHeaders.getAllRawHeaders())
            for value in values
        )
        peer = request.getClientAddress()
        body = PAGE.format(
            scheme=self._scheme,
            port=self._port,
            requestLine=_text(b"%s %s %s" % (request.method, request.uri, request.clientproto)),
            peer=html.escape(f"{getattr(peer, 'host', peer)}"),
            rows=rows,
        ).encode("utf-8")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return body


class Options(usage.Options):
    synopsis = "--port PORT (--cert PEM | --plain)"
    optParameters = [
        ["port", "p", 9001, "TCP port to listen on.", int],
        ["interface", "i", "127.0.0.1", "Address to listen on."],
        ["cert", None, None, "PEM file with the private key and certificate (chain) to serve."],
    ]
    optFlags = [["plain", None, "Serve plain HTTP instead of HTTPS."]]

    def postOptions(self) -> None:
        if not self["plain"] and not self["cert"]:
            raise usage.UsageError("give --cert PEM, or --plain for plain HTTP")


def tlsOptions(pem: bytes) -> Any:
    """
    Server TLS options from one PEM file holding a private key, its
    certificate and the intermediates, in any order: the certificate whose
    public key matches the key is the leaf, the others are sent after it
    (the example origin's certificate is issued by an intermediate, which
    the proxy needs to build the chain to the development root).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from twisted.internet import ssl

    key = serialization.load_pem_private_key(pem, password=None)
    certificates = x509.load_pem_x509_certificates(pem)
    publicKey = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    leaves = [
        c for c in certificates
        if c.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == publicKey
    ]
    if not leaves:
        raise ValueError("no certificate in the file matches its private key")
    leaf = leaves[0]
    chain = [c for c in certificates if c is not leaf and c.subject != c.issuer]
    return ssl.CertificateOptions(
        # cryptography's objects, which pyOpenSSL's context takes as they
        # are (its own X509 and PKey are deprecated there); Twisted's
        # annotations still name pyOpenSSL's.
        privateKey=key,  # type: ignore[arg-type]
        certificate=leaf,  # type: ignore[arg-type]
        extraCertChain=chain,  # type: ignore[arg-type]
    )


def listen(reactor: Any, options: Options) -> Any:
    """Start listening as C{options} say; return the endpoint's Deferred."""
    from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint

    scheme = "http" if options["plain"] else "https"
    site = Site(ShowRequest(scheme, options["port"]))
    site.displayTracebacks = False
    if options["plain"]:
        endpoint: Any = TCP4ServerEndpoint(reactor, options["port"], interface=options["interface"])
    else:
        with open(options["cert"], "rb") as f:
            pem = f.read()
        endpoint = SSL4ServerEndpoint(
            reactor, options["port"], tlsOptions(pem), interface=options["interface"]
        )
    return endpoint.listen(site)


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.exit(f"{options}\nexample_origin: {e}")

    from twisted.internet import reactor
    from twisted.internet.task import react

    def run(reactor: Any) -> Any:
        from twisted.internet.defer import Deferred

        d = listen(reactor, options)

        def started(port: Any) -> Deferred[None]:
            host = port.getHost()
            scheme = "http" if options["plain"] else "https"
            print(f"example origin: {scheme}://{host.host}:{host.port}/", flush=True)
            return Deferred()  # serve until stopped

        return d.addCallback(started)

    del reactor
    react(run)


if __name__ == "__main__":
    main()
