# -*- test-case-name: tests.test_content_images -*-
"""
L{Images}: the stage that converts JPEG, PNG and GIF responses to AVIF or
WebP for the clients that take them (C{images = avif, webp} on a route),
and resizes them when asked (C{image_resize}).

The format is chosen from the request alone (L{Images.variant}).  An image
response the rules of L{edgeproxy.content.rules} let it convert is admitted
to the conversion pool (L{edgeproxy.content.pool}) before anything is
read, then read whole (at most C{image_max_bytes}: past that the original
goes on streaming, the bytes read first included), converted in a
conversion process, and answered with the result, or with the original
when the conversion was not smaller, failed, took too long, or the image
had too many pixels.  While an image is read and converted the reactor
does nothing for it but collect bytes; the client's answer waits.

For the cache: a response of a type the stage converts is marked
C{chosenOn} C{Accept} (the cache keys it on the format chosen; any other
response varying on C{Accept} is keyed on the field itself), and an
original sent for a reason a retry may not repeat (the pool full, a
conversion that failed or took too long) is marked C{transient}: not
stored.

Resize parameters are read from the query only when the response turns
out to be a convertible image: a page of the same route whose own query
has a C{q} is not affected.  The query goes to the backend as it came.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from edgeproxy.config.model import Config, ProxySettings, Route
from edgeproxy.config.stagemodel import ImageSettings
from edgeproxy.content.body import ReplayBody
from edgeproxy.content.job import Job, Result
from edgeproxy.content.negotiate import chooseImageFormat
from edgeproxy.content.params import Resize, checkSignature, readResize
from edgeproxy.content.pool import ConversionPool
from edgeproxy.content.rules import hasNoTransform, imageDecision, transformedFields, withVary
from edgeproxy.errors import BadRequest, BackendUnavailable, ProxyError
from edgeproxy.pipeline.call import Call, Stage, discardResponse
from edgeproxy.pipeline.stages import registerKind
from edgeproxy.pipeline.values import BytesBody, Request, Response

__all__ = ["BadSignature", "Images", "ImagesKind"]

log = Logger()

_VARY = b"Accept"
_ORIGINAL = b"original"
_COMPLETE = (ResponseDone, PotentialDataLoss)
_TRANSIENT = frozenset(("failed", "timeout"))
"""Outcomes a retry may not repeat (a conversion process died, was slow,
was stopping): the original they send is not stored as the variant.  The
others (C{larger}, C{too_large}, C{unsupported}, C{broken}) would come out
the same: with a cache, a broken image is not converted again for every
request."""


class BadSignature(ProxyError):
    """Resize parameters without a valid signature (C{image_signing_key_file})."""

    status = 403


class Images:
    """The image stage of one route."""

    __slots__ = ("settings", "pool", "_offered", "_metrics")

    varyField = b"accept"
    """The request field the variant depends on (for the cache)."""

    def __init__(self, settings: ImageSettings, pool: ConversionPool, metrics: Any = None) -> None:
        self.settings = settings
        self.pool = pool
        self._offered = tuple(name.encode("ascii") for name in settings.formats)
        self._metrics = metrics

    def _resize(self, request: Request) -> Resize | None:
        if not self.settings.resize:
            return None
        return readResize(request.query, self._offered)

    def variant(self, request: Request) -> bytes:
        """
        The format this stage gives an image answering C{request}:
        C{b"avif"}, C{b"webp"} or C{b"original"} (which a resized image in
        its own format is too: its size is in the URL).
        """
        if request.method != b"GET" or hasNoTransform(request.fields):
            return _ORIGINAL
        resize = self._resize(request)
        if resize is not None and resize.fmt is not None and not resize.error:
            return resize.fmt
        return chooseImageFormat(request.fields.getAll(b"accept"), self._offered) or _ORIGINAL

    def handle(self, call: Call) -> None:
        request = call.request
        if request.method in (b"GET", b"HEAD"):
            call.onResponse(_Conversion(self, self.variant(request), self._resize(request)))
        call.next()


class _Conversion:
    """One image request's answer on its way back (a response handler)."""

    __slots__ = (
        "stage", "target", "resize", "call", "response", "pieces", "size", "producer",
        "replay", "pending", "started",
    )

    def __init__(self, stage: Images, target: bytes, resize: Resize | None) -> None:
        self.stage = stage
        self.target = target
        self.resize = resize
        self.call: Call | None = None
        self.response: Response | None = None
        self.pieces: list[bytes] = []
        self.size = 0
        self.producer: Any = None
        self.replay: ReplayBody | None = None
        self.pending: Any = None
        self.started = 0.0

    @property
    def _label(self) -> str:
        return self.target.decode("ascii")

    def _kept(self, result: str) -> None:
        metrics = self.stage._metrics
        if metrics is not None:
            metrics.imageKept(self._label, result)

    def onError(self, call: Call, error: ProxyError) -> None:
        call.fail(error)

    def onResponse(self, call: Call, response: Response) -> None:
        stage = self.stage
        request = call.request
        resize = self.resize
        wanted = self.target != _ORIGINAL or resize is not None
        decision = imageDecision(
            request.method, response.status, request.fields, response.fields,
            response.body is not None, wanted,
        )
        if not decision.vary:
            call.respond(response)
            return
        if decision.transform and resize is not None:
            settings = stage.settings
            if resize.error:
                discardResponse(response)
                call.fail(BadRequest(f"bad image parameters: {resize.error}"))
                return
            if settings.signing_key is not None and not checkSignature(
                settings.signing_key, request.path, request.query
            ):
                discardResponse(response)
                call.fail(BadSignature("image parameters without a valid signature"))
                return
        # An image this stage converts: what this client gets depends on
        # the format chosen for it alone.
        original = response._replace(
            fields=withVary(response.fields, _VARY), chosenOn=(*response.chosenOn, stage.varyField)
        )
        if not decision.transform:
            call.respond(original)
            return
        if response.length is not None and response.length > stage.settings.max_bytes:
            self._kept("too_large")
            call.respond(original)
            return
        if not stage.pool.reserve():
            self._kept("full")
            # The next request may find a free worker: not to be stored.
            call.respond(original._replace(transient=True))
            return
        self.call = call
        self.response = original
        call.cancelHook = self._cancelReading
        assert response.body is not None
        response.body.deliverBody(self)

    # Reading the image (the backend body's protocol) ------------------------

    def makeConnection(self, producer: Any) -> None:
        self.producer = producer

    def dataReceived(self, data: bytes) -> None:
        replay = self.replay
        if replay is not None:
            replay.dataReceived(data)
            return
        if self.call is None:
            return
        self.pieces.append(data)
        self.size += len(data)
        if self.size > self.stage.settings.max_bytes:
            self._overflow()

    def connectionLost(self, reason: Failure) -> None:
        replay = self.replay
        if replay is not None:
            replay.connectionLost(reason)
            return
        call, response = self.call, self.response
        if call is None or response is None:
            # The client went away: _cancelReading gave the admission back.
            return
        if not isinstance(reason.value, _COMPLETE):
            self.stage.pool.release()
            call.fail(BackendUnavailable(f"image body cut short: {reason.getErrorMessage()}"))
            return
        data = b"".join(self.pieces)
        self.pieces = [data]
        self._convert(call, data)

    def _overflow(self) -> None:
        """Larger than image_max_bytes: the original streams on, read bytes first."""
        call, response = self.call, self.response
        assert call is not None and response is not None
        self.stage.pool.release()
        self._kept("too_large")
        replay = self.replay = ReplayBody(self.pieces, self.producer)
        self.pieces = []
        replay.hold()
        call.respond(response._replace(body=replay))

    def _cancelReading(self) -> None:
        self.stage.pool.release()
        self.call = None
        self.pieces = []
        if self.producer is not None:
            self.producer.stopProducing()

    # Converting ----------------------------------------------------------------

    def _convert(self, call: Call, data: bytes) -> None:
        stage = self.stage
        settings = stage.settings
        resize = self.resize or Resize()
        target = "" if self.target == _ORIGINAL else self._label
        quality = resize.quality or (settings.qualityOf(target) if target else 0)
        job = Job(target, quality, settings.max_pixels, resize.width, resize.height, resize.fit)
        self.started = stage.pool.reactor.seconds()
        pending = stage.pool.convert(job, data)
        call.cancelHook = pending.cancel
        pending.addCallbacks(self._converted, lambda failure: None)

    def _converted(self, result: Result) -> None:
        call, response = self.call, self.response
        assert call is not None and response is not None
        original = self.pieces[0]
        self.pieces = []
        if result.outcome != "converted":
            transient = result.outcome in _TRANSIENT
            if transient or result.outcome == "broken":
                log.info(
                    "image not converted ({outcome}): {detail}",
                    outcome=result.outcome,
                    detail=result.detail,
                )
            self._kept(result.outcome)
            call.respond(response._replace(length=len(original), body=BytesBody(original), transient=transient))
            return
        metrics = self.stage._metrics
        if metrics is not None:
            metrics.imageConverted(
                self._label, len(original), len(result.data),
                self.stage.pool.reactor.seconds() - self.started,
            )
        fields = transformedFields(
            response.fields, _VARY, ((b"content-type", result.contentType.encode("ascii")),)
        )
        call.respond(response._replace(fields=fields, length=len(result.data), body=BytesBody(result.data)))


