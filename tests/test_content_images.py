"""
The image stage in memory, with conversion processes the test runs in this
process (the real conversion, L{edgeproxy.content.convert}): every
converted body decoded and compared with the original, the fields, the
originals that go out instead (larger, bombs, too many bytes, a full pool,
no-transform, HEAD), resize parameters and signatures, the variant the
cache keys on, and the wire bytes of the HTTP/1.1 path.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from edgeproxy.config.model import Route
from edgeproxy.config.stagemodel import ImageSettings
from edgeproxy.content import images as imagesModule
from edgeproxy.content.images import Images
from edgeproxy.content.params import signTarget
from edgeproxy.content.pool import ConversionPool
from edgeproxy.metrics import Metrics
from edgeproxy.pipeline.testing import RecordingClient, RecordingNext, makeRequest, run
from edgeproxy.pipeline.values import Response
from tests.imagepool import makePool
from tests.imageutil import bombPNG, decode, meanDifference, photoJPEG, screenshotPNG
from tests.memorypool import MemoryResponse, ProxyClient
from tests.metricsutil import samplesOf

SETTINGS = ImageSettings(formats=("avif", "webp"))
CHROME = b"image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
PHOTO = photoJPEG(400, 300)


def image(body: bytes = PHOTO, contentType: bytes = b"image/jpeg", fields: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
          status: int = 200, length: int | None | str = "auto", **kwargs: Any) -> MemoryResponse:
    return MemoryResponse(
        status, [(b"content-type", contentType), *fields], body,
        length=len(body) if length == "auto" else length, **kwargs,  # type: ignore[arg-type]
    )


def asResponse(backend: MemoryResponse) -> Response:
    return Response(backend.status, backend.reason, backend.fields, backend.length, backend)


def get(accept: bytes | None = CHROME, method: bytes = b"GET", query: bytes = b"",
        path: bytes = b"/img/photo.jpg", extra: list[tuple[bytes, bytes]] = ()) -> Any:  # type: ignore[assignment]
    fields = [(b"host", b"example.com"), *extra]
    if accept is not None:
        fields.append((b"accept", accept))
    return makeRequest(method=method, path=path, query=query, fields=fields)


def through(response: MemoryResponse, request: Any = None, settings: ImageSettings = SETTINGS,
            pool: ConversionPool | None = None, metrics: Any = None) -> RecordingClient:
    if pool is None:
        pool, _ = makePool()
    stage = Images(settings, pool, metrics)
    return run(stage, request if request is not None else get(), RecordingNext(response=asResponse(response)))


@pytest.mark.parametrize("accept, fmt", [(CHROME, b"avif"), (b"image/webp,*/*", b"webp")])
def test_convertedAndDecodesToTheOriginal(accept: bytes, fmt: bytes) -> None:
    client = through(image(fields=[(b"etag", b'"p1"'), (b"last-modified", b"Mon, 01 Jan 2024 00:00:00 GMT")]),
                     get(accept))
    response = client.response
    assert response is not None and client.complete
    assert response.status == 200
    assert response.fields.get(b"content-type") == b"image/" + fmt
    assert response.length == len(client.body) < len(PHOTO)
    assert response.fields.get(b"vary") == b"Accept"
    assert response.fields.get(b"etag") == b'W/"p1"'
    assert response.fields.get(b"last-modified") == b"Mon, 01 Jan 2024 00:00:00 GMT"
    converted = decode(client.body)
    assert converted.format == fmt.decode().upper()
    assert converted.size == (400, 300)
    assert meanDifference(converted, decode(PHOTO)) < 4


def test_screenshotPNGConverted() -> None:
    source = screenshotPNG()
    client = through(image(source, b"image/png"), get(b"image/webp"))
    assert client.response.fields.get(b"content-type") == b"image/webp"  # type: ignore[union-attr]
    assert meanDifference(decode(client.body), decode(source)) < 4


def test_clientTakingNeitherGetsTheOriginalWithVary() -> None:
    pool, processes = makePool()
    client = through(image(), get(b"image/png,image/*;q=0.8,*/*;q=0.5"), pool=pool)
    response = client.response
    assert response is not None
    assert response.fields.get(b"content-type") == b"image/jpeg"
    assert response.fields.get(b"vary") == b"Accept"
    assert response.length == len(PHOTO) and client.body == PHOTO
    assert processes.started == [] and pool.reserved == 0


def test_headGetsTheOriginalHeadWithVary() -> None:
    client = through(image(b"", length=len(PHOTO)), get(method=b"HEAD"))
    response = client.response
    assert response is not None
    assert response.fields.get(b"content-type") == b"image/jpeg"
    assert response.length == len(PHOTO)
    assert response.fields.get(b"vary") == b"Accept"


@pytest.mark.parametrize(
    "response, request_",
    [
        (image(fields=[(b"cache-control", b"max-age=60, no-transform")]), None),
        (image(), get(extra=[(b"cache-control", b"no-transform")])),
        (image(status=206, fields=[(b"content-range", b"bytes 0-99/1000")]), None),
        (image(fields=[(b"content-encoding", b"gzip")]), None),
        (image(b"<svg/>", b"image/svg+xml"), None),
        (MemoryResponse(404, [(b"content-type", b"text/html")], b"nope", length=4), None),
    ],
)
def test_leftAsItIs(response: MemoryResponse, request_: Any) -> None:
    pool, processes = makePool()
    client = through(response, request_, pool=pool)
    got = client.response
    assert got is not None
    assert got.fields == response.fields
    assert got.length == response.length and client.body == response.body
    assert processes.started == []


def test_largerConversionSendsTheOriginal() -> None:
    small = photoJPEG(48, 36, quality=10)
    metrics = Metrics()
    client = through(image(small), get(b"image/avif"), settings=ImageSettings(formats=("avif",), quality=(("avif", 100), ("webp", 80))),
                     metrics=metrics)
    response = client.response
    assert response is not None
    assert response.fields.get(b"content-type") == b"image/jpeg"
    assert client.body == small and response.length == len(small)
    assert response.fields.get(b"vary") == b"Accept"
    samples = samplesOf(metrics.exposition())
    assert samples[("edgeproxy_image_conversions_total", (("format", "avif"), ("result", "larger")))] == 1


def test_bombIsNotDecodedAndTheOriginalGoesOut() -> None:
    bomb = bombPNG()
    metrics = Metrics()
    client = through(image(bomb, b"image/png"), metrics=metrics)
    assert client.body == bomb
    samples = samplesOf(metrics.exposition())
    assert samples[("edgeproxy_image_conversions_total", (("format", "avif"), ("result", "too_large")))] == 1


def test_tooManyBytesDeclaredIsNotRead() -> None:
    pool, processes = makePool()
    settings = ImageSettings(formats=("webp",), max_bytes=1000)
    source = image()
    client = through(source, settings=settings, pool=pool)
    assert client.body == PHOTO and client.response.length == len(PHOTO)  # type: ignore[union-attr]
    assert processes.started == [] and pool.reserved == 0


def test_tooManyBytesStreamedGoesOnStreaming() -> None:
    """
    A body of unknown length that passes image_max_bytes: what was read goes
    first, the rest streams on with backpressure; the reading is bounded.
    """
    pool, processes = makePool()
    settings = ImageSettings(formats=("webp",), max_bytes=10_000)
    source = image(b"", length=None, complete=False)
    client = through(source, settings=settings, pool=pool)
    assert client.response is None
    source.write(PHOTO[:6000])
    assert client.response is None, "still reading: under the bound"
    source.write(PHOTO[6000:12000])
    assert client.response is not None and client.response.length is None
    assert client.body == PHOTO[:12000]
    assert pool.reserved == 0, "the admission went back when the original was chosen"
    client.producer.pauseProducing()
    assert source.transport.producerState == "paused"
    client.producer.resumeProducing()
    source.write(PHOTO[12000:])
    source.end()
    assert client.body == PHOTO and client.complete
    assert processes.started == []


def test_fullPoolSendsTheOriginalAtOnce() -> None:
    """While the pool and its queue are full, images go out unconverted at once."""
    pool, processes = makePool(workers=1, queue=1, hold=True)
    stage = Images(SETTINGS, pool)
    clients = [run(stage, get(), RecordingNext(response=asResponse(image()))) for _ in range(3)]
    assert [c.response is not None for c in clients] == [False, False, True]
    assert clients[2].body == PHOTO
    assert clients[2].response.fields.get(b"content-type") == b"image/jpeg"  # type: ignore[union-attr]
    assert len(processes.started) == 1
    processes.started[0].release()
    processes.started[0].release()
    assert [c.response.fields.get(b"content-type") for c in clients[:2]] == [b"image/avif"] * 2  # type: ignore[union-attr]
    assert pool.reserved == 0


def test_clientGoneWhileConverting() -> None:
    pool, processes = makePool(workers=1, queue=1, hold=True)
    stage = Images(SETTINGS, pool)
    from edgeproxy.pipeline.call import Call

    client = RecordingClient()
    call = Call(get(), None, client, (stage, RecordingNext(response=asResponse(image()))), 0.0)
    call.next()
    assert pool.reserved == 1
    call.cancel()
    assert pool.reserved == 1, "the running conversion keeps its process until it ends"
    processes.started[0].release()
    assert pool.reserved == 0 and client.response is None


def test_clientGoneWhileReading() -> None:
    pool, _ = makePool()
    from edgeproxy.pipeline.call import Call

    source = image(b"", length=None, complete=False)
    client = RecordingClient()
    call = Call(get(), None, client, (Images(SETTINGS, pool), RecordingNext(response=asResponse(source))), 0.0)
    call.next()
    source.write(PHOTO[:100])
    call.cancel()
    assert source.transport.producerState == "stopped"
    assert pool.reserved == 0
    source.end(cut=True)
    assert client.response is None and client.error is None


def test_bodyCutWhileReadingIs502() -> None:
    source = image(PHOTO[:1000], length=None, complete=False)
    client = through(source)
    source.end(cut=True)
    assert client.status == 502


# Resize parameters ---------------------------------------------------------

RESIZING = ImageSettings(formats=("avif", "webp"), resize=True)


def test_resized() -> None:
    pool, processes = makePool()
    client = through(image(), get(query=b"?w=100&fit=contain"), RESIZING, pool)
    assert decode(client.body).size == (100, 75)
    assert processes.jobs[0].width == 100
    assert client.response.fields.get(b"content-type") == b"image/avif"  # type: ignore[union-attr]


def test_resizedInTheOriginalFormatForOtherClients() -> None:
    client = through(image(), get(b"*/*", query=b"?w=100"), RESIZING)
    assert client.response.fields.get(b"content-type") == b"image/jpeg"  # type: ignore[union-attr]
    assert decode(client.body).size == (100, 75)


def test_fmtForcesTheFormat() -> None:
    client = through(image(), get(b"*/*", query=b"?fmt=webp&q=50"), RESIZING)
    assert client.response.fields.get(b"content-type") == b"image/webp"  # type: ignore[union-attr]


def test_queryGoesToTheBackendAsItCame() -> None:
    nextStage = RecordingNext(response=asResponse(image()))
    run(Images(RESIZING, makePool()[0]), get(query=b"?w=100&v=2"), nextStage)
    assert nextStage.requests[0].query == b"?w=100&v=2"


def test_badParameterIs400() -> None:
    client = through(image(), get(query=b"?w=0"), RESIZING)
    assert client.status == 400


def test_parametersAreNotReadOnOtherResponses() -> None:
    """A page on the same route with its own q is not the stage's business."""
    page = MemoryResponse(200, [(b"content-type", b"text/html")], b"results", length=7)
    client = through(page, get(query=b"?q=shoes"), RESIZING)
    assert client.status == 200 and client.body == b"results"


