"""
Fuzzing C{edgeproxy check} with mutated copies of the shipped C{edge.ini}:
whatever an operator's editor (or a bad template) makes of the file, the
check ends quickly with exit status 0 or 2 and a message, never with a
traceback or a hang.

The mutations are seeded, so a failure names a variant that can be
reproduced: C{_variants(SEED)[index]}.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from edgeproxy.cli import EXIT_INVALID, EXIT_OK, main

REPOSITORY = Path(__file__).resolve().parent.parent
SEED = 15
VARIANTS = 400
PER_VARIANT_SECONDS = 5

# Values that broke, or could break, a parser: wrong types, devices, FIFOs,
# unset variables, endpoint and server syntax in the wrong key, huge and
# non-ASCII values.
_VALUES = [
    "weight=abc", "/dev/zero", "/dev/stdin", "/dev/null", "/proc/self/mem", "${UNSET}", "${", "${A:-",
    "$${X}", "-1", "0", "", " ", "tcp:", "tcp:0", "systemd:", "systemd:name=", "unix:", "tcp:99999",
    "tcp:443:interface=", "a:1 weight=", "a:1 weight=0", ":", "::", "[", "]", "[::1]", "[::1]:",
    "yes", "maybe", "*", "*.*", "/", "//", "/..", "%", "%zz", "1e309", "nan", "inf", "99999999999999999999",
    "1h1h", "10MB", "1.5", "\u00e9t\u00e9", "\u0661\u0662", "x" * 5000, "certs/", "certs/live/",
    "../../../../../../etc/passwd", "edge.ini", ".", "header:", "cookie:", "hash", "auto", "257",
    "200-100", "600", "0%", "100%", "101%", "=", "==", "# comment", "; x", "a b c",
]
_LINES = [
    "[", "]", "[x]", "[listen:]", "[route:a b]", "[tls]", "[edgeproxy]", "[DEFAULT]", "include = *",
    "include = /dev/*", "include = edge.ini", "= value", "key", "    indented continuation",
    "\t\ttabbed = 1", "[listen:x]\nendpoint = tcp:8443:interface=127.0.0.1", "\ufeff[edgeproxy]",
]


def _mutate(lines: list[str], rng: random.Random) -> list[str]:
    lines = list(lines)
    for _ in range(rng.randint(1, 4)):
        if not lines:
            lines.append(rng.choice(_LINES))
            continue
        index = rng.randrange(len(lines))
        kind = rng.randrange(8)
        line = lines[index]
        if kind == 0:
            del lines[index]
        elif kind == 1:
            lines.insert(index, line)
        elif kind == 2:
            other = rng.randrange(len(lines))
            lines[index], lines[other] = lines[other], line
        elif kind == 3 and "=" in line:
            key = line.split("=", 1)[0]
            lines[index] = f"{key}= {rng.choice(_VALUES)}"
        elif kind == 4:
            lines.insert(index, rng.choice(_LINES))
        elif kind == 5 and line:
            position = rng.randrange(len(line))
            lines[index] = line[:position] + chr(rng.choice([0x20, 0x3A, 0x3D, 0x5B, 0x5D, 0x23, 0x09, rng.randrange(0x21, 0x7F)])) + line[position + 1:]
        elif kind == 6 and "=" in line:
            key, _, value = line.partition("=")
            lines[index] = f"{key[:-2] or key}={value}"
        else:
            lines[index] = line.replace(" ", "", 1) if rng.random() < 0.5 else " " + line
    return lines


# Set on every key of the file in turn, before the random variants.
_EVERY_KEY = ["weight=abc", "/dev/zero", "${UNSET}", "x" * 5000]


def _variants(seed: int) -> list[str]:
    """
    Each key of the shipped file set to each of L{_EVERY_KEY}, then random
    mutations, L{VARIANTS} in all.
    """
    rng = random.Random(seed)
    shipped = (REPOSITORY / "edge.ini").read_text().splitlines()
    variants = []
    for index, line in enumerate(shipped):
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key = line.split("=", 1)[0]
            for value in _EVERY_KEY:
                variant = list(shipped)
                variant[index] = f"{key}= {value}"
                variants.append("\n".join(variant) + "\n")
    while len(variants) < VARIANTS:
        variants.append("\n".join(_mutate(shipped, rng)) + "\n")
    return variants


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the certificates the shipped edge.ini names."""
    directory = tmp_path_factory.mktemp("fuzz")
    spec = importlib.util.spec_from_file_location("generate", REPOSITORY / "certs" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    with contextlib.redirect_stdout(io.StringIO()):
        generate.generate(directory / "certs")
    return directory


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_shippedConfigurationIsValid(site: Path) -> None:
    """The unmutated file passes, so the mutations are what is tested."""
    path = site / "edge.ini"
    path.write_text((REPOSITORY / "edge.ini").read_text())
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["check", "--config", str(path)]) == EXIT_OK


def test_mutatedConfigurations(site: Path) -> None:
    """
    Hundreds of mutated configurations: each check returns 0 or 2 within a
    few seconds, with a message for 2 and never an exception.
    """
    path = site / "edge.ini"
    statuses = {EXIT_OK: 0, EXIT_INVALID: 0}
    for index, text in enumerate(_variants(SEED)):
        path.write_text(text)
        out, err = io.StringIO(), io.StringIO()
        try:
            with _deadline(PER_VARIANT_SECONDS), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = main(["check", "--config", str(path)])
        except _Hang:
            pytest.fail(f"variant {index} took more than {PER_VARIANT_SECONDS}s:\n{text}")
        except BaseException as e:  # noqa: BLE001 - that is the point
            pytest.fail(f"variant {index} raised {e!r}:\n{text}")
        assert status in statuses, (index, status, text)
        statuses[status] += 1
        if status == EXIT_INVALID:
            message = err.getvalue()
            assert message.strip(), (index, text)
            assert "Traceback" not in message, (index, message)
    # Both outcomes occur: the mutations neither always break nor never do.
    assert statuses[EXIT_OK] > 10 and statuses[EXIT_INVALID] > 100, statuses


def test_mutatedConfigurationsAsACommand(site: Path) -> None:
    """
    A sample through the real command line (C{python -m edgeproxy check}),
    bounded by a timeout: only exit statuses 0 and 2, and no traceback.
    """
    for index, text in enumerate(_variants(SEED)[-12:]):
        path = site / f"command-{index}.ini"
        path.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "edgeproxy", "check", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=site,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode in (EXIT_OK, EXIT_INVALID), (index, result.stderr, text)
        assert "Traceback" not in result.stderr, (index, result.stderr)
