# -*- test-case-name: tests.test_config -*-
"""
One section's raw values, read with typed getters that report problems
pointing at the right file and line.

A getter that meets a bad value records a L{ConfigError} in the shared
L{Problems} and returns the default, so that reading goes on and one run
reports every bad value, not only the first.  A reader that cannot go on
(a required key is missing) raises the error instead; L{readSection} records
it and the section is left out.  Rules that involve several keys ask
L{Section.ok} first, so that one bad value is not reported again as a
contradiction with a default it was replaced by.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from typing import TypeVar

from edgeproxy.config.files import PEM_LIMIT, FileProblem, checkRegularFile
from edgeproxy.config.ini import RawSection
from edgeproxy.config.units import parseDuration, parseSize
from edgeproxy.errors import ConfigError

__all__ = ["Problems", "Section", "readSection"]

T = TypeVar("T")
R = TypeVar("R")

_BOOLEANS = {
    "yes": True,
    "true": True,
    "on": True,
    "1": True,
    "no": False,
    "false": False,
    "off": False,
    "0": False,
}


class _AlreadyReported(Exception):
    """A required key's problem is reported already; the section is left out."""


class Problems:
    """Every L{ConfigError} found while reading one configuration."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, error: ConfigError) -> None:
        self.errors.append(error)

    def __bool__(self) -> bool:
        return bool(self.errors)


class Section:
    """One section, its values and where each sits."""

    def __init__(self, raw: RawSection, base: str, kind: str, problems: Problems) -> None:
        """
        @param base: the directory relative paths resolve against.
        @param kind: C{edgeproxy}, C{tls}, C{listen}... (the part before
            the colon).
        """
        self.file = raw.file
        self.base = base
        self.name = raw.name
        self.kind = kind
        self.line = raw.line
        self.values = {key: value.text for key, value in raw.values.items()}
        self._lines = {key: value.line for key, value in raw.values.items()}
        self.problems = problems
        self.failed: set[str] = set(raw.failed)
        """Keys a problem was reported for."""

    def keyLine(self, key: str) -> int:
        return self._lines.get(key, self.line)

    def error(self, key: str | None, message: str) -> ConfigError:
        line = self.line if key is None else self.keyLine(key)
        return ConfigError(message, self.file, self.name, key, line)

    def report(self, key: str | None, message: str) -> None:
        """Record a problem with C{key} (the section as a whole for L{None})."""
        self.problems.add(self.error(key, message))
        if key is not None:
            self.failed.add(key)

    def ok(self, *keys: str) -> bool:
        """Whether none of C{keys} had a problem (so a rule over them is fair)."""
        return not self.failed.intersection(keys)

    def checkKeys(self, known: tuple[str, ...]) -> None:
        for key in self.values:
            if key in known:
                continue
            hint = ""
            close = difflib.get_close_matches(key.lower(), known, n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
            elif key.lower() in known:
                hint = f"; keys are lower case: {key.lower()!r}"
            self.report(key, f"unknown key (this section accepts: {', '.join(known)}){hint}")

    def has(self, key: str) -> bool:
        return key in self.values

    def raw(self, key: str) -> str:
        value = self.values[key].strip()
        if not value:
            raise self.error(key, "expected a value, got nothing (remove the key to use the default)")
        return value

    def require(self, key: str, what: str) -> str:
        """
        The value of a required key.

        @raise ConfigError: it is missing or empty (the section cannot be
            read without it).
        """
        if key in self.failed:
            raise _AlreadyReported(key)
        if key not in self.values:
            # Point at the section header: the key has no line of its own.
            raise ConfigError(
                f"missing required key {key!r} ({what})", self.file, self.name, key, self.line
            )
        return self.raw(key)

    def convert(self, key: str, default: T, converter: Callable[[str], T]) -> T:
        if key not in self.values or key in self.failed:
            return default
        try:
            return converter(self.raw(key))
        except ValueError as e:
            self.report(key, str(e))
        except ConfigError as e:
            self.problems.add(e)
            self.failed.add(key)
        return default

    def boolean(self, key: str, default: bool) -> bool:
        def convert(text: str) -> bool:
            try:
                return _BOOLEANS[text.lower()]
            except KeyError:
                raise ValueError(f"expected yes or no (or true/false, on/off, 1/0), got {text!r}")

        return self.convert(key, default, convert)

    def duration(self, key: str, default: float, allowZero: bool = False) -> float:
        def convert(text: str) -> float:
            seconds = parseDuration(text)
            if seconds == 0 and not allowZero:
                raise ValueError(f"expected a duration greater than zero, got {text!r}")
            return seconds

        return self.convert(key, default, convert)

    def size(self, key: str, default: int, minimum: int = 0) -> int:
        def convert(text: str) -> int:
            size = parseSize(text)
            if size < minimum:
                raise ValueError(f"expected a size of at least {minimum} bytes, got {text!r}")
            return size

        return self.convert(key, default, convert)

    def integer(self, key: str, default: T, minimum: int, maximum: int | None = None) -> int | T:
        def convert(text: str) -> int:
            if not re.fullmatch(r"[0-9]+", text):
                raise ValueError(f"expected a whole number of {minimum} or more, got {text!r}")
            number = int(text)
            if number < minimum or (maximum is not None and number > maximum):
                top = "" if maximum is None else f" and at most {maximum}"
                raise ValueError(f"expected a whole number of at least {minimum}{top}, got {text!r}")
            return number

        return self.convert(key, default, convert)  # type: ignore[arg-type]

    def choice(self, key: str, default: T, choices: dict[str, T]) -> T:
        def convert(text: str) -> T:
            try:
                return choices[text.lower()]
            except KeyError:
                raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")

        return self.convert(key, default, convert)

    def resolve(self, text: str) -> str:
        return os.path.normpath(os.path.join(self.base, text))

    def checkedPath(self, text: str, kind: str) -> str:
        """
        Resolve C{text} and check it is a readable C{"file"} (a regular file
        of a size a PEM file may have), C{"directory"}, or C{"either"}.

        @raise ValueError: saying what is wrong, naming the path.
        """
        path = self.resolve(text)
        shown = path if path == text else f"{text} ({path})"
        if not os.path.exists(path):
            raise ValueError(f"{shown} does not exist")
        if os.path.isdir(path):
            if kind == "file":
                raise ValueError(f"expected a file, but {shown} is not a regular file (a directory)")
            if not os.access(path, os.R_OK | os.X_OK):
                raise ValueError(f"{shown} is not readable by this user")
            return path
        if kind == "directory":
            raise ValueError(f"expected a directory, but {shown} is not one")
        try:
            checkRegularFile(path, PEM_LIMIT)
        except FileProblem as e:
            raise ValueError(f"{shown} {e}") from None
        return path

    def optionalFile(self, key: str) -> str | None:
        return self.convert(key, None, lambda text: self.checkedPath(text, "file"))


def readSection(section: Section, reader: Callable[[Section], R]) -> R | None:
    """
    Run C{reader} on C{section}; a L{ConfigError} it raises is recorded.

    @return: what C{reader} returned, or L{None} when it raised.
    """
    try:
        return reader(section)
    except ConfigError as e:
        section.problems.add(e)
        return None
    except _AlreadyReported:
        return None