def test_resizeIgnoredWithoutImageResize() -> None:
    pool, processes = makePool()
    client = through(image(), get(query=b"?w=100"), SETTINGS, pool)
    assert decode(client.body).size == (400, 300)
    assert processes.jobs[0].width is None


SIGNED = ImageSettings(formats=("avif", "webp"), resize=True, signing_key=b"s" * 32)


def test_unsignedParametersAre403() -> None:
    pool, processes = makePool()
    client = through(image(), get(query=b"?w=100"), SIGNED, pool)
    assert client.status == 403
    forged = through(image(), get(query=b"?w=100&sig=AAAA"), SIGNED, pool)
    assert forged.status == 403
    assert processes.started == []


def test_signedParametersAreServed() -> None:
    target = signTarget(b"s" * 32, b"/img/photo.jpg?w=100")
    path, _, query = target.partition(b"?")
    client = through(image(), get(path=path, query=b"?" + query), SIGNED)
    assert client.status == 200
    assert decode(client.body).size == (100, 75)


def test_noParametersNeedNoSignature() -> None:
    client = through(image(), get(), SIGNED)
    assert client.response.fields.get(b"content-type") == b"image/avif"  # type: ignore[union-attr]


# The variant the cache keys on ---------------------------------------------


@pytest.mark.parametrize(
    "request_, expected",
    [
        (get(CHROME), b"avif"),
        (get(b"image/webp,*/*"), b"webp"),
        (get(b"image/avif;q=0.5,image/webp"), b"webp"),
        (get(b"*/*"), b"original"),
        (get(None), b"original"),
        (get(method=b"HEAD"), b"original"),
        (get(extra=[(b"cache-control", b"no-transform")]), b"original"),
        (get(b"*/*", query=b"?fmt=webp"), b"webp"),
        (get(CHROME, query=b"?fmt=auto&w=10"), b"avif"),
        (get(CHROME, query=b"?fmt=png"), b"avif"),
    ],
)
def test_variant(request_: Any, expected: bytes) -> None:
    assert Images(RESIZING, makePool()[0]).variant(request_) == expected


