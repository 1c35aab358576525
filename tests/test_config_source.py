"""
Tests for L{edgeproxy.config.ini}, L{edgeproxy.config.source} and
L{edgeproxy.config.files}: every problem of a file in one reading, includes,
C{${VAR}} substitution, and files read only when they are regular files of
a bounded size.
"""

from __future__ import annotations

import os
import textwrap
import threading
from pathlib import Path

import pytest

from edgeproxy.config import load
from edgeproxy.config.files import FileProblem, readRegularFile
from edgeproxy.config.ini import readINI
from edgeproxy.config.source import substitute
from edgeproxy.errors import ConfigError, ConfigErrors

BASE = """\
[listen:web]
endpoint = tcp:8080

[upstream:app]
servers = 127.0.0.1:9001

[route:app]
hosts = example.com
upstream = app
"""


def write(directory: Path, text: str, name: str = "edge.ini") -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(path: str, environ: dict[str, str] | None = None) -> list[str]:
    """Every problem L{load} reports, as the lines an operator reads."""
    with pytest.raises(ConfigError) as raised:
        load(path, environ={} if environ is None else environ)
    return str(raised.value).splitlines()


# Every problem at once ----------------------------------------------------


def test_everyProblemInOneRun(tmp_path: Path) -> None:
    """
    Problems in several sections, several keys of one section and across
    sections are all reported, in line order, one per line as
    C{file:line: [section] key: message}.
    """
    text = (
        "[edgeproxy]\n"            # 1
        "via = my proxy\n"         # 2
        "workers = many\n"         # 3
        "\n"
        "[listen:web]\n"           # 5
        "endpoint = tcp:http\n"    # 6
        "\n"
        "[upstream:app]\n"         # 8
        "servers = a:1\n"          # 9
        "keepalive = lots\n"       # 10
        "retries = 11\n"           # 11
        "conect_timeout = 1s\n"    # 12
        "\n"
        "[route:app]\n"            # 14
        "hosts = example.com\n"    # 15
        "upstream = nope\n"        # 16
    )
    path = write(tmp_path, text)
    lines = problems(path)
    assert [line.split(": ", 2)[:2] for line in lines] == [
        [f"{path}:2", "[edgeproxy] via"],
        [f"{path}:3", "[edgeproxy] workers"],
        [f"{path}:6", "[listen:web] endpoint"],
        [f"{path}:10", "[upstream:app] keepalive"],
        [f"{path}:11", "[upstream:app] retries"],
        [f"{path}:12", "[upstream:app] conect_timeout"],
        [f"{path}:16", "[route:app] upstream"],
    ]
    assert "did you mean 'connect_timeout'" in lines[5]
    assert "no [upstream:nope] section" in lines[6]


def test_brokenSectionIsNotReportedAgainAcross(tmp_path: Path) -> None:
    """
    A route naming an upstream whose section cannot be read is not also
    told that the upstream does not exist; a listener whose endpoint is bad
    does not make "no listener" appear.
    """
    text = BASE.replace("servers = 127.0.0.1:9001", "tls = yes").replace("tcp:8080", "tcp:x")
    lines = problems(write(tmp_path, text))
    assert len(lines) == 2, lines
    assert "missing required key 'servers'" in lines[1]
    assert "listening port number" in lines[0]


def test_syntaxErrorsAllReported(tmp_path: Path) -> None:
    """configparser stops at the first duplicate; the reader reports each."""
    text = (
        "[listen:web]\n"
        "endpoint = tcp:1\n"
        "endpoint = tcp:2\n"
        "no equals here\n"
        "[listen:web]\n"
        "[route:r] trailing\n"
    )
    path = write(tmp_path, text)
    lines = problems(path)
    assert lines[0] == f"{path}:3: [listen:web] endpoint: duplicate key (first at line 2; each key may appear once per section)"
    assert lines[1] == f"{path}:4: expected 'key = value' or a [section] header, got 'no equals here'"
    assert lines[2] == f"{path}:5: [listen:web]: duplicate section (first at line 1; each section may appear once)"
    assert lines[3].startswith(f"{path}:6: expected a [section] header alone on its line")


def test_readINIValues() -> None:
    sections, errors = readINI(
        "[a]\nk = v ; c\nlong = one\n    two\n  # ends it\nx=y#z\n", "f.ini"
    )
    assert errors == []
    (section,) = sections
    assert {key: (v.text, v.line) for key, v in section.values.items()} == {
        "k": ("v", 2),
        "long": ("one\ntwo", 3),
        "x": ("y#z", 6),
    }


