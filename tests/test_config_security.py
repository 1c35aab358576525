"""
The security layer's configuration (L{edgeproxy.config.security}): every
key read into its value, and the mistakes an operator makes refused with
the file, line, section and key.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from edgeproxy.config.auth import htpasswdUsers
from edgeproxy.config.stagemodel import AuthSettings, RateLimit
from edgeproxy.config.parse import load
from edgeproxy.errors import ConfigError

SECRET = "0123456789abcdef0123456789abcdef-secret"

SECURITY_FULL = """\
[listen:tls]
endpoint = tcp:0
tls = yes
client_ca = clients.pem
client_certificates = require
proxy_protocol = yes
proxy_protocol_from = 10.0.0.0/8, 2001:db8::/32

[upstream:app]
servers = 127.0.0.1:9001
proxy_protocol = v2

[redis]
url = rediss://cache.internal:6380/2
username = edge
password_file = secret.txt
ca = clients.pem
timeout = 100ms
prefix = edge1

[ratelimit:api]
rate = 10/s
burst = 20
key = header:X-Api-Key
concurrency = 4
store = redis
on_store_error = closed

[auth:users]
type = basic
htpasswd = users.htpasswd
realm = Staff only
user_header = X-User
pass_authorization = yes

[auth:tokens]
type = jwt
jwks = https://idp.example/jwks.json
jwks_ca = clients.pem
issuer = https://idp.example/
audience = edge, api
algorithms = RS256, ES256
leeway = 30s
token_from = cookie:token
claims_to_headers = sub:X-Auth-Subject
jwks_refresh = 30m

[auth:shared]
type = jwt
algorithms = HS256
secret_file = secret.txt

[auth:gate]
type = forward
url = https://auth.internal/check
ca = clients.pem
copy_request_headers = Cookie, Authorization
copy_response_headers = X-Auth-User
pass_cookies = no
cache_ttl = 30s
cache_size = 500
timeout = 2s

[auth:login]
type = oidc
issuer = https://login.example/
client_id = edge
client_secret_file = secret.txt
scopes = openid email groups
callback_path = /.edgeproxy/callback
logout_path = /.edgeproxy/logout
cookie_secret_file = secret.txt
cookie_name = edge_sso
session_ttl = 1h
allow_emails = ann@example.com
allow_domains = example.org
allow_claim = groups:admins

[route:app]
hosts = app.example
upstream = app
allow = 192.0.2.0/24, 2001:db8::/32
deny = 192.0.2.7
methods = GET, head
rate_limit = api
auth = tokens
hsts = 365d
hsts_preload = yes
hsts_include_subdomains = yes
require_client_certificate = yes
client_certificate_headers = subject:X-Client-Subject, fingerprint:X-Client-SHA256
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "clients.pem").write_text("x\n")
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    (tmp_path / "users.htpasswd").write_text("ann:$2b$04$abcdefghijklmnopqrstuu\n")
    (tmp_path / "cert.pem").write_text("x\n")
    return tmp_path


def write(site: Path, text: str) -> str:
    path = site / "edge.ini"
    path.write_text(text)
    return str(path)


def test_everySecurityKey(site: Path) -> None:
    config = load(write(site, SECURITY_FULL + "[tls]\ncertificates = cert.pem\n"))
    listener = config.listeners[0]
    assert listener.client_ca == str(site / "clients.pem")
    assert listener.client_certificates == "require"
    assert listener.proxy_protocol is True
    assert listener.proxy_protocol_from == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"),
    )
    assert config.upstreams["app"].proxy_protocol == "v2"
    redis = config.redis
    assert redis is not None
    assert (redis.host, redis.port, redis.db, redis.tls) == ("cache.internal", 6380, 2, True)
    assert (redis.username, redis.password, redis.timeout, redis.prefix) == ("edge", SECRET, 0.1, "edge1")
    assert config.ratelimits["api"] == RateLimit(
        name="api", count=10, window=1.0, burst=20, key="header:x-api-key", concurrency=4,
        store="redis", on_store_error="closed",
    )
    users, tokens, gate, login = (config.auths[n] for n in ("users", "tokens", "gate", "login"))
    assert (users.type, users.realm, users.user_header, users.pass_authorization) == (
        "basic", "Staff only", "x-user", True,
    )
    assert tokens.algorithms == ("RS256", "ES256")
    assert (tokens.audience, tokens.leeway, tokens.token_from) == (("edge", "api"), 30.0, "cookie:token")
    assert tokens.claims_to_headers == (("sub", "x-auth-subject"),)
    assert (gate.copy_request_headers, gate.copy_response_headers) == (("cookie", "authorization"), ("x-auth-user",))
    assert (gate.cache_ttl, gate.cache_size, gate.timeout, gate.pass_cookies) == (30.0, 500, 2.0, False)
    assert login.scopes == ("openid", "email", "groups")
    assert login.client_secret == SECRET and login.cookie_secret == SECRET.encode()
    assert login.allow_claim == ("groups", "admins")
    assert (login.callback_path, login.logout_path, login.session_ttl) == (
        "/.edgeproxy/callback", "/.edgeproxy/logout", 3600.0,
    )
    route = config.routes[0]
    assert route.methods == ("GET", "HEAD")
    assert route.deny == (ipaddress.ip_network("192.0.2.7/32"),)
    assert (route.rate_limit, route.auth, route.hsts, route.hsts_preload) == (("api",), "tokens", 365 * 86400.0, True)
    assert route.client_certificate_headers == (("subject", "x-client-subject"), ("fingerprint", "x-client-sha256"))


