# -*- test-case-name: tests.test_config_source -*-
"""
From a path to the raw sections of a configuration: the main file, the
files its C{[edgeproxy] include} names, and C{${VAR}} substituted from the
environment.

Includes
    C{include = conf.d/*.ini} (shell patterns, several separated by commas
    or spaces) reads the matching files in name order after the main file,
    as if their sections were written there.  A pattern matching nothing is
    fine (an empty C{conf.d/}); a path without a pattern must exist.
    Included files hold any section but C{[edgeproxy]} (so there is one
    place for the process settings and includes do not nest); a section may
    appear once across all files.  Relative paths in an included file, like
    the include patterns themselves, resolve against the directory of the
    I{main} file, so a snippet means the same wherever it is included from.

Substitution
    C{${NAME}} in a value is replaced by the environment variable C{NAME};
    C{${NAME:-default}} by C{default} when C{NAME} is unset or empty; an
    unset variable without a default is an error.  C{$${} writes a literal
    C{${}; a C{$} not followed by C{{} is left alone (C{$request_uri}).
    systemd's C{$CREDENTIALS_DIRECTORY} (C{LoadCredential=}) is the reason
    this exists: C{admin_token_file = ${CREDENTIALS_DIRECTORY}/admin-token}.

Every problem found is returned, not only the first.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from edgeproxy.config.files import CONFIG_LIMIT, FileProblem, readRegularFile
from edgeproxy.config.ini import RawSection, readINI
from edgeproxy.config.model import Source, Substitution
from edgeproxy.errors import ConfigError

__all__ = ["Loaded", "readSource", "substitute", "SECRET_KEYS"]

SECRET_KEYS = frozenset({"admin_token"})
"""Keys whose substituted value C{edgeproxy check} does not print."""

_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)(\}?)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(slots=True)
class Loaded:
    """What L{readSource} read."""

    sections: list[RawSection]
    """Every section of every file, main file first, with values substituted."""
    source: Source
    errors: list[ConfigError]


def substitute(text: str, environ: Mapping[str, str]) -> str:
    """
    Replace C{${NAME}} and C{${NAME:-default}} in C{text}.

    @raise ValueError: an unset variable, or a C{${...}} that is not a
        reference.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        inside, closed = match.group(1), match.group(2)
        name, dash, default = inside.partition(":-")
        if not closed or not _NAME.match(name):
            raise ValueError(
                f"expected ${{NAME}} or ${{NAME:-default}} with NAME of letters, digits "
                f"and '_', got {match.group(0)!r} (write $${{ for a literal '${{')"
            )
        value = environ.get(name)
        if dash and not value:
            return default
        if value is None:
            hint = ""
            if name == "CREDENTIALS_DIRECTORY":
                hint = (
                    "; systemd sets it for a service with LoadCredential= (in its "
                    "ExecStart=, ExecStartPre= and ExecReload= commands); elsewhere "
                    "write ${CREDENTIALS_DIRECTORY:-/a/directory}"
                )
            raise ValueError(f"the environment variable {name} is not set{hint}")
        return value

    return _REFERENCE.sub(replace, text)


def _readFile(path: str, errors: list[ConfigError]) -> list[RawSection] | None:
    try:
        data = readRegularFile(path, CONFIG_LIMIT)
    except FileProblem as e:
        message = str(e)
        if message == "does not exist":
            message = "no such file"
        elif "a directory" in message:
            message = "expected a configuration file, got a directory"
        errors.append(ConfigError(message, path))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.append(ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})", path))
        return None
    sections, syntaxErrors = readINI(text, path)
    errors.extend(syntaxErrors)
    return sections


def _substituteAll(
    sections: list[RawSection], environ: Mapping[str, str], errors: list[ConfigError]
) -> list[Substitution]:
    done: list[Substitution] = []
    for section in sections:
        for key, raw in section.values.items():
            if "${" not in raw.text:
                continue
            try:
                value = substitute(raw.text, environ)
            except ValueError as e:
                errors.append(ConfigError(str(e), section.file, section.name, key, raw.line))
                section.failed.add(key)
                continue
            done.append(
                Substitution(
                    file=section.file,
                    line=raw.line,
                    section=section.name,
                    key=key,
                    written=raw.text,
                    value="(secret)" if key in SECRET_KEYS else value,
                )
            )
            raw.text = value
    return done


def _includes(main: RawSection, errors: list[ConfigError]) -> list[str]:
    """
    The files C{[edgeproxy] include} names, in the order they are read;
    their paths spelled as the main file's is (C{conf.d/a.ini} for a main
    file given as C{edge.ini}), so that errors name them alike.
    """
    raw = main.values.get("include")
    if raw is None:
        return []
    files: list[str] = []
    directory = os.path.dirname(main.file)
    for pattern in re.split(r"[\s,]+", raw.text.strip()):
        if not pattern:
            continue
        spelled = os.path.normpath(os.path.join(directory, pattern))
        if glob.has_magic(spelled):
            matches = sorted(glob.glob(spelled))
        elif os.path.exists(spelled):
            matches = [spelled]
        else:
            errors.append(
                ConfigError(f"{spelled} does not exist", main.file, main.name, "include", raw.line)
            )
            matches = []
        for match in matches:
            if os.path.isdir(match):
                continue
            if match not in files:
                files.append(match)
    if not raw.text.strip():
        errors.append(
            ConfigError(
                "expected file names or patterns, got nothing (remove the key to include nothing)",
                main.file, main.name, "include", raw.line,
            )
        )
    return files


def readSource(path: str, environ: Mapping[str, str]) -> Loaded:
    """
    Read C{path} and the files it includes.

    @param environ: where C{${NAME}} comes from.
    """
    absolute = os.path.abspath(path)
    errors: list[ConfigError] = []
    files = [path]
    sections = _readFile(path, errors)
    if sections is None:
        return Loaded([], Source(files=(absolute,)), errors)
    substitutions = _substituteAll(sections, environ, errors)
    seen = {section.name: section for section in sections}
    main = seen.get("edgeproxy")
    for included in _includes(main, errors) if main is not None else []:
        if os.path.abspath(included) == absolute:
            continue
        files.append(included)
        more = _readFile(included, errors)
        if more is None:
            continue
        substitutions += _substituteAll(more, environ, errors)
        for section in more:
            if section.name == "edgeproxy":
                errors.append(
                    ConfigError(
                        f"[edgeproxy] belongs in the main configuration file ({path}), "
                        "not in an included one",
                        section.file, section.name, None, section.line,
                    )
                )
                continue
            first = seen.get(section.name)
            if first is not None:
                errors.append(
                    ConfigError(
                        f"duplicate section (first in {first.file}:{first.line}; "
                        "each section may appear once)",
                        section.file, section.name, None, section.line,
                    )
                )
                continue
            seen[section.name] = section
            sections.append(section)
    source = Source(
        files=tuple(os.path.abspath(name) for name in files),
        substitutions=tuple(substitutions),
        lines={
            (section.name, key): (section.file, raw.line)
            for section in sections
            for key, raw in section.values.items()
        }
        | {(section.name, None): (section.file, section.line) for section in sections},
    )
    return Loaded(sections, source, errors)
