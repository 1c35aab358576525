# -*- test-case-name: tests.test_config_source -*-
"""
Reading the files a configuration names: only regular files, and only up to
a size bound.

Every file edgeproxy reads because the configuration names it (the
configuration and its includes, certificates and keys, CA bundles, the
admin token) goes through L{readRegularFile}.  A path such as C{/dev/zero},
C{/dev/stdin} or a FIFO would otherwise make C{edgeproxy check}, a start or
a reload read (or wait) forever; a multi-gigabyte file would exhaust memory
before being refused for its contents.

The file is opened with C{O_NONBLOCK} (opening a FIFO without a writer then
returns at once instead of waiting) and checked with C{fstat} on the open
descriptor, so what is read is what was checked.  Symbolic links are
followed: certbot's C{live/} directory is made of them.
"""

from __future__ import annotations

import os
import stat

__all__ = [
    "FileProblem",
    "readRegularFile",
    "readSecretText",
    "checkRegularFile",
    "CONFIG_LIMIT",
    "PEM_LIMIT",
    "TOKEN_LIMIT",
]

CONFIG_LIMIT = 1024 * 1024
"""Bytes of one configuration file (C{edge.ini} or an included file)."""
PEM_LIMIT = 4 * 1024 * 1024
"""Bytes of one PEM file; the largest system CA bundles are under 1 MiB."""
TOKEN_LIMIT = 64 * 1024
"""Bytes of a secret file (the admin token, passwords, client secrets,
keys)."""


class FileProblem(ValueError):
    """
    A named file cannot be used; the message says why, without the path
    (callers place it).  A L{ValueError}, so that a configuration getter
    turns it into a L{edgeproxy.errors.ConfigError} like any bad value.
    """


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def checkRegularFile(path: str, limit: int) -> None:
    """
    Check, without opening it, that C{path} is a readable regular file of at
    most C{limit} bytes.

    @raise FileProblem: saying what is wrong.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileProblem("does not exist") from None
    except OSError as e:
        raise FileProblem(f"cannot be read: {e.strerror or e}") from None
    _checkInfo(info, limit)
    if not os.access(path, os.R_OK):
        raise FileProblem("is not readable by this user")


def _checkInfo(info: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise FileProblem(f"is {_kind(info.st_mode)}, expected a regular file")
    if info.st_size > limit:
        raise FileProblem(
            f"is {info.st_size} bytes, more than the {limit} bytes such a file may have"
        )


def readRegularFile(path: str, limit: int) -> bytes:
    """
    Read all of C{path}, a regular file of at most C{limit} bytes.

    @raise FileProblem: when the path does not exist, is not a regular file
        (a directory, a device, a FIFO, a socket), is larger than C{limit}
        or cannot be read.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileProblem("does not exist") from None
    except IsADirectoryError:
        raise FileProblem("is a directory, expected a regular file") from None
    except PermissionError:
        raise FileProblem("is not readable by this user") from None
    except OSError as e:
        raise FileProblem(f"cannot be read: {e.strerror or e}") from None
    try:
        _checkInfo(os.fstat(descriptor), limit)
        chunks: list[bytes] = []
        total = 0
        while True:
            # Read one byte past the bound: a file that grew since fstat is
            # refused rather than cut short.
            chunk = os.read(descriptor, min(1024 * 1024, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise FileProblem(f"is more than the {limit} bytes such a file may have")
        return b"".join(chunks)
    except OSError as e:
        raise FileProblem(f"cannot be read: {e.strerror or e}") from None
    finally:
        os.close(descriptor)


def readSecretText(path: str) -> str:
    """
    The text of a secret file (C{admin_token_file}, C{password_file},
    C{client_secret_file}...): a regular file of UTF-8 text of at most
    L{TOKEN_LIMIT} bytes, surrounding white space (the final newline an
    editor adds) stripped.

    @raise ValueError: naming C{path} and what is wrong with it.
    """
    try:
        data = readRegularFile(path, TOKEN_LIMIT)
    except FileProblem as e:
        raise ValueError(f"{path} {e}") from None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