def test_configErrorsOrder() -> None:
    """Errors sort by the given file order, then line; C{str} is one per line."""
    group = ConfigErrors(
        [
            ConfigError("b", "/e/conf.d/a.ini", "route:x", "hosts", 3),
            ConfigError("a", "/e/edge.ini", "listen:y", "tls", 9),
            ConfigError("c", "/e/edge.ini", "listen:y", "endpoint", 2),
        ],
        files=("/e/edge.ini", "/e/conf.d/a.ini"),
    )
    assert str(group).splitlines() == [
        "/e/edge.ini:2: [listen:y] endpoint: c",
        "/e/edge.ini:9: [listen:y] tls: a",
        "/e/conf.d/a.ini:3: [route:x] hosts: b",
    ]
    assert (group.file, group.line, group.key) == ("/e/edge.ini", 2, "endpoint")


# Includes -----------------------------------------------------------------


def test_include(tmp_path: Path) -> None:
    """
    C{include} reads the matching files in name order; their sections are
    part of the configuration, their relative paths resolve against the
    main file's directory, and errors name the included file and its line.
    """
    (tmp_path / "logs").mkdir()
    main = write(
        tmp_path,
        "[edgeproxy]\ninclude = conf.d/*.ini, extra.ini\naccess_log = logs/access.log\n"
        "[listen:web]\nendpoint = tcp:8080\n",
    )
    write(tmp_path, "[upstream:app]\nservers = 127.0.0.1:9001\n", "conf.d/20-app.ini")
    write(tmp_path, "[route:app]\nhosts = example.com\nupstream = app\n", "conf.d/10-route.ini")
    write(tmp_path, "[upstream:other]\nservers = 127.0.0.1:9002\n", "extra.ini")
    config = load(main, environ={})
    assert config.source is not None
    assert config.source.files == (
        main,
        str(tmp_path / "conf.d" / "10-route.ini"),
        str(tmp_path / "conf.d" / "20-app.ini"),
        str(tmp_path / "extra.ini"),
    )
    assert list(config.upstreams) == ["app", "other"]
    assert config.routes[0].upstream == "app"

    write(tmp_path, "[upstream:app]\nservers = 127.0.0.1:9001\nkeepalive = x\n", "conf.d/20-app.ini")
    lines = problems(main)
    assert lines == [
        f"{tmp_path / 'conf.d' / '20-app.ini'}:3: [upstream:app] keepalive: "
        "expected a whole number of 0 or more, got 'x'"
    ]


def test_includeProblems(tmp_path: Path) -> None:
    """
    A missing plain path is an error, an empty pattern is not; a section
    twice across files names both places; [edgeproxy] stays in the main file.
    """
    main = write(tmp_path, "[edgeproxy]\ninclude = none.d/*.ini missing.ini, dup.ini\n" + BASE)
    write(tmp_path, "[edgeproxy]\nvia = x\n[upstream:app]\nservers = a:1\n", "dup.ini")
    lines = problems(main)
    dup = tmp_path / "dup.ini"
    assert lines == [
        f"{main}:2: [edgeproxy] include: {tmp_path / 'missing.ini'} does not exist",
        f"{dup}:1: [edgeproxy]: [edgeproxy] belongs in the main configuration file ({main}), not in an included one",
        f"{dup}:3: [upstream:app]: duplicate section (first in {main}:6; each section may appear once)",
    ]


@pytest.mark.parametrize("spelled", ["edge.ini", "./edge.ini", "absolute"])
def test_includeProblemsInFileAndLineOrder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelled: str
) -> None:
    """
    Problems are listed in file and line order as the files are read: the
    main file first, then the included ones in the order they were read,
    each named as the main file is (C{edge.ini} given: C{conf.d/a.ini}),
    however the main file's path is spelled.
    """
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "[edgeproxy]\ninclude = conf.d/*.ini\nvia = my proxy\n" + BASE)
    write(tmp_path, "[upstream:b]\nservers = b\n", "conf.d/20-b.ini")
    write(tmp_path, "[upstream:a]\nservers = a:1\nkeepalive = x\n", "conf.d/10-a.ini")
    main = str(tmp_path / "edge.ini") if spelled == "absolute" else spelled
    where = [line.split(": ", 1)[0] for line in problems(main)]
    directory = f"{tmp_path}/" if spelled == "absolute" else ""
    assert where == [f"{main}:3", f"{directory}conf.d/10-a.ini:3", f"{directory}conf.d/20-b.ini:2"]


