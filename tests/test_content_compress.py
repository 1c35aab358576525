"""
The compression stage in memory: every compressed body decoded and compared
with the original, the fields of compressed and untouched responses, the
streaming (backpressure, flushes, bounded memory) and the wire bytes of the
HTTP/1.1 path.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Iterator
from typing import Any

import brotli
import pytest
import zstandard

from edgeproxy.config.model import Route
from edgeproxy.config.stagemodel import CompressSettings
from edgeproxy.content.compress import Compress
from edgeproxy.content.encoders import makeEncoder
from edgeproxy.h1.fields import Fields
from edgeproxy.metrics import Metrics
from edgeproxy.pipeline.testing import RecordingClient, RecordingNext, makeRequest, run
from edgeproxy.pipeline.values import Response
from tests.memorypool import MemoryResponse, ProxyClient
from tests.metricsutil import samplesOf

SETTINGS = CompressSettings(encodings=("zstd", "br", "gzip"))
TEXT = b"".join(b"<p>line %d of a page that compresses well</p>\n" % i for i in range(500))


class Decoder:
    """A streaming decoder of one content coding, as a client runs it."""

    def __init__(self, encoding: bytes) -> None:
        self.encoding = encoding
        if encoding == b"zstd":
            self._zstd = zstandard.ZstdDecompressor().decompressobj()
        elif encoding == b"br":
            self._br = brotli.Decompressor()
        else:
            self._gzip = zlib.decompressobj(16 + 15)

    def feed(self, data: bytes) -> bytes:
        if self.encoding == b"zstd":
            return self._zstd.decompress(data)
        if self.encoding == b"br":
            return self._br.process(data)
        return self._gzip.decompress(data)


def decode(encoding: bytes, data: bytes) -> bytes:
    if encoding == b"zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if encoding == b"br":
        return brotli.decompress(data)
    assert encoding == b"gzip"
    return zlib.decompress(data, 16 + 15)


def html(body: bytes = TEXT, fields: list[tuple[bytes, bytes]] = (), status: int = 200,  # type: ignore[assignment]
         length: int | None | str = "auto", **kwargs: Any) -> MemoryResponse:
    return MemoryResponse(
        status,
        [(b"content-type", b"text/html; charset=utf-8"), *fields],
        body,
        length=len(body) if length == "auto" else length,  # type: ignore[arg-type]
        **kwargs,
    )


def get(acceptEncoding: bytes | None, method: bytes = b"GET", extra: list[tuple[bytes, bytes]] = ()):  # type: ignore[assignment, no-untyped-def]
    fields = [(b"host", b"example.com"), *extra]
    if acceptEncoding is not None:
        fields.append((b"accept-encoding", acceptEncoding))
    return makeRequest(method=method, fields=fields)


def asResponse(backend: MemoryResponse) -> Response:
    """The pipeline's view of a backend's response (as the forward stage makes it)."""
    return Response(backend.status, backend.reason, backend.fields, backend.length, backend)


def through(response: MemoryResponse, request: Any = None, settings: CompressSettings = SETTINGS,
            metrics: Any = None, client: RecordingClient | None = None) -> RecordingClient:
    stage = Compress(settings, metrics)
    return run(stage, request if request is not None else get(b"gzip, deflate, br, zstd"),
               RecordingNext(response=asResponse(response)), client=client)


@pytest.mark.parametrize("encoding", [b"zstd", b"br", b"gzip"])
def test_eachEncodingDecodesToTheOriginal(encoding: bytes) -> None:
    client = through(html(fields=[(b"etag", b'"v1"')]), get(encoding))
    response = client.response
    assert response is not None and client.complete
    assert response.fields.get(b"content-encoding") == encoding
    assert response.fields.get(b"vary") == b"Accept-Encoding"
    assert response.fields.get(b"etag") == b'W/"v1"'
    assert response.fields.get(b"content-type") == b"text/html; charset=utf-8"
    assert response.length is None, "the compressed length is not known before the end"
    assert decode(encoding, client.body) == TEXT
    assert len(client.body) < len(TEXT) / 5


@pytest.mark.parametrize("level", [1, 19])
def test_zstdLevels(level: int) -> None:
    settings = CompressSettings(encodings=("zstd",), levels=(("zstd", level), ("br", 4), ("gzip", 6)))
    client = through(html(), get(b"zstd"), settings)
    assert decode(b"zstd", client.body) == TEXT


def test_preferenceFollowsTheRouteOrder() -> None:
    settings = CompressSettings(encodings=("gzip", "br"))
    client = through(html(), get(b"zstd, br, gzip"), settings)
    assert client.response.fields.get(b"content-encoding") == b"gzip"  # type: ignore[union-attr]


def test_identityClientGetsTheOriginalWithVary() -> None:
    client = through(html(), get(None))
    response = client.response
    assert response is not None
    assert b"content-encoding" not in response.fields
    assert response.fields.get(b"vary") == b"Accept-Encoding"
    assert response.length == len(TEXT)
    assert client.body == TEXT


def test_existingVaryIsKept() -> None:
    client = through(html(fields=[(b"vary", b"Origin")]))
    assert list(client.response.fields.getAll(b"vary")) == [b"Origin", b"Accept-Encoding"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "response, request_, why",
    [
        (html(fields=[(b"cache-control", b"public, no-transform")]), None, "no-transform on the response"),
        (html(), get(b"br", extra=[(b"cache-control", b"no-transform")]), "no-transform on the request"),
        (html(status=206, fields=[(b"content-range", b"bytes 0-9/100")]), get(b"br", extra=[(b"range", b"bytes=0-9")]), "a range"),
        (html(fields=[(b"content-encoding", b"gzip")]), None, "encoded already"),
        (MemoryResponse(200, [(b"content-type", b"image/png")], b"\x89PNG" * 1000, length=4000), None, "type not configured"),
        (html(b"short"), None, "under compress_min_size"),
        (html(b"", status=304, length=None), None, "304"),
        (html(b"", status=204, length=None), None, "204"),
    ],
)
def test_leftAsItIs(response: MemoryResponse, request_: Any, why: str) -> None:
    client = through(response, request_)
    got = client.response
    assert got is not None, why
    assert got.fields == response.fields, why
    assert (got.status, got.length) == (response.status, response.length), why
    assert client.body == response.body, why


def test_headGetsTheHeadOfTheIdentityResponse() -> None:
    client = through(html(b"", length=len(TEXT)), get(b"br", method=b"HEAD"))
    got = client.response
    assert got is not None
    assert b"content-encoding" not in got.fields
    assert got.length == len(TEXT)
    assert got.fields.get(b"vary") == b"Accept-Encoding"


def test_unknownLengthIsCompressedWhateverItsSize() -> None:
    client = through(html(b"tiny", length=None), get(b"gzip"))
    assert client.response.fields.get(b"content-encoding") == b"gzip"  # type: ignore[union-attr]
    assert decode(b"gzip", client.body) == b"tiny"


def test_errorsPassThrough() -> None:
    from edgeproxy.errors import BackendUnavailable

    stage = Compress(SETTINGS)
    client = run(stage, get(b"br"), RecordingNext(error=BackendUnavailable("down")))
    assert client.status == 502


@pytest.mark.parametrize("encoding", [b"zstd", b"br", b"gzip"])
def test_eachPieceIsFlushed(encoding: bytes) -> None:
    """
    Server-sent events: every event the backend sent can be decoded by the
    client before the next one comes.
    """
    response = MemoryResponse(200, [(b"content-type", b"text/event-stream")], complete=False)
    client = through(response, get(encoding))
    decoder = Decoder(encoding)
    seen = 0
    for i in range(5):
        event = b"id: %d\ndata: {\"tick\": %d}\n\n" % (i, i)
        response.write(event)
        assert decoder.feed(client.body[seen:]) == event
        seen = len(client.body)
    response.end()
    assert client.complete
    decoder.feed(client.body[seen:])


def test_backpressureReachesTheBackend() -> None:
    response = html(complete=False)
    client = through(response, get(b"br"))
    assert response.transport.producerState == "producing"
    client.producer.pauseProducing()
    assert response.transport.producerState == "paused"
    client.producer.resumeProducing()
    assert response.transport.producerState == "producing"
    client.producer.stopProducing()
    assert response.transport.producerState == "stopped"


def test_cutShortBodyIsNotFinished() -> None:
    response = html(TEXT[:5000], length=None, complete=False)
    client = through(response, get(b"gzip"))
    response.end(cut=True)
    assert client.complete is False
    with pytest.raises(zlib.error):
        zlib.decompress(client.body, 16 + 15)


def _rssBytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pieces(total: int, size: int) -> Iterator[bytes]:
    """A generated text-like stream: compressible, never the same twice."""
    seed = hashlib.sha256(b"seed").digest()
    for i in range(total // size):
        seed = hashlib.sha256(seed).digest()
        word = seed.hex().encode()
        yield (b"%08d %s lorem ipsum dolor sit amet\n" % (i, word)) * (size // 100) + b"\n" * (size % 100)


class _Counting:
    """A client that decodes as it goes and keeps a digest, not the bytes."""

    def __init__(self, encoding: bytes) -> None:
        self.decoder = Decoder(encoding)
        self.digest = hashlib.sha256()
        self.received = 0
        self.ended: Any = None
        self.producer: Any = None

    def makeConnection(self, producer: Any) -> None:
        self.producer = producer

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(self.decoder.feed(data))

    def connectionLost(self, reason: Any) -> None:
        self.ended = reason


@pytest.mark.parametrize("encoding", [b"zstd", b"gzip", b"br"])
def test_largeStreamCompressesInBoundedMemory(encoding: bytes) -> None:
    """
    A 64 MiB body (the 1 GiB case, shortened) goes through with the memory
    of a piece and the compressor's window: the process grows by far less
    than the body, and the client decodes exactly what the backend sent.
    """
    total, size = 64 * 1024 * 1024, 64 * 1024
    source = MemoryResponse(200, [(b"content-type", b"application/json")], complete=False)
    stage = Compress(CompressSettings(encodings=(encoding.decode(),)))
    reader = _Counting(encoding)

    class Client(RecordingClient):
        def respond(self, call: Any, response: Response) -> None:
            self.response = response
            response.body.deliverBody(reader)  # type: ignore[union-attr]

    run(stage, get(encoding), RecordingNext(response=asResponse(source)), client=Client())
    expected = hashlib.sha256()
    before = peak = _rssBytes()
    for piece in _pieces(total, size):
        expected.update(piece)
        source.write(piece)
        peak = max(peak, _rssBytes())
    source.end()
    assert reader.ended is not None and reader.digest.digest() == expected.digest()
    assert reader.received < total / 4
    assert peak - before < 24 * 1024 * 1024, f"grew by {(peak - before) >> 20} MiB"


def test_metricsCountCompressedBytes() -> None:
    metrics = Metrics()
    client = through(html(), get(b"br"), metrics=metrics)
    samples = samplesOf(metrics.exposition())
    assert samples[("edgeproxy_compressed_responses_total", (("encoding", "br"),))] == 1
    assert samples[("edgeproxy_compression_read_bytes_total", (("encoding", "br"),))] == len(TEXT)
    assert samples[("edgeproxy_compression_written_bytes_total", (("encoding", "br"),))] == len(client.body)


def test_encoderIsAStream() -> None:
    encoder = makeEncoder(b"gzip", 6)
    out = b"".join(encoder.compress(piece) for piece in (b"a" * 100, b"b" * 100)) + encoder.finish()
    assert zlib.decompress(out, 16 + 15) == b"a" * 100 + b"b" * 100


# The HTTP/1.1 wire ---------------------------------------------------------

ROUTES = (
    Route(name="app", hosts=("app.example",), paths=("/",), upstream="app",
          compress=CompressSettings(encodings=("br", "gzip"))),
)


def test_compressedResponseOnTheWire() -> None:
    client = ProxyClient(routes=ROUTES)
    client.send(b"GET /page HTTP/1.1\r\nHost: app.example\r\nAccept-Encoding: gzip, br\r\n\r\n")
    [exchange] = client.sent
    assert exchange.fields.get(b"accept-encoding") == b"gzip, br", "the backend sees what the client sent"
    exchange.respond(html(fields=[(b"etag", b'"abc"')]))
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert b"\r\nContent-Encoding: br\r\n" in head
    assert b"\r\nVary: Accept-Encoding\r\n" in head
    assert b'\r\nETag: W/"abc"\r\n' in head
    assert b"Content-Length" not in head
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head
    # Undo the chunked framing, then the coding.
    data = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        data += rest[:n]
        body = rest[n + 2:]
    assert brotli.decompress(data) == TEXT


def test_routeWithoutCompressIsForwardAlone() -> None:
    client = ProxyClient()
    assert [type(s).__name__ for s in client.runtime.pipelines["app"].stages] == ["Forward"]
    client = ProxyClient(routes=ROUTES)
    assert [type(s).__name__ for s in client.runtime.pipelines["app"].stages] == ["Compress", "Forward"]


def test_fieldsUntouchedForAnotherType() -> None:
    client = ProxyClient(routes=ROUTES)
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\nAccept-Encoding: br\r\n\r\n")
    client.sent[0].respond(MemoryResponse(200, Fields([(b"content-type", b"video/mp4")]), b"\0" * 2000, length=2000))
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert b"Content-Length: 2000" in head and b"Vary" not in head
    assert body == b"\0" * 2000