def test_secretsNotShown(site: Path) -> None:
    config = load(write(site, SECURITY_FULL + "[tls]\ncertificates = cert.pem\n"))
    assert SECRET not in repr(config)


def test_rateDefaults() -> None:
    """A rate's burst defaults to its count; /m and /h windows."""
    limit = RateLimit(name="x", count=30, window=60.0, burst=30)
    assert limit.rate == 0.5


BASE = """\
[listen:web]
endpoint = tcp:0

[upstream:app]
servers = 127.0.0.1:9001

[route:app]
hosts = example.com
upstream = app
"""

ERRORS = [
    # (text added to BASE, section, key, message part)
    ("allow = 10.0.0.1/8", "route:app", "allow", "host bits set"),
    ("deny = nobody", "route:app", "deny", "CIDR"),
    ("methods = GET, <x>", "route:app", "methods", "HTTP methods"),
    ("rate_limit = nope", "route:app", "rate_limit", "no [ratelimit:nope]"),
    ("auth = nope", "route:app", "auth", "no [auth:nope]"),
    ("auth = a, b", "route:app", "auth", "one [auth:NAME]"),
    ("hsts_preload = yes", "route:app", "hsts_preload", "only used with hsts"),
    ("hsts = 1d\nhsts_preload = yes", "route:app", "hsts_preload", "365d"),
    ("require_client_certificate = yes", "route:app", "require_client_certificate", "client_ca"),
    ("client_certificate_headers = issuer:X-I", "route:app", "client_certificate_headers", "subject"),
    ("rate_limit = user\n[ratelimit:user]\nrate = 1/s\nkey = identity", "route:app", "rate_limit", "key = identity"),
    ("rate_limit = r\n[ratelimit:r]\nrate = fast", "ratelimit:r", "rate", "100/s"),
    ("rate_limit = r\n[ratelimit:r]\nrate = 1/s\nkey = ip", "ratelimit:r", "key", "client_ip"),
    ("rate_limit = r\n[ratelimit:r]\nrate = 1/s\nstore = redis", "ratelimit:r", "store", "[redis]"),
    ("rate_limit = r\n[ratelimit:r]\nrate = 1/s\non_store_error = open", "ratelimit:r", "on_store_error", "store = redis"),
    ("[ratelimit:r]\nburst = 3", "ratelimit:r", None, "needs rate"),
    ("[redis]\nurl = http://x", "redis", "url", "redis://"),
    ("[redis]\nurl = redis://:pw@127.0.0.1/0", "redis", "url", "password_file"),
    ("[auth:a]\ntype = kerberos", "auth:a", "type", "basic, jwt"),
    ("[auth:a]\ntype = basic\nhtpasswd = users.htpasswd\nissuer = x", "auth:a", "issuer", "not used with type = basic"),
    ("[auth:a]\ntype = jwt\njwks = http://idp.example/jwks", "auth:a", "jwks", "https"),
    ("[auth:a]\ntype = jwt\njwks = k.json\nalgorithms = none", "auth:a", "algorithms", "expected algorithms"),
    ("[auth:a]\ntype = jwt\nalgorithms = HS256", "auth:a", "algorithms", "secret_file"),
    ("[auth:a]\ntype = jwt\nalgorithms = HS256, RS256\nsecret_file = secret.txt", "auth:a", "algorithms", "mixed"),
    ("[auth:a]\ntype = jwt\nalgorithms = HS256\nsecret_file = short.txt", "auth:a", "secret_file", "at least 32"),
    ("[auth:a]\ntype = oidc\nissuer = https://x/\nclient_id = c", "auth:a", "cookie_secret_file", "missing"),
    ("[auth:a]\ntype = forward\nurl = ftp://x", "auth:a", "url", "https"),
    # The files a section names are read with the configuration, not first
    # at start (a traceback) or on SIGHUP (an unexpected error).
    ("[auth:a]\ntype = basic\nhtpasswd = md5.htpasswd", "auth:a", "htpasswd",
     "md5.htpasswd: line 2: user 'carl' has a hash that is neither bcrypt nor argon2"),
    ("[auth:a]\ntype = jwt\njwks = k.json", "auth:a", "jwks", "k.json: not a JWKS document"),
    ("[auth:a]\ntype = jwt\njwks = broken.json", "auth:a", "jwks", "broken.json: not JSON"),
    ("[auth:a]\ntype = jwt\njwks = nokty.json", "auth:a", "jwks", "nokty.json: key 1 is not a JWK"),
]


