"""
Tests for L{edgeproxy.config.parse} and L{edgeproxy.config.syntax}: what an
operator's C{edge.ini} turns into, and the errors (file, line, section, key,
what was expected) a broken one gives.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import _parse as twistedParse
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from edgeproxy.config import load
from edgeproxy.config.acmemodel import ACMEChallenge, ACMEKeyType, ACMESettings
from edgeproxy.config.model import (
    AccessLogFormat,
    Config,
    HTTP2Settings,
    Limits,
    Listener,
    ProxySettings,
    Route,
    Server,
    TLSSettings,
    TLSVersion,
    Upstream,
    availableCPUs,
)
from edgeproxy.config.stagemodel import (
    ErrorPage,
    ErrorPages,
    CompressSettings,
    CacheSettings,
    HeaderRules,
    ImageSettings,
    RouteCache,
    RouteForwarding,
    RouteRedirect,
)
import configparser

from edgeproxy.config.ini import readINI
from edgeproxy.config.parse import SECTION_KEYS
from edgeproxy.config.syntax import _tokenizeEndpoint, checkEndpoint, parseServers
from edgeproxy.errors import ConfigError

REPOSITORY = Path(__file__).resolve().parent.parent

BASE = """\
[listen:web]
endpoint = tcp:8080

[upstream:app]
servers = 127.0.0.1:9001

