# -*- test-case-name: tests.test_config -*-
"""
The C{h2_*} keys of a C{[listen:NAME]} section: read into
L{HTTP2Settings}, each checked against the range RFC 9113 6.5.2 (or ours)
allows.
"""

from __future__ import annotations

from edgeproxy.config.model import HTTP2Settings
from edgeproxy.config.section import Section

__all__ = ["H2_KEYS", "readHTTP2"]

H2_KEYS = (
    "h2_max_concurrent_streams",
    "h2_initial_window_size",
    "h2_max_frame_size",
    "h2_max_header_list_size",
    "h2_stream_buffer",
    "h2_connection_buffer",
)


def readHTTP2(section: Section, http2: bool) -> HTTP2Settings:
    """
    The C{h2_*} keys of C{section}, a listener that speaks HTTP/2 when
    C{http2} (on any other they are an error).
    """
    given = [key for key in H2_KEYS if section.has(key)]
    if not given:
        return HTTP2Settings()
    if not http2:
        for key in given:
            section.report(key, "only used on a listener with tls = yes and http2 = yes")
        return HTTP2Settings()
    defaults = HTTP2Settings()

    def bounded(key: str, default: int, low: int, high: int, size: bool = True) -> int:
        if size:
            value = section.size(key, default, minimum=low)
        else:
            value = int(section.integer(key, default, minimum=low))
        if value > high:
            section.report(key, f"expected at most {high}, got {section.raw(key)!r}")
            return default
        return value

    # RFC 9113 6.5.2 bounds the window (2^31-1) and the frame size (2^14 to
    # 2^24-1); the others are ours.
    return HTTP2Settings(
        max_concurrent_streams=bounded(
            "h2_max_concurrent_streams", defaults.max_concurrent_streams, 1, 10_000, size=False
        ),
        initial_window_size=bounded(
            "h2_initial_window_size", defaults.initial_window_size, 1, 2**31 - 1
        ),
        max_frame_size=bounded("h2_max_frame_size", defaults.max_frame_size, 2**14, 2**24 - 1),
        max_header_list_size=bounded(
            "h2_max_header_list_size", defaults.max_header_list_size, 1024, 2**24
        ),
        stream_buffer=bounded("h2_stream_buffer", defaults.stream_buffer, 1024, 2**31 - 1),
        connection_buffer=bounded(
            "h2_connection_buffer", defaults.connection_buffer, 1024, 2**31 - 1
        ),
    )