class ImagesKind:
    """
    Builds the C{images} stage of routes that set C{images}; owns the
    process's one L{ConversionPool} (C{[edgeproxy] image_workers}), made
    when a route first needs it and resized by reloads.
    """

    name = "images"

    def __init__(self) -> None:
        self.pool: ConversionPool | None = None

    def build(
        self, route: Route, config: Config, context: Mapping[str, Any], previous: Stage | None
    ) -> Stage | None:
        if route.images is None:
            return None
        pool = context.get("imagePool") or self.sharedPool(config.proxy, context.get("reactor"))
        return Images(route.images, pool, context.get("metrics"))

    def sharedPool(self, proxy: ProxySettings, reactor: Any) -> ConversionPool:
        workers = proxy.image_workers
        queue = proxy.image_queue if proxy.image_queue is not None else 2 * workers
        pool = self.pool
        if pool is None:
            if reactor is None:
                from twisted.internet import reactor as globalReactor

                reactor = globalReactor
            pool = self.pool = ConversionPool(reactor, workers, queue)
            reactor.addSystemEventTrigger("before", "shutdown", pool.stop)
        elif (pool.workers, pool.queue) != (workers, queue):
            pool.resize(workers, queue)
        return pool


KIND = ImagesKind()
registerKind(KIND)