@pytest.mark.parametrize("accept", [CHROME, b"image/webp", b"*/*", None])
def test_variantIsWhatTheStageDoes(accept: bytes | None) -> None:
    request = get(accept)
    stage = Images(SETTINGS, makePool()[0])
    client = run(stage, request, RecordingNext(response=asResponse(image())))
    contentType = client.response.fields.get(b"content-type")  # type: ignore[union-attr]
    variant = stage.variant(request)
    assert contentType == (b"image/jpeg" if variant == b"original" else b"image/" + variant)


def test_metricsOfAConversion() -> None:
    metrics = Metrics()
    client = through(image(), metrics=metrics)
    samples = samplesOf(metrics.exposition())
    assert samples[("edgeproxy_image_conversions_total", (("format", "avif"), ("result", "converted")))] == 1
    assert samples[("edgeproxy_image_read_bytes_total", (("format", "avif"),))] == len(PHOTO)
    assert samples[("edgeproxy_image_written_bytes_total", (("format", "avif"),))] == len(client.body)
    assert samples[("edgeproxy_image_conversion_seconds_count", (("format", "avif"),))] == 1


# The HTTP/1.1 wire -----------------------------------------------------------

ROUTES = (
    Route(name="app", hosts=("app.example",), paths=("/",), upstream="app",
          images=ImageSettings(formats=("webp",))),
)