[route:app]
hosts = example.com
upstream = app
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory with the files configurations in these tests name."""
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "site.pem").write_text("not parsed here\n")
    (tmp_path / "ca.pem").write_text("not parsed here\n")
    (tmp_path / "client.pem").write_text("not parsed here\n")
    (tmp_path / "logs").mkdir()
    (tmp_path / "admin.token").write_text("0123456789abcdef0123456789abcdef\n")
    (tmp_path / "eab.key").write_text("c2VjcmV0LWhtYWMta2V5\n")
    (tmp_path / "image.key").write_text("0123456789abcdef0123456789abcdef\n")
    (tmp_path / "errors" / "api").mkdir(parents=True)
    (tmp_path / "errors" / "5xx.html").write_text("<h1>down</h1>\n")
    (tmp_path / "errors" / "api" / "404.json").write_text('{"error": "not found"}\n')
    return tmp_path


def write(directory: Path, text: str, name: str = "edge.ini") -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def lineOf(text: str, marker: str) -> int:
    """The 1-based line of the only line containing C{marker}."""
    found = [n for n, line in enumerate(text.splitlines(), 1) if marker in line]
    if len(found) > 1:
        found = [n for n, line in enumerate(text.splitlines(), 1) if line.strip() == marker]
    assert len(found) == 1, f"{marker!r} is on lines {found}"
    return found[0]


def loadError(path: str) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        load(path)
    return raised.value


# Every error case: the text added to BASE, then the section, key, a text
# marking the line the error must point at, and what the message must say.
ERRORS = [
    # Sections
    ("[upstreams:x]\nservers = a:1", "upstreams:x", None, "[upstreams:x]", "unknown section"),
    ("[DEFAULT]\ntls = yes", "DEFAULT", None, "[DEFAULT]", "unknown section"),
    ("[Edgeproxy]\nvia = x", "Edgeproxy", None, "[Edgeproxy]", "unknown section"),
    ("[listen]\nendpoint = tcp:1", "listen", None, "[listen]", "unknown section"),
    ("[listen:bad name]\nendpoint = tcp:1", "listen:bad name", None, "[listen:bad name]", "NAME of letters"),
    ("[route:]\nhosts = a", "route:", None, "[route:]", "NAME of letters"),
    # Unknown keys
    ("[edgeproxy]\nacces_log = -", "edgeproxy", "acces_log", "acces_log", "did you mean 'access_log'"),
    ("[upstream:b]\nservers = b:1\nconect_timeout = 1s", "upstream:b", "conect_timeout", "conect_timeout", "did you mean 'connect_timeout'"),
    ("[listen:x]\nEndpoint = tcp:1", "listen:x", "Endpoint", "Endpoint", "unknown key"),
    ("[route:r]\nhosts = r.example\nupstream = app\nverbs = GET", "route:r", "verbs", "verbs", "unknown key"),
    ("[tls]\ncertificates = certs\nciphers = ALL", "tls", "ciphers", "ciphers", "unknown key"),
    # [edgeproxy] types
    ("[edgeproxy]\naccess_log_format = xml", "edgeproxy", "access_log_format", "xml", "expected one of combined, combined_plain, json"),
    ("[edgeproxy]\naccess_log = nodir/access.log", "edgeproxy", "access_log", "nodir", "does not exist"),
    ("[edgeproxy]\naccess_log = logs", "edgeproxy", "access_log", "= logs", "is a directory"),
    ("[edgeproxy]\naccess_log =", "edgeproxy", "access_log", "access_log", "expected a value"),
    ("[edgeproxy]\ntrusted_proxies = 10.0.0.1/8", "edgeproxy", "trusted_proxies", "10.0.0.1/8", "did you mean 10.0.0.0/8"),
    ("[edgeproxy]\ntrusted_proxies = 10.0.0.0/8, lb.internal", "edgeproxy", "trusted_proxies", "lb.internal", "expected IP addresses or CIDR"),
    ("[edgeproxy]\nclient_header_timeout = 10 seconds", "edgeproxy", "client_header_timeout", "10 seconds", "expected a duration"),
    ("[edgeproxy]\nclient_idle_timeout = 0", "edgeproxy", "client_idle_timeout", "client_idle", "greater than zero"),
    ("[edgeproxy]\nshutdown_timeout = -1s", "edgeproxy", "shutdown_timeout", "-1s", "cannot be negative"),
    ("[edgeproxy]\nmax_body_size = 10MB", "edgeproxy", "max_body_size", "10MB", "ambiguous"),
    ("[edgeproxy]\nmax_header_size = 0", "edgeproxy", "max_header_size", "max_header_size", "at least 1 bytes"),
    ("[edgeproxy]\nmax_headers = 0", "edgeproxy", "max_headers", "max_headers", "at least 1"),
    ("[edgeproxy]\nmax_headers = lots", "edgeproxy", "max_headers", "lots", "expected a whole number"),
    ("[edgeproxy]\nvia = my proxy", "edgeproxy", "via", "my proxy", "HTTP token"),
    ("[edgeproxy]\nadmin = tcp:abc", "edgeproxy", "admin", "tcp:abc", "port"),
    ("[edgeproxy]\nadmin_token = 0123456789abcdef0", "edgeproxy", "admin_token", "admin_token", "only used with admin"),
    ("[edgeproxy]\nadmin = tcp:9901\nadmin_token = short", "edgeproxy", "admin_token", "short", "at least 16 characters"),
    ("[edgeproxy]\nadmin = tcp:9901\nadmin_token_file = missing.token", "edgeproxy", "admin_token_file", "missing.token", "does not exist"),
    ("[edgeproxy]\nadmin = tcp:9901\nadmin_token = 0123456789abcdef0\nadmin_token_file = x", "edgeproxy", "admin_token_file", "admin_token_file", "not both"),
    ("[edgeproxy]\nworkers = 0", "edgeproxy", "workers", "workers", "from 1 to 256, or auto"),
    ("[edgeproxy]\nworkers = many", "edgeproxy", "workers", "many", "from 1 to 256, or auto"),
    ("[edgeproxy]\nlatency_buckets = 1s, 500ms", "edgeproxy", "latency_buckets", "1s, 500ms", "increasing order"),
    ("[edgeproxy]\nlatency_buckets = 0, 1s", "edgeproxy", "latency_buckets", "0, 1s", "greater than zero"),
    ("[edgeproxy]\nlatency_buckets = fast", "edgeproxy", "latency_buckets", "fast", "expected a duration"),
    ("[edgeproxy]\nlog_level = verbose", "edgeproxy", "log_level", "verbose", "expected one of debug, info, warn, error"),
    ("[edgeproxy]\nlog_format = syslog", "edgeproxy", "log_format", "syslog", "expected one of auto, text, journald"),
    ("[edgeproxy]\nfast_paths = on", "edgeproxy", "fast_paths", "on", "expected one of auto, off"),
    # [tls]
    ("[tls]\ndefault = certs/site.pem", "tls", "certificates", "[tls]", "missing required key 'certificates'"),
    ("[tls]\ncertificates = certs nothere.pem", "tls", "certificates", "nothere", "does not exist"),
    ("[tls]\ncertificates = certs\ndefault = certs", "tls", "default", "default", "not a regular file"),
    ("[tls]\ncertificates = certs\nmin_version = 1.1", "tls", "min_version", "1.1", "expected one of 1.2, 1.3"),
    ("[tls]\ncertificates = certs\nexpiry_warning = soon", "tls", "expiry_warning", "soon", "expected a duration"),
    ("[tls]\ncertificates = certs\nsession_ticket_rotation = 0s", "tls", "session_ticket_rotation", "0s", "greater than zero"),
    # [listen:NAME]
    ("[listen:x]\ntls = no", "listen:x", "endpoint", "[listen:x]", "missing required key 'endpoint'"),
    ("[listen:x]\nendpoint = ssl:443", "listen:x", "endpoint", "ssl:443", "edgeproxy terminates TLS itself"),
    ("[listen:x]\nendpoint = tls:443", "listen:x", "endpoint", "tls:443", "edgeproxy terminates TLS itself"),
    ("[listen:x]\nendpoint = udp:53", "listen:x", "endpoint", "udp:53", "unknown endpoint type 'udp'"),
    ("[listen:x]\nendpoint = tcp:http", "listen:x", "endpoint", "tcp:http", "port number"),
    ("[listen:x]\nendpoint = tcp:70000", "listen:x", "endpoint", "tcp:70000", "between 0 and 65535"),
    ("[listen:x]\nendpoint = tcp6", "listen:x", "endpoint", "tcp6", "needs a port"),
    ("[listen:x]\nendpoint = tcp:443:interface=localhost", "listen:x", "endpoint", "localhost", "an IP address"),
    ("[listen:x]\nendpoint = tcp:443:interface=::1", "listen:x", "endpoint", "::1", "escape the colons"),
    ("[listen:x]\nendpoint = tcp6:443:interface=127.0.0.1", "listen:x", "endpoint", "tcp6", "IPv6"),
    ("[listen:x]\nendpoint = tcp:443:bogus=1", "listen:x", "endpoint", "bogus", "unknown parameter 'bogus'"),
    ("[listen:x]\nendpoint = tcp:443:backlog=0", "listen:x", "endpoint", "backlog", "backlog of 1 or more"),
    ("[listen:x]\nendpoint = tcp:443:interface=127.0.0.1:interface=127.0.0.2", "listen:x", "endpoint", "127.0.0.2", "given twice"),
    ("[listen:x]\nendpoint = systemd:domain=INET6", "listen:x", "endpoint", "systemd", "exactly one of index=N or name=NAME"),
    ("[listen:x]\nendpoint = systemd:domain=IPX:name=https", "listen:x", "endpoint", "IPX", "INET|INET6|UNIX"),
    ("[listen:x]\nendpoint = unix:nodir/edge.sock", "listen:x", "endpoint", "nodir", "does not exist"),
    ("[listen:x]\nendpoint = unix:/tmp/x.sock:mode=999", "listen:x", "endpoint", "mode=999", "octal mode"),
    ("[listen:x]\nendpoint = tcp:8081\ntls = maybe", "listen:x", "tls", "maybe", "expected yes or no"),
    ("[listen:x]\nendpoint = tcp:8081\nhttp2 = yes", "listen:x", "http2", "http2", "over TLS (ALPN) only"),
    ("[listen:x]\nendpoint = tcp:8081\nredirect_port = 443", "listen:x", "redirect_port", "redirect_port", "only used with redirect_https"),
    ("[listen:x]\nendpoint = tcp:8081\nredirect_https = yes\nredirect_port = 0", "listen:x", "redirect_port", "redirect_port", "at least 1"),
    ("[listen:x]\nendpoint = tcp:8081\nredirect_https = yes", "listen:x", "redirect_https", "redirect_https", "needs a listener with tls = yes"),
    ("[listen:x]\nendpoint = tcp:8443\ntls = yes", "listen:x", "tls", "tls = yes", "needs a [tls] section"),
    ("[listen:x]\nendpoint = tcp:8080:backlog=10", "listen:x", "endpoint", "backlog=10", "[listen:web] already listens on tcp:8080"),
    ("[listen:x]\nendpoint = tcp:8081\nmax_body_size = 1 MiB please", "listen:x", "max_body_size", "please", "expected a size"),
    ("[listen:x]\nendpoint = tcp:8081\nclient_header_timeout = 0ms", "listen:x", "client_header_timeout", "0ms", "greater than zero"),
    ("[listen:x]\nendpoint = tcp:8081\nh2_max_frame_size = 32KiB", "listen:x", "h2_max_frame_size", "h2_max_frame_size", "tls = yes and http2 = yes"),
    ("[tls]\ncertificates = certs\n[listen:x]\nendpoint = tcp:8443\ntls = yes\nh2_max_frame_size = 1000", "listen:x", "h2_max_frame_size", "1000", "at least 16384"),
    ("[tls]\ncertificates = certs\n[listen:x]\nendpoint = tcp:8443\ntls = yes\nh2_max_frame_size = 16MiB", "listen:x", "h2_max_frame_size", "16MiB", "at most 16777215"),
    ("[tls]\ncertificates = certs\n[listen:x]\nendpoint = tcp:8443\ntls = yes\nh2_initial_window_size = 2GiB", "listen:x", "h2_initial_window_size", "2GiB", "at most 2147483647"),
    ("[tls]\ncertificates = certs\n[listen:x]\nendpoint = tcp:8443\ntls = yes\nh2_max_concurrent_streams = 0", "listen:x", "h2_max_concurrent_streams", "= 0", "at least 1"),
    ("[tls]\ncertificates = certs\n[listen:x]\nendpoint = tcp:8443\ntls = yes\nhttp2 = no\nh2_stream_buffer = 1MiB", "listen:x", "h2_stream_buffer", "h2_stream_buffer", "http2 = yes"),
    # [upstream:NAME]
    ("[upstream:b]\ntls = no", "upstream:b", "servers", "[upstream:b]", "missing required key 'servers'"),
    ("[upstream:b]\nservers =", "upstream:b", "servers", "servers =", "expected a value"),
    ("[upstream:b]\nservers = a:1,, b:2", "upstream:b", "servers", "a:1,,", "an empty entry"),
    ("[upstream:b]\nservers = ::1:9001", "upstream:b", "servers", "::1:9001", "in brackets"),
    ("[upstream:b]\nservers = backend.internal", "upstream:b", "servers", "backend.internal", "the port is required"),
    ("[upstream:b]\nservers = backend.internal:0", "upstream:b", "servers", "internal:0", "between 1 and 65535"),
    ("[upstream:b]\nservers = a:1 weight=0", "upstream:b", "servers", "weight=0", "weight of 1 or more"),
    ("[upstream:b]\nservers = a:1 b:2", "upstream:b", "servers", "a:1 b:2", "separate servers with commas"),
    ("[upstream:b]\nservers = a:1, A:1", "upstream:b", "servers", "A:1", "listed twice"),
    ("[upstream:b]\nservers = [127.0.0.1]:80", "upstream:b", "servers", "[127.0.0.1]", "IPv6 address inside"),
    ("[upstream:b]\nservers = bad!host:80", "upstream:b", "servers", "bad!host", "expected a host name"),
    ("[upstream:b]\nservers = 300.1.1.1:80", "upstream:b", "servers", "300.1.1.1", "host name or IP address"),
    ("[upstream:b]\nservers = b:1\nca = ca.pem", "upstream:b", "ca", "ca.pem", "only used with tls = yes"),
    ("[upstream:b]\nservers = b:1\ninsecure = yes", "upstream:b", "insecure", "insecure", "only used with tls = yes"),
    ("[upstream:b]\nservers = b:1\ntls = yes\nca = ca.pem\ninsecure = yes", "upstream:b", "insecure", "insecure", "contradicts ca"),
    ("[upstream:b]\nservers = b:1\ntls = yes\nca = missing-ca.pem", "upstream:b", "ca", "missing-ca", "does not exist"),
    ("[upstream:b]\nservers = b:1\ntls = yes\nclient_certificate = certs", "upstream:b", "client_certificate", "client_certificate", "not a regular file"),
    ("[upstream:b]\nservers = b:1\ntls = yes\nserver_name = *.internal", "upstream:b", "server_name", "*.internal", "expected a host name"),
    ("[upstream:b]\nservers = b:1\nkeepalive = -1", "upstream:b", "keepalive", "-1", "whole number of 0 or more"),
    ("[upstream:b]\nservers = b:1\nkeepalive_timeout = 0", "upstream:b", "keepalive_timeout", "keepalive_timeout", "greater than zero"),
    ("[upstream:b]\nservers = b:1\nresponse_timeout = forever", "upstream:b", "response_timeout", "forever", "expected a duration"),
    ("[upstream:b]\nservers = b:1\nidle_timeout = 0s", "upstream:b", "idle_timeout", "idle_timeout", "greater than zero"),
    ("[upstream:b]\nservers = b:1\nconnect_timeout = 5 s x", "upstream:b", "connect_timeout", "5 s x", "expected a duration"),
    ("[upstream:b]\nservers = b:1\nhost_header = a b", "upstream:b", "host_header", "a b", "expected a host name"),
    ("[upstream:b]\nservers = b:1\nbalance = random", "upstream:b", "balance", "random", "expected one of round_robin, least_conn, p2c, hash"),
    ("[upstream:b]\nservers = b:1\nhash_key = path", "upstream:b", "hash_key", "hash_key", "only used with balance = hash"),
    ("[upstream:b]\nservers = b:1\nbalance = least_conn\nhash_key = client_ip", "upstream:b", "hash_key", "client_ip", "only used with balance = hash"),
    ("[upstream:b]\nservers = b:1\nbalance = hash\nhash_key = query", "upstream:b", "hash_key", "query", "expected client_ip, path, header:NAME or cookie:NAME"),
    ("[upstream:b]\nservers = b:1\nbalance = hash\nhash_key = header:", "upstream:b", "hash_key", "header:", "a header name"),
    ("[upstream:b]\nservers = b:1\nbalance = hash\nhash_key = cookie:a b", "upstream:b", "hash_key", "cookie:a b", "a cookie name"),
    ("[upstream:b]\nservers = a:1 backup backup", "upstream:b", "servers", "backup backup", "given twice"),
    ("[upstream:b]\nservers = a:1 drain", "upstream:b", "servers", "drain", "'weight=N', 'max_conns=N', 'backup' or 'down'"),
    ("[upstream:b]\nservers = a:1 max_conns=0", "upstream:b", "servers", "max_conns=0", "max_conns of 1 or more"),
    ("[upstream:b]\nservers = a:1 weight=2 weight=3", "upstream:b", "servers", "weight=3", "'weight' is given twice"),
    ("[upstream:b]\nservers = b:1\nretries = 11", "upstream:b", "retries", "11", "at least 0 and at most 10"),
    ("[upstream:b]\nservers = b:1\nretry_budget = 0.2", "upstream:b", "retry_budget", "0.2", "a percentage from 0% to 100%"),
    ("[upstream:b]\nservers = b:1\nretry_budget = 120%", "upstream:b", "retry_budget", "120%", "a percentage"),
    ("[upstream:b]\nservers = b:1\nqueue_timeout = 0", "upstream:b", "queue_timeout", "queue_timeout", "greater than zero"),
    ("[upstream:b]\nservers = b:1\nfail_status = 5xx", "upstream:b", "fail_status", "5xx", "status codes (100-599)"),
    ("[upstream:b]\nservers = b:1\neject_time = 1m\neject_max_time = 30s", "upstream:b", "eject_max_time", "30s", "at least eject_time"),
    ("[upstream:b]\nservers = b:1\nrise = 3", "upstream:b", "rise", "rise", "only used with health_path"),
    ("[upstream:b]\nservers = b:1\nhealth_path = healthz", "upstream:b", "health_path", "healthz", "starting with '/'"),
    ("[upstream:b]\nservers = b:1\nhealth_path = /h\nhealth_status = 399-200", "upstream:b", "health_status", "399-200", "ends before it starts"),
    ("[upstream:b]\nservers = b:1\nhealth_path = /h\nhealth_interval = 1s\nhealth_timeout = 2s", "upstream:b", "health_timeout", "2s", "must not exceed health_interval"),
    ("[upstream:b]\nservers = b:1\nhealth_path = /h\nhealth_initial = down", "upstream:b", "health_initial", "down", "expected one of unknown, up"),
    ("[upstream:b]\nservers = b:1\nhealth_path = /h\nfall = 0", "upstream:b", "fall", "fall", "at least 1 and at most 100"),
    # [route:NAME]
    ("[route:r]\nupstream = app", "route:r", "hosts", "[route:r]", "missing required key 'hosts'"),
    ("[route:r]\nhosts = r.example", "route:r", "upstream", "[route:r]", "missing required key 'upstream'"),
    ("[route:r]\nhosts = r.example\nupstream = nope", "route:r", "upstream", "nope", "no [upstream:nope] section (upstreams: app)"),
    ("[route:r]\nhosts = *.*.example.com\nupstream = app", "route:r", "hosts", "*.*.", "wildcard only as the whole leftmost label"),
    ("[route:r]\nhosts = foo*.example.com\nupstream = app", "route:r", "hosts", "foo*", "wildcard only"),
    ("[route:r]\nhosts = r.example:443\nupstream = app", "route:r", "hosts", "r.example:443", "without a port"),
    ("[route:r]\nhosts = r.example, R.example.\nupstream = app", "route:r", "hosts", "R.example.", "'r.example' is listed twice"),
    ("[route:r]\nhosts = r.example\npaths = api\nupstream = app", "route:r", "paths", "= api", "starting with '/'"),
    ("[route:r]\nhosts = r.example\npaths = /a/../b\nupstream = app", "route:r", "paths", "/a/../b", "'..' segments"),
    ("[route:r]\nhosts = r.example\npaths = /a?x=1\nupstream = app", "route:r", "paths", "/a?x", "without query"),
    ("[route:r]\nhosts = r.example\npaths = /%7euser/\nupstream = app", "route:r", "paths", "%7e", "write '/%7euser/' as '/~user/'"),
    ("[route:r]\nhosts = r.example\npaths = /a%2Fb\nupstream = app", "route:r", "paths", "%2F", "a path a request could have"),
    ("[route:r]\nhosts = r.example\npaths = /caf\u00e9\nupstream = app", "route:r", "paths", "paths = /caf", "percent-encode"),
    ("[route:r]\nhosts = r.example\nupstream = app\nmax_body_size = big", "route:r", "max_body_size", "big", "expected a size"),
    ("[route:r]\nhosts = r.example\nupstream = app\nwebsocket = perhaps", "route:r", "websocket", "perhaps", "expected yes or no"),
    ("[route:r]\nhosts = r.example\nupstream = app\nstrip_prefix = 2", "route:r", "strip_prefix", "strip_prefix", "expected yes or no"),
    ("[route:r]\nhosts = www.example, EXAMPLE.com\nupstream = app", "route:r", "hosts", "EXAMPLE.com", "also routed by [route:app] (line 8)"),
]


@pytest.mark.parametrize(
    "extra, section, key, marker, message", ERRORS, ids=[case[-1][:40] for case in ERRORS]
)
def test_errors(
    site: Path, extra: str, section: str, key: str | None, marker: str, message: str
) -> None:
    """
    Every error names the file, the section, the key and the line, and says
    what was expected.
    """
    text = BASE + "\n" + extra + "\n"
    path = write(site, text)
    reported = loadError(path)
    found = [e for e in getattr(reported, "errors", (reported,)) if message in e.message]
    assert found, str(reported)
    error = found[0]
    assert error.file == path
    assert error.section == section
    assert error.key == key
    assert error.line == lineOf(text, marker)
    assert message in error.message
    where = f"{path}:{error.line}: [{section}]" + (f" {key}" if key else "")
    assert str(error).startswith(where + ": ")


def test_errorFormat(site: Path) -> None:
    """C{str(error)} is what an operator sees: file:line: [section] key: message."""
    text = BASE + "\n[upstream:b]\nservers = b:1\nkeepalive = lots\n"
    path = write(site, text)
    assert str(loadError(path)) == (
        f"{path}:13: [upstream:b] keepalive: expected a whole number of 0 or more, got 'lots'"
    )


def test_noListener(site: Path) -> None:
    path = write(site, "[upstream:app]\nservers = a:1\n")
    error = loadError(path)
    assert error.file == path
    assert "at least one listener" in error.message


def test_emptyFile(site: Path) -> None:
    assert "at least one listener" in loadError(write(site, "")).message


@pytest.mark.parametrize(
    "text, section, key, line, message",
    [
        (BASE + "\n[listen:web]\nendpoint = tcp:1\n", "listen:web", None, 11, "duplicate section"),
        ("[listen:web]\nendpoint = tcp:1\ntls = no\ntls = yes\n", "listen:web", "tls", 4, "duplicate key"),
        ("endpoint = tcp:1\n[listen:web]\n", None, None, 1, "expected a [section] header"),
        (BASE + "this line has no equals sign\n", None, None, 10, "expected 'key = value'"),
    ],
)
def test_syntaxErrors(
    site: Path, text: str, section: str | None, key: str | None, line: int, message: str
) -> None:
    path = write(site, text)
    error = loadError(path)
    assert (error.file, error.section, error.key, error.line) == (path, section, key, line)
    assert message in error.message


def test_missingFile(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.ini")
    error = loadError(path)
    assert (error.file, error.message) == (path, "no such file")
    assert str(error) == f"{path}: no such file"


def test_directoryInsteadOfFile(tmp_path: Path) -> None:
    assert "got a directory" in loadError(str(tmp_path)).message


def test_notUTF8(tmp_path: Path) -> None:
    path = tmp_path / "edge.ini"
    path.write_bytes(b"[edgeproxy]\nvia = caf\xe9\n")
    assert "not UTF-8" in loadError(str(path)).message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "edge.ini"
    path.write_text(BASE)
    path.chmod(0)
    assert "cannot read" in loadError(str(path)).message


def test_linesAfterMultilineValuesAndComments(site: Path) -> None:
    """
    Line numbers stay right after continuation lines, full-line and inline
    comments, and blank lines.
    """
    text = (
        "# a comment\n"
        "; another\n"
        "[tls]\n"
        "certificates =\n"
        "    certs\n"
        "    certs/site.pem   ; inline\n"
        "\n"
        "[listen:web]   # header comment\n"
        "endpoint = tcp:8080  # the port\n"
        "  ; indented comment\n"
        "\n"
        "[upstream:app]\n"
        "servers = a:1,\n"
        "   b:2 weight=2\n"
        "keepalive = none\n"
    )
    path = write(site, text)
    error = loadError(path)
    assert (error.section, error.key, error.line) == ("upstream:app", "keepalive", 15)


def test_inlineComments(site: Path) -> None:
    text = (
        "[listen:web]\n"
        "endpoint = tcp:8080   ; plain\n"
        "[upstream:app]\n"
        "servers = 127.0.0.1:9001 # one\n"
        "[route:app]\n"
        "hosts = a.example ; b.example is not a host, this is a comment\n"
        "upstream = app\n"
        "[edgeproxy]\n"
        "via = edge#1 ; only this is a comment\n"
    )
    config = load(write(site, text))
    assert config.listeners[0].endpoint == "tcp:8080"
    assert config.upstreams["app"].servers == (Server("127.0.0.1", 9001),)
    assert config.routes[0].hosts == ("a.example",)
    assert config.proxy.via == "edge#1"


FULL = """\
[edgeproxy]
include = conf.d/*.ini
access_log = logs/access.log
access_log_format = json
trusted_proxies = 10.0.0.0/8, 192.0.2.1
    2001:db8::/32
client_header_timeout = 5s
client_idle_timeout = 2m
max_header_size = 32KiB
max_headers = 50
max_body_size = 10MiB
shutdown_timeout = 1m30s
via = edge-1
admin = tcp:9901:interface=127.0.0.1
admin_token_file = admin.token
workers = 3
log_level = warn
log_format = journald
latency_buckets = 5ms, 50ms 500ms
    5s
image_workers = 2
image_queue = 5
request_id = X-Correlation-ID
client_ip_header = X-Real-IP
fast_paths = off
error_pages = errors

[tls]
certificates = certs, certs/site.pem
keys = certs
default = certs/site.pem
min_version = 1.3
expiry_warning = 30d
session_ticket_rotation = 6h
ocsp_stapling = no

[acme]
directory = https://127.0.0.1:14000/dir
email = mailto:ops@example.com
storage = state/acme
directory_ca = ca.pem
challenges = http-01
key_type = rsa-2048
renew_before = 20d
eab_kid = kid-1
eab_hmac_key_file = eab.key
names = example.com, www.example.com
on_demand = yes
ask = http://127.0.0.1:9000/ask
on_demand_burst = 3
on_demand_interval = 5m

[listen:https]
endpoint = tcp6:443:interface=\\:\\:
tls = yes
http2 = no
max_body_size = 0
client_header_timeout = 2500ms

[listen:http]
endpoint = tcp:80
redirect_https = yes

[listen:admin]
endpoint = systemd:domain=INET6:name=admin
tls = on
redirect_https = true
redirect_port = 8443
h2_max_concurrent_streams = 50
h2_initial_window_size = 1 MiB
h2_max_frame_size = 32KiB
h2_max_header_list_size = 32768
h2_stream_buffer = 128KiB
h2_connection_buffer = 4MiB

[listen:local]
endpoint = unix:run.sock:mode=660

[upstream:api]
servers = api1.internal:8443 weight=3 max_conns=20, 10.1.2.3:8443 down, [2001:db8::1]:8443 backup
tls = yes
ca = ca.pem
server_name = API.internal
client_certificate = client.pem
connect_timeout = 2s
response_timeout = 30s
idle_timeout = 45s
keepalive = 0
keepalive_timeout = 10s
host_header = api.example.com
balance = hash
hash_key = Header:X-User
queue_size = 10
queue_timeout = 2s
resolve_interval = 1m
retries = 1
retry_budget = 10%
max_fails = 3
fail_window = 5s
eject_time = 10s
eject_max_time = 2m
fail_status = 502-504, 500
slow_start = 20s
health_path = /healthz?full=1
health_interval = 2s
health_timeout = 500ms
health_status = 200, 204
health_host = health.internal
health_initial = up
rise = 1
fall = 2

[upstream:legacy]
servers = legacy:80
tls = 1
insecure = yes

[route:api]
hosts = Example.COM, *.example.com., 192.0.2.10, [2001:DB8::10]
paths = /api/, /v2
upstream = api
max_body_size = 1GiB
strip_prefix = yes
websocket = no
compress = br, gzip
compress_types = text/*, application/json
compress_min_size = 512
compress_level = br:5
images = webp
image_quality = webp:70
image_max_pixels = 4000000
image_max_bytes = 4MiB
image_resize = yes
image_signing_key_file = image.key
error_pages = errors/api
cache = yes
stale_while_revalidate = 30s
stale_if_error = 1d
default_ttl = 5m
cache_cookies = yes
request_headers_set = X-Env: prod
request_headers_add = X-Trace: edge
request_headers_remove = X-Debug, X-Internal-*
response_headers_set = X-Content-Type-Options: nosniff
    Referrer-Policy: no-referrer
response_headers_add = Cache-Control: no-transform
response_headers_remove = X-Backend-*

[route:catchall]
hosts = *
upstream = legacy
retries = 0
request_timeout = 2m

[route:moved]
hosts = www.example.com
paths = /old/
strip_prefix = yes
redirect = https://example.com/new$path$is_args$args
redirect_status = 308

[cache]
memory = 64MiB
disk = state/cache
disk_size = 2GiB
max_object_size = 8MiB
heuristic_max = 1h
targeted_field = Edge-Cache-Control
key_includes = header:X-Device, cookie:lang
purge_from = 127.0.0.1, 10.0.0.0/8
name = edge-1
collapse_timeout = 5s
"""


def test_fullExample(site: Path) -> None:
    """Every key of every section, turned into exactly the expected values."""
    path = write(site, FULL)
    base = str(site)
    defaults = Limits()
    proxyLimits = Limits(
        client_header_timeout=5.0,
        client_idle_timeout=120.0,
        max_header_size=32768,
        max_headers=50,
        max_body_size=10 * 1024 * 1024,
    )
    assert defaults != proxyLimits
    down = ErrorPage(os.path.join(base, "errors", "5xx.html"), "text/html; charset=utf-8", b"<h1>down</h1>\n")
    sitePages = ErrorPages(classes=((5, down),))
    notFound = ErrorPage(
        os.path.join(base, "errors", "api", "404.json"), "application/json", b'{"error": "not found"}\n'
    )
    expected = Config(
        path=path,
        proxy=ProxySettings(
            access_log=os.path.join(base, "logs", "access.log"),
            access_log_format=AccessLogFormat.JSON,
            trusted_proxies=(
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("192.0.2.1/32"),
                ipaddress.ip_network("2001:db8::/32"),
            ),
            limits=proxyLimits,
            shutdown_timeout=90.0,
            via="edge-1",
            admin="tcp:9901:interface=127.0.0.1",
            admin_token="0123456789abcdef0123456789abcdef",
            workers=3,
            log_level="warn",
            log_format="journald",
            latency_buckets=(0.005, 0.05, 0.5, 5.0),
            image_workers=2,
            image_queue=5,
            request_id="X-Correlation-ID",
            client_ip_header="X-Real-IP",
            fast_paths="off",
            error_pages=sitePages,
        ),
        tls=TLSSettings(
            certificates=(os.path.join(base, "certs"), os.path.join(base, "certs", "site.pem")),
            keys=(os.path.join(base, "certs"),),
            default=os.path.join(base, "certs", "site.pem"),
            min_version=TLSVersion.TLSv1_3,
            expiry_warning=30 * 86400.0,
            session_ticket_rotation=6 * 3600.0,
            ocsp_stapling=False,
        ),
        acme=ACMESettings(
            storage=os.path.join(base, "state", "acme"),
            directory="https://127.0.0.1:14000/dir",
            email="ops@example.com",
            directory_ca=os.path.join(base, "ca.pem"),
            challenges=(ACMEChallenge.HTTP_01,),
            key_type=ACMEKeyType.RSA_2048,
            renew_before=20 * 86400.0,
            eab_kid="kid-1",
            eab_hmac_key="c2VjcmV0LWhtYWMta2V5",
            names=("example.com", "www.example.com"),
            on_demand=True,
            ask="http://127.0.0.1:9000/ask",
            on_demand_burst=3,
            on_demand_interval=300.0,
        ),
        listeners=(
            Listener(
                name="https",
                endpoint="tcp6:443:interface=\\:\\:",
                tls=True,
                http2=False,
                limits=Limits(
                    client_header_timeout=2.5,
                    client_idle_timeout=120.0,
                    max_header_size=32768,
                    max_headers=50,
                    max_body_size=0,
                ),
            ),
            Listener(name="http", endpoint="tcp:80", tls=False, http2=False, redirect_https=True, limits=proxyLimits),
            Listener(
                name="admin",
                endpoint="systemd:domain=INET6:name=admin",
                tls=True,
                redirect_https=True,
                redirect_port=8443,
                limits=proxyLimits,
                h2=HTTP2Settings(
                    max_concurrent_streams=50,
                    initial_window_size=1024 * 1024,
                    max_frame_size=32768,
                    max_header_list_size=32768,
                    stream_buffer=128 * 1024,
                    connection_buffer=4 * 1024 * 1024,
                ),
            ),
            Listener(
                name="local",
                endpoint="unix:" + os.path.join(base, "run.sock").replace(":", "\\:") + ":mode=660",
                tls=False,
                http2=False,
                limits=proxyLimits,
            ),
        ),
        upstreams={
            "api": Upstream(
                name="api",
                servers=(
                    Server("api1.internal", 8443, 3, max_conns=20),
                    Server("10.1.2.3", 8443, down=True),
                    Server("2001:db8::1", 8443, backup=True),
                ),
                tls=True,
                ca=os.path.join(base, "ca.pem"),
                server_name="api.internal",
                client_certificate=os.path.join(base, "client.pem"),
                connect_timeout=2.0,
                response_timeout=30.0,
                idle_timeout=45.0,
                keepalive=0,
                keepalive_timeout=10.0,
                host_header="api.example.com",
                balance="hash",
                hash_key="header:x-user",
                queue_size=10,
                queue_timeout=2.0,
                resolve_interval=60.0,
                retries=1,
                retry_budget=0.1,
                max_fails=3,
                fail_window=5.0,
                eject_time=10.0,
                eject_max_time=120.0,
                fail_status=(502, 503, 504, 500),
                slow_start=20.0,
                health_path="/healthz?full=1",
                health_interval=2.0,
                health_timeout=0.5,
                health_status=((200, 200), (204, 204)),
                health_host="health.internal",
                health_initial="up",
                rise=1,
                fall=2,
            ),
            "legacy": Upstream(name="legacy", servers=(Server("legacy", 80),), tls=True, insecure=True),
        },
        routes=(
            Route(
                name="api",
                hosts=("example.com", "*.example.com", "192.0.2.10", "2001:db8::10"),
                paths=("/api/", "/v2"),
                upstream="api",
                max_body_size=1024**3,
                strip_prefix=True,
                websocket=False,
                compress=CompressSettings(
                    encodings=("br", "gzip"),
                    types=("text/*", "application/json"),
                    min_size=512,
                    levels=(("zstd", 3), ("br", 5), ("gzip", 6)),
                ),
                images=ImageSettings(
                    formats=("webp",),
                    quality=(("avif", 60), ("webp", 70)),
                    max_pixels=4_000_000,
                    max_bytes=4 * 1024 * 1024,
                    resize=True,
                    signing_key=b"0123456789abcdef0123456789abcdef",
                ),
                cache=RouteCache(
                    stale_while_revalidate=30.0,
                    stale_if_error=86400.0,
                    default_ttl=300.0,
                    cache_cookies=True,
                ),
                request_headers=HeaderRules(
                    remove=("x-debug", "x-internal-*"),
                    set=(("x-env", "prod"),),
                    add=(("x-trace", "edge"),),
                ),
                response_headers=HeaderRules(
                    remove=("x-backend-*",),
                    set=(("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer")),
                    add=(("cache-control", "no-transform"),),
                ),
                error_pages=ErrorPages(exact=((404, notFound),), classes=((5, down),)),
            ),
            Route(
                name="catchall",
                hosts=("*",),
                paths=("/",),
                upstream="legacy",
                forwarding=RouteForwarding(retries=0, request_timeout=120.0),
                error_pages=sitePages,
            ),
            Route(
                name="moved",
                hosts=("www.example.com",),
                paths=("/old/",),
                upstream=None,
                strip_prefix=True,
                websocket=False,
                redirect=RouteRedirect(
                    location="https://example.com/new$path$is_args$args",
                    parts=(
                        ("text", "https://example.com/new"),
                        ("var", "path"),
                        ("var", "is_args"),
                        ("var", "args"),
                    ),
                    status=308,
                ),
                error_pages=sitePages,
            ),
        ),
        cache=CacheSettings(
            memory=64 * 1024 * 1024,
            disk=os.path.join(base, "state", "cache"),
            disk_size=2 * 1024**3,
            max_object_size=8 * 1024 * 1024,
            heuristic_max=3600.0,
            targeted_field="Edge-Cache-Control",
            key_includes=("header:x-device", "cookie:lang"),
            purge_from=(ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8")),
            name="edge-1",
            collapse_timeout=5.0,
        ),
    )
    config = load(path)
    assert config == expected
    assert list(config.upstreams) == ["api", "legacy"]


def test_everyKeyIsInTheFullExample() -> None:
    """The full example above (and the security layer's, in
    tests.test_config_security) really does set every key."""
    from tests.test_config_security import SECURITY_FULL

    for kind, keys in SECTION_KEYS.items():
        for key in keys:
            if key == "admin_token":
                continue  # excludes admin_token_file: see test_adminToken
            assert f"\n{key} = " in FULL + SECURITY_FULL, (kind, key)


def test_unknownKeyListsEachAcceptedKeyOnce(site: Path) -> None:
    """
    The list of what a section accepts, in an unknown key's message, names
    each key once (the route's named its security and cache keys twice).
    """
    for kind, keys in SECTION_KEYS.items():
        assert len(keys) == len(set(keys)), (kind, sorted(k for k in keys if keys.count(k) > 1))
    error = loadError(write(site, BASE + "\n[route:r]\nhosts = r.example\nupstream = app\nverbs = GET\n"))
    accepted = str(error).split("(this section accepts: ", 1)[1].split(")", 1)[0].split(", ")
    assert len(accepted) == len(set(accepted)) == len(SECTION_KEYS["route"])
    assert accepted[:3] == ["hosts", "paths", "upstream"]


def test_adminToken(site: Path) -> None:
    """The token may sit in edge.ini itself; surrounding space is not part of it."""
    text = BASE + "\n[edgeproxy]\nadmin = tcp:0\nadmin_token =  s3cr3t-t0ken-0123456789 \n"
    assert load(write(site, text)).proxy.admin_token == "s3cr3t-t0ken-0123456789"


def test_adminTokenNotShown(site: Path) -> None:
    """The token never shows up in a printed configuration."""
    text = BASE + "\n[edgeproxy]\nadmin = tcp:0\nadmin_token = s3cr3t-t0ken-0123456789\n"
    assert "s3cr3t" not in repr(load(write(site, text)))


def test_workersAuto(site: Path) -> None:
    text = BASE + "\n[edgeproxy]\nworkers = auto\n"
    assert load(write(site, text)).proxy.workers == availableCPUs()


def test_defaults(site: Path) -> None:
    """A minimal configuration gets the documented defaults."""
    config = load(write(site, BASE))
    assert config.proxy == ProxySettings()
    assert config.tls is None
    assert config.listeners == (Listener(name="web", endpoint="tcp:8080", tls=False, http2=False),)
    assert config.upstreams == {"app": Upstream(name="app", servers=(Server("127.0.0.1", 9001),))}
    assert config.routes == (Route(name="app", hosts=("example.com",), paths=("/",), upstream="app"),)


def test_booleans(site: Path) -> None:
    for word, value in [
        ("yes", True), ("YES", True), ("true", True), ("on", True), ("1", True),
        ("no", False), ("False", False), ("off", False), ("0", False),
    ]:
        text = BASE.replace("upstream = app", f"upstream = app\nstrip_prefix = {word}")
        assert load(write(site, text)).routes[0].strip_prefix is value, word


def test_relativePaths(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Relative paths resolve against the configuration's directory whatever
    the working directory; C{Config.path} is absolute.
    """
    (site / "conf").mkdir()
    write(
        site / "conf",
        BASE + "\n[tls]\ncertificates = ../certs/\n",
    )
    elsewhere = site / "logs"
    monkeypatch.chdir(elsewhere)
    config = load(os.path.join("..", "conf", "edge.ini"))
    assert config.path == str(site / "conf" / "edge.ini")
    assert config.tls is not None
    assert config.tls.certificates == (str(site / "certs"),)


def test_absolutePathsKept(site: Path) -> None:
    text = BASE + f"\n[tls]\ncertificates = {site / 'certs'}\n"
    config = load(write(site / "logs", text))
    assert config.tls is not None
    assert config.tls.certificates == (str(site / "certs"),)


def test_accessLogOffAndStdout(site: Path) -> None:
    assert load(write(site, BASE + "[edgeproxy]\naccess_log = off\n")).proxy.access_log is None
    assert load(write(site, BASE + "[edgeproxy]\naccess_log = -\n")).proxy.access_log == "-"
    assert load(write(site, BASE + "[edgeproxy]\ntrusted_proxies =\n")).proxy.trusted_proxies == ()


def test_listenerOverridesOnlyWhatItSets(site: Path) -> None:
    text = BASE.replace("endpoint = tcp:8080", "endpoint = tcp:8080\nmax_headers = 10") + (
        "[edgeproxy]\nmax_headers = 20\nmax_body_size = 1KiB\n"
    )
    (listener,) = load(write(site, text)).listeners
    assert listener.limits == Limits(max_headers=10, max_body_size=1024)


def test_redirectToFirstTLSListener(site: Path) -> None:
    text = (
        "[tls]\ncertificates = certs\n"
        "[listen:http]\nendpoint = tcp:80\nredirect_https = yes\n"
        "[listen:https]\nendpoint = tcp:443\ntls = yes\n"
    )
    config = load(write(site, text))
    assert [listener.redirect_https for listener in config.listeners] == [True, False]


def test_redirectToSelfRefused(site: Path) -> None:
    text = "[tls]\ncertificates = certs\n[listen:https]\nendpoint = tcp:443\ntls = yes\nredirect_https = yes\n"
    error = loadError(write(site, text))
    assert (error.key, error.line) == ("redirect_https", 6)
    assert "redirect to itself" in error.message


def test_redirectToUnknownPortRefused(site: Path) -> None:
    text = (
        "[tls]\ncertificates = certs\n"
        "[listen:https]\nendpoint = systemd:domain=INET6:name=https\ntls = yes\n"
        "[listen:http]\nendpoint = tcp:80\nredirect_https = yes\n"
    )
    error = loadError(write(site, text))
    assert (error.section, error.key, error.line) == ("listen:http", "redirect_https", 8)
    assert "set redirect_port" in error.message


def test_samePortOnDifferentInterfaces(site: Path) -> None:
    text = BASE + "[listen:other]\nendpoint = tcp:8080:interface=127.0.0.2\n"
    assert len(load(write(site, text)).listeners) == 2


def test_portZeroNeverCollides(site: Path) -> None:
    text = "[listen:a]\nendpoint = tcp:0\n[listen:b]\nendpoint = tcp:0\n"
    assert len(load(write(site, text)).listeners) == 2


def test_samePathDifferentHosts(site: Path) -> None:
    text = BASE + "[route:other]\nhosts = other.example\nupstream = app\n"
    assert [route.name for route in load(write(site, text)).routes] == ["app", "other"]


def test_shippedExample(tmp_path: Path) -> None:
    """
    The edge.ini in the repository root parses as shipped, given the files
    the development certificate generator writes.
    """
    shutil.copy(REPOSITORY / "edge.ini", tmp_path / "edge.ini")
    (tmp_path / "certs" / "live").mkdir(parents=True)
    (tmp_path / "certs" / "internal").mkdir()
    for name in ("certs/live/default.pem", "certs/internal/ca.pem"):
        (tmp_path / name).write_text("made by certs/generate.py\n")
    config = load(str(tmp_path / "edge.ini"))
    assert config.proxy.access_log == "-"
    assert config.tls == TLSSettings(
        certificates=(str(tmp_path / "certs" / "live"),),
        default=str(tmp_path / "certs" / "live" / "default.pem"),
        min_version=TLSVersion.TLSv1_2,
    )
    assert config.listeners == (
        Listener(name="https", endpoint="tcp:8443:interface=127.0.0.1", tls=True),
        Listener(
            name="http", endpoint="tcp:8080:interface=127.0.0.1", tls=False, http2=False, redirect_https=True
        ),
    )
    assert config.upstreams == {
        "app": Upstream(
            name="app",
            servers=(Server("127.0.0.1", 9001),),
            tls=True,
            ca=str(tmp_path / "certs" / "internal" / "ca.pem"),
            server_name="origin.internal",
            health_path="/healthz",
            health_interval=2.0,
            health_timeout=1.0,
            fall=2,
        )
    }
    # The admin listener is on loopback in the example (and has no token).
    assert (config.proxy.admin, config.proxy.admin_token) == ("tcp:9901:interface=127.0.0.1", None)
    assert config.routes == (
        Route(name="app", hosts=("localhost", "127.0.0.1"), paths=("/",), upstream="app"),
    )


# Endpoint descriptions ----------------------------------------------------


@pytest.mark.parametrize(
    "description",
    [
        "tcp:443",
        "tcp:8443:interface=127.0.0.1",
        "tcp:port=8443:backlog=100",
        "tcp:443:interface=\\:\\:1",
        "tcp6:443",
        "tcp6:443:interface=\\:\\:1",
        "tcp6:port=443:interface=\\:\\::backlog=5",
        "unix:/tmp/edge.sock",
        "unix:/tmp/edge.sock:mode=600:lockfile=0",
        "systemd:domain=INET6:name=https",
        "systemd:domain=INET:index=0",
        "a:b\\:c=d:e=f\\=g:h",
        "tcp:443:interface=1.2.3.4=5",
    ],
)
def test_tokenizerAgreesWithTwisted(description: str) -> None:
    """Descriptions split exactly as Twisted's own parser splits them."""
    assert _tokenizeEndpoint(description) == tuple(twistedParse(description))


@pytest.mark.parametrize(
    "description",
    [
        "tcp:443",
        "tcp:0:interface=127.0.0.1",
        "tcp:443:interface=\\:\\:1:backlog=10",
        "tcp6:443:interface=\\:\\:1",
        "unix:/tmp/edgeproxy-test.sock:mode=660",
    ],
)
def test_acceptedEndpointsBuildInTwisted(description: str) -> None:
    """
    What the checker accepts, Twisted turns into an endpoint (built, not
    listened on).
    """
    spec = checkEndpoint(description, "/tmp")
    reactor = MemoryReactor()
    endpoint = serverFromString(reactor, spec.description)
    endpoint.listen(object())  # type: ignore[arg-type]
    assert reactor.tcpServers or reactor.unixServers


def test_unixPathMadeAbsolute(tmp_path: Path) -> None:
    (tmp_path / "we:ird").mkdir()
    spec = checkEndpoint("unix:we\\:ird/edge.sock:mode=600", str(tmp_path))
    reactor = MemoryReactor()
    serverFromString(reactor, spec.description).listen(object())  # type: ignore[arg-type]
    assert reactor.unixServers[0][0] == str(tmp_path / "we:ird" / "edge.sock")


def test_endpointPortAndInterface() -> None:
    spec = checkEndpoint("tcp:8443:interface=127.0.0.1", "/")
    assert (spec.kind, spec.port, spec.interface) == ("tcp", 8443, "127.0.0.1")
    spec = checkEndpoint("systemd:domain=INET6:name=https", "/")
    assert (spec.kind, spec.port) == ("systemd", None)


def test_serverList() -> None:
    assert parseServers("a.internal:80 weight=2,\n [::1]:9001 , 10.0.0.1:1") == (
        Server("a.internal", 80, 2),
        Server("::1", 9001),
        Server("10.0.0.1", 1),
    )
    assert Server("::1", 9001).address == "[::1]:9001"


# Line tracking ------------------------------------------------------------

_KEY = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True)
_VALUE = st.from_regex(r"[A-Za-z0-9/:.,*=-]{1,10}( [A-Za-z0-9][A-Za-z0-9#;]{0,4})?", fullmatch=True)
_COMMENT = st.sampled_from(["", "  ; note", "\t# note", " ;", "    # x = y"])
_NOISE = st.lists(st.sampled_from(["", "# comment", "; comment", "   ", "  # indented comment"]), max_size=2)


@st.composite
def _iniFiles(draw: st.DrawFn) -> tuple[str, dict[str, int], dict[tuple[str, str], int], dict[tuple[str, str], str]]:
    """An INI text with the lines of its sections and keys, and the values."""
    lines: list[str] = []
    sectionLines: dict[str, int] = {}
    keyLines: dict[tuple[str, str], int] = {}
    values: dict[tuple[str, str], str] = {}
    names = draw(st.lists(_KEY, min_size=1, max_size=4, unique=True))
    for name in names:
        lines += draw(_NOISE)
        lines.append(f"[{name}]{draw(_COMMENT)}")
        sectionLines[name] = len(lines)
        # Keys of a section share their indentation: a key indented deeper
        # than the one before it continues that one's value.
        indent = draw(st.sampled_from(["", "", " "]))
        for key in draw(st.lists(_KEY, max_size=4, unique=True)):
            lines += draw(_NOISE)
            value = draw(_VALUE)
            lines.append(f"{indent}{key} = {value}{draw(_COMMENT)}")
            keyLines[(name, key)] = len(lines)
            text = value
            for more in draw(st.lists(_VALUE, max_size=2)):
                lines.append(f"{indent}    {more}{draw(_COMMENT)}")
                text += "\n" + more
            values[(name, key)] = text
    return "\n".join(lines) + "\n", sectionLines, keyLines, values


def _configparser() -> configparser.RawConfigParser:
    """configparser set up as L{edgeproxy.config.ini} describes it."""
    parser = configparser.RawConfigParser(
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=("#", ";"),
        strict=True,
        empty_lines_in_values=False,
        default_section="\0none",
        interpolation=None,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    return parser


@settings(max_examples=300)
@given(_iniFiles())
def test_readINIAgreesWithConfigparser(
    generated: tuple[str, dict[str, int], dict[tuple[str, str], int], dict[tuple[str, str], str]]
) -> None:
    """
    The INI reader reads what configparser (as its docstring configures it)
    reads, and finds the line of every section and key, through comments
    and continuation lines.
    """
    text, sectionLines, keyLines, values = generated
    parser = _configparser()
    parser.read_string(text)
    read = {(section, key): value for section in parser.sections() for key, value in parser.items(section)}
    assert read == values
    sections, errors = readINI(text, "edge.ini")
    assert errors == []
    assert {(s.name, key): v.text for s in sections for key, v in s.values.items()} == values
    assert {s.name: s.line for s in sections} == sectionLines
    assert {(s.name, key): v.line for s in sections for key, v in s.values.items()} == keyLines


# The documentation --------------------------------------------------------


def test_documentationNamesEveryKey() -> None:
    reference = (REPOSITORY / "docs" / "configuration.rst").read_text()
    for kind, keys in SECTION_KEYS.items():
        for key in keys:
            assert f"``{key}``" in reference, (kind, key)


def test_documentedExampleLoads(tmp_path: Path) -> None:
    """The complete example of docs/configuration.rst is a valid configuration."""
    reference = (REPOSITORY / "docs" / "configuration.rst").read_text()
    block = reference.split("A complete example\n------------------\n\n::\n\n")[1]
    example = "\n".join(line[4:] for line in block.splitlines())
    root = str(tmp_path)
    (tmp_path / "etc" / "edgeproxy" / "certs").mkdir(parents=True)
    (tmp_path / "var" / "log" / "edgeproxy").mkdir(parents=True)
    for name in ("etc/edgeproxy/certs/example.com.pem", "etc/edgeproxy/internal-ca.pem"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "etc/edgeproxy/admin.token").write_text("0123456789abcdef0123456789abcdef\n")
    example = example.replace("/etc/", root + "/etc/").replace("/var/", root + "/var/")
    config = load(write(tmp_path, example))
    assert [route.name for route in config.routes] == ["app", "static"]
    assert config.listeners[1].redirect_port == 443


def test_configurationImportsNoUpstreamModule() -> None:
    """
    C{config/} holds values and checks of values: the balancing policy
    names it accepts live in the model, not in the balancer that implements
    them.
    """
    import subprocess
    import sys

    code = (
        "import sys, edgeproxy.config, edgeproxy.config.model; "
        "print(sorted(m for m in sys.modules if m.startswith('edgeproxy.upstream')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPOSITORY,
        timeout=60,
    )
    assert out.stdout.strip() == "[]"


def test_balancePoliciesAreTheBalancersNames() -> None:
    from edgeproxy.config.model import BALANCE_POLICIES
    from edgeproxy.upstream.balance import POLICIES

    assert POLICIES == BALANCE_POLICIES