# Substitution -------------------------------------------------------------


def test_substitute() -> None:
    environ = {"HOST": "10.0.0.1", "EMPTY": ""}
    assert substitute("${HOST}:80", environ) == "10.0.0.1:80"
    assert substitute("${EMPTY:-x} ${UNSET:-/run/creds}", environ) == "x /run/creds"
    assert substitute("$request_uri $${HOST} $", environ) == "$request_uri ${HOST} $"
    with pytest.raises(ValueError, match="environment variable NOPE is not set"):
        substitute("${NOPE}", environ)
    with pytest.raises(ValueError, match="expected \\$\\{NAME\\}"):
        substitute("${HOST", environ)
    with pytest.raises(ValueError, match="expected \\$\\{NAME\\}"):
        substitute("${1X}", environ)
    with pytest.raises(ValueError, match="LoadCredential="):
        substitute("${CREDENTIALS_DIRECTORY}/admin-token", {})


def test_substitutionInValues(tmp_path: Path) -> None:
    """
    C{${VAR}} works in any value; an unset one is an error at its line;
    C{Config.source} keeps what was substituted (tokens masked).
    """
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "admin-token").write_text("0123456789abcdef0123456789abcdef\n")
    text = (
        "[edgeproxy]\nadmin = tcp:${ADMIN_PORT}:interface=127.0.0.1\n"
        "admin_token_file = ${CREDENTIALS_DIRECTORY}/admin-token\n" + BASE
    )
    path = write(tmp_path, text)
    config = load(path, environ={"ADMIN_PORT": "9901", "CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.proxy.admin == "tcp:9901:interface=127.0.0.1"
    assert config.proxy.admin_token == "0123456789abcdef0123456789abcdef"
    assert config.source is not None
    assert [(s.line, s.key, s.value) for s in config.source.substitutions] == [
        (2, "admin", "tcp:9901:interface=127.0.0.1"),
        (3, "admin_token_file", f"{credentials}/admin-token"),
    ]
    lines = problems(path, {"ADMIN_PORT": "9901"})
    assert len(lines) == 1
    assert lines[0].startswith(
        f"{path}:3: [edgeproxy] admin_token_file: the environment variable "
        "CREDENTIALS_DIRECTORY is not set; systemd sets it"
    )


# Files read only when regular and bounded --------------------------------


def test_readRegularFile(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"x" * 10)
    assert readRegularFile(str(small), 10) == b"x" * 10
    with pytest.raises(FileProblem, match="11 bytes, more than the 10"):
        small.write_bytes(b"x" * 11)
        readRegularFile(str(small), 10)
    with pytest.raises(FileProblem, match="is a device"):
        readRegularFile("/dev/zero", 1024)
    with pytest.raises(FileProblem, match="directory"):
        readRegularFile(str(tmp_path), 1024)
    with pytest.raises(FileProblem, match="does not exist"):
        readRegularFile(str(tmp_path / "nope"), 1024)


def test_fifoIsRefusedWithoutWaiting(tmp_path: Path) -> None:
    """A FIFO with no writer would block an ordinary open() forever."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(readRegularFile(str(fifo), 1024))
        except FileProblem as e:
            outcome.append(e)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():
        # Unblock the reader so the test process can end, then fail.
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert isinstance(outcome[0], FileProblem)
    assert "pipe" in str(outcome[0])


@pytest.mark.parametrize(
    "key, value",
    [
        ("[tls]\ncertificates", "/dev/zero"),
        ("[tls]\ncertificates = /dev/null\n#", ""),
        ("[edgeproxy]\nadmin = tcp:9901\nadmin_token_file", "/dev/zero"),
        ("[upstream:b]\nservers = b:1\ntls = yes\nca", "/dev/zero"),
    ],
)
def test_devicesRefused(tmp_path: Path, key: str, value: str) -> None:
    """Naming a device is a clear error at its line, at once."""
    text = BASE + f"\n{key} = {value}\n"
    lines = problems(write(tmp_path, text))
    assert any("is a device, expected a regular file" in line for line in lines), lines


def test_configFileBounds(tmp_path: Path) -> None:
    path = tmp_path / "edge.ini"
    path.write_bytes(b"#" * (1024 * 1024 + 1))
    assert problems(str(path)) == [f"{path}: is {1024 * 1024 + 1} bytes, more than the 1048576 bytes such a file may have"]
    assert problems("/dev/zero") == ["/dev/zero: is a device, expected a regular file"]