@pytest.mark.parametrize("extra, section, key, message", ERRORS, ids=[e[3] for e in ERRORS])
def test_errors(site: Path, extra: str, section: str, key: str | None, message: str) -> None:
    (site / "short.txt").write_text("short\n")
    (site / "k.json").write_text("{}")
    (site / "broken.json").write_text('{"keys": [')
    (site / "nokty.json").write_text('{"keys": [{"kid": "a"}]}')
    (site / "md5.htpasswd").write_text("ann:$2y$05$abcdefghijklmnopqrstuu\ncarl:$apr1$abc$def\n")
    with pytest.raises(ConfigError) as raised:
        load(write(site, BASE + extra + "\n"))
    errors = getattr(raised.value, "errors", (raised.value,))
    assert any(
        e.section == section and e.key == key and message in e.message for e in errors
    ), [str(e) for e in errors]


LISTEN_ERRORS = [
    ("client_ca = clients.pem", "client_ca", "tls = yes"),
    ("client_certificates = require", "client_certificates", "client_ca"),
    ("proxy_protocol = yes", "proxy_protocol", "proxy_protocol_from"),
    ("proxy_protocol_from = 10.0.0.0/8", "proxy_protocol_from", "only used"),
]


@pytest.mark.parametrize("extra, key, message", LISTEN_ERRORS)
def test_listenerErrors(site: Path, extra: str, key: str, message: str) -> None:
    text = BASE.replace("endpoint = tcp:0\n", f"endpoint = tcp:0\n{extra}\n")
    with pytest.raises(ConfigError) as raised:
        load(write(site, text))
    errors = getattr(raised.value, "errors", (raised.value,))
    assert any(e.key == key and message in e.message for e in errors), [str(e) for e in errors]


def test_errorNamesLine(site: Path) -> None:
    path = write(site, BASE + "allow = 10.0.0.300\n")
    with pytest.raises(ConfigError) as raised:
        load(path)
    assert str(raised.value).startswith(f"{path}:10: [route:app] allow: ")


def test_oidcScopesGetOpenID(site: Path) -> None:
    extra = (
        "auth = sso\n[auth:sso]\ntype = oidc\nissuer = http://127.0.0.1:9/\nclient_id = c\n"
        "cookie_secret_file = secret.txt\nscopes = email\n"
    )
    auth: AuthSettings = load(write(site, BASE + extra)).auths["sso"]
    assert auth.scopes == ("openid", "email")
    assert auth.claims_to_headers == (("sub", "x-auth-subject"), ("email", "x-auth-email"))
    assert auth.leeway == 60.0
    skewed = load(write(site, BASE + extra + "leeway = 2m\n")).auths["sso"]
    assert skewed.leeway == 120.0


def test_authFilesReadWithTheConfiguration(site: Path) -> None:
    """The users of an htpasswd file and a JWKS file's document are part
    of the configuration read (a reload compares and swaps them)."""
    (site / "keys.json").write_text('{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA", "kid": "a"}]}')
    extra = (
        "[auth:users]\ntype = basic\nhtpasswd = users.htpasswd\n"
        "[auth:tokens]\ntype = jwt\njwks = keys.json\n"
    )
    config = load(write(site, BASE + extra))
    assert config.auths["users"].users == (("ann", b"$2b$04$abcdefghijklmnopqrstuu"),)
    assert config.auths["tokens"].jwks_document == (site / "keys.json").read_bytes()
    assert "abcdefghijklmnopqrstuu" not in repr(config)


def test_unixRedis(site: Path) -> None:
    config = load(write(site, BASE + "[redis]\nurl = unix:run/redis.sock?db=3\n"))
    assert config.redis is not None
    assert (config.redis.path, config.redis.db) == (str(site / "run/redis.sock"), 3)


@pytest.mark.parametrize(
    "line, ok",
    [
        (b"ann:$2b$12$abc", True),
        (b"bob:$argon2id$v=19$m=65536,t=3,p=4$abc$def", True),
        (b"# comment", True),
        (b"carl:$apr1$abc$def", False),
        (b"dave:{SHA}abc", False),
        (b"nocolon", False),
    ],
)
def test_htpasswd(line: bytes, ok: bool) -> None:
    if ok:
        htpasswdUsers(line + b"\n")
    else:
        with pytest.raises(ValueError):
            htpasswdUsers(line + b"\n")
