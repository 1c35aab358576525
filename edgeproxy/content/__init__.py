"""
Content optimisation at the edge: negotiated compression and image
conversion, as two stages of the request pipeline.

  - L{edgeproxy.content.negotiate}: the choice of content coding and image
    format from the request's fields (pure);
  - L{edgeproxy.content.rules}: which responses may be transformed, and
    their fields when they are (pure);
  - L{edgeproxy.content.encoders}: streaming zstd, brotli and gzip;
  - L{edgeproxy.content.body}: the compressing body, and a body replayed
    after a bounded read;
  - L{edgeproxy.content.compress}: the C{compress} stage;
  - L{edgeproxy.content.params}: resize parameters and their signatures;
  - L{edgeproxy.content.convert}: the conversion itself (Pillow), run in
    worker processes (L{edgeproxy.content.worker});
  - L{edgeproxy.content.pool}: the bounded pool of those processes;
  - L{edgeproxy.content.images}: the C{images} stage.

Importing this package registers both stage kinds.
"""

from edgeproxy.content import compress  # noqa: F401  (registers the "compress" kind)
from edgeproxy.content import images  # noqa: F401  (registers the "images" kind)