def test_convertedImageOnTheWire(monkeypatch: pytest.MonkeyPatch) -> None:
    pool, _ = makePool()
    monkeypatch.setattr(imagesModule.KIND, "pool", pool)
    client = ProxyClient(routes=ROUTES)
    assert [type(s).__name__ for s in client.runtime.pipelines["app"].stages] == ["Images", "Forward"]
    client.send(b"GET /cat.jpg HTTP/1.1\r\nHost: app.example\r\nAccept: image/webp,*/*\r\n\r\n")
    client.sent[0].respond(image())
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: image/webp\r\n" in head
    assert b"\r\nContent-Length: %d\r\n" % len(body) in head
    assert b"\r\nVary: Accept\r\n" in head
    assert decode(body).size == (400, 300)


# The kind: one pool per process, resized by reloads ----------------------------


def test_kindSharesOnePoolAndReloadsResizeIt() -> None:
    from edgeproxy.config.model import Config, ProxySettings
    from edgeproxy.content.images import ImagesKind
    from edgeproxy.pipeline.stages import buildPipelines
    from tests.memorypool import MemoryPool

    kind = ImagesKind()
    reactor = MemoryReactorClock()
    routes = (
        Route(name="a", hosts=("a.example",), paths=("/",), upstream="app", images=ImageSettings(formats=("avif",))),
        Route(name="b", hosts=("b.example",), paths=("/",), upstream="app", images=ImageSettings(formats=("webp",))),
        Route(name="c", hosts=("c.example",), paths=("/",), upstream="app"),
    )

    def build(workers: int, queue: int | None) -> Any:
        config = Config(path="/edge.ini", proxy=ProxySettings(image_workers=workers, image_queue=queue),
                        tls=None, listeners=(), upstreams={}, routes=routes)
        return [kind.build(route, config, {"reactor": reactor}, None) for route in routes]

    a, b, c = build(3, None)
    assert c is None
    assert a.pool is b.pool is kind.pool
    assert (kind.pool.workers, kind.pool.queue) == (3, 6)
    first = kind.pool
    assert [call[0] for call in reactor.triggers["before"]["shutdown"]] == [first.stop]
    a, b, _ = build(1, 0)
    assert a.pool is first and (first.workers, first.queue) == (1, 0)
    # The pipelines of the runtime use the registered kind, in the fixed order.
    pipelines = buildPipelines(
        Config(path="/edge.ini", proxy=ProxySettings(), tls=None, listeners=(), upstreams={}, routes=routes),
        {"app": MemoryPool()},
        context={"imagePool": makePool()[0]},
    )
    assert [type(s).__name__ for s in pipelines["a"].stages] == ["Images", "Forward"]
    assert [type(s).__name__ for s in pipelines["c"].stages] == ["Forward"]
