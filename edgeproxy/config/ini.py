# -*- test-case-name: tests.test_config_source -*-
"""
The INI syntax of C{edge.ini}: text in, sections with the line of every
header and key out, and I{every} syntax error rather than the first.

The rules are configparser's, as C{RawConfigParser} reads with
C{delimiters=("=",)}, C{comment_prefixes=inline_comment_prefixes=("#",
";")}, C{empty_lines_in_values=False}, no C{[DEFAULT]} magic and
case-sensitive keys (C{tests.test_config_source} checks the two agree on
generated files):

  - C{#} and C{;} start a comment at the start of a line, or inline when
    whitespace precedes them (C{via = edge#1} keeps its C{#}).
  - C{key = value}; a line indented deeper than its key continues the
    value (joined with a newline); a blank or comment-only line ends it.
  - C{[name]} starts a section.  configparser ignores text after the C{]};
    here it is an error, as it is surely a mistake.

configparser stops at the first duplicate section or key and keeps no line
numbers, hence this reader.  Nothing here does I/O.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

from edgeproxy.errors import ConfigError

__all__ = ["RawSection", "RawValue", "readINI"]

_COMMENT_PREFIXES = ("#", ";")
_SECTION_HEADER = re.compile(r"\[(?P<header>[^\]]+)\]\Z")


@dataclass(slots=True)
class RawValue:
    """One C{key = value} as written (continuation lines joined)."""

    text: str
    line: int


@dataclass(slots=True)
class RawSection:
    """One C{[name]} section of one file."""

    name: str
    file: str
    line: int
    values: dict[str, RawValue] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    """Keys whose value already had a problem reported (by substitution)."""


def _stripComment(line: str) -> str:
    if line.strip().startswith(_COMMENT_PREFIXES):
        return ""
    end = len(line)
    for prefix in _COMMENT_PREFIXES:
        index = line.find(prefix)
        while index != -1:
            if index == 0 or line[index - 1].isspace():
                end = min(end, index)
                break
            index = line.find(prefix, index + 1)
    return line[:end].strip()


def readINI(text: str, file: str) -> tuple[list[RawSection], list[ConfigError]]:
    """
    Read the sections of C{text}.

    @param file: the name errors and sections carry.
    @return: the sections in file order (a duplicate section or key is
        reported and its first occurrence kept) and the syntax errors.
    """
    sections: list[RawSection] = []
    byName: dict[str, RawSection] = {}
    errors: list[ConfigError] = []
    section: RawSection | None = None
    current: RawValue | None = None
    continued: list[str] = []
    indentLevel = 0
    headerless = False

    def finish() -> None:
        if current is not None and continued:
            current.text = "\n".join([current.text, *continued]).strip()
        continued.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        value = _stripComment(line)
        if not value:
            # configparser (empty_lines_in_values=False): a blank or
            # comment-only line ends a multi-line value.
            indentLevel = sys.maxsize
            continue
        indent = len(line) - len(line.lstrip())
        if current is not None and indent > indentLevel:
            continued.append(value)
            continue
        finish()
        current = None
        indentLevel = indent
        if value.startswith("["):
            header = _SECTION_HEADER.match(value)
            if header is None:
                errors.append(
                    ConfigError(
                        f"expected a [section] header alone on its line, got {value!r}",
                        file, None, None, number,
                    )
                )
                # Its keys are read into a throwaway section: one error.
                section = RawSection(value, file, number)
                continue
            name = header.group("header")
            if name in byName:
                errors.append(
                    ConfigError(
                        f"duplicate section (first at line {byName[name].line}; "
                        "each section may appear once)",
                        file, name, None, number,
                    )
                )
                section = RawSection(name, file, number)
                continue
            section = byName[name] = RawSection(name, file, number)
            sections.append(section)
            continue
        if section is None:
            if not headerless:
                headerless = True
                errors.append(
                    ConfigError(
                        f"expected a [section] header before {value!r}", file, None, None, number
                    )
                )
            continue
        key, equals, rest = value.partition("=")
        key = key.rstrip()
        if not equals or not key:
            errors.append(
                ConfigError(
                    f"expected 'key = value' or a [section] header, got {value!r}",
                    file, None, None, number,
                )
            )
            continue
        if key in section.values:
            errors.append(
                ConfigError(
                    f"duplicate key (first at line {section.values[key].line}; "
                    "each key may appear once per section)",
                    file, section.name, key, number,
                )
            )
            current = RawValue(rest.strip(), number)  # swallow its continuation lines
            continue
        current = section.values[key] = RawValue(rest.strip(), number)
    finish()
    return sections, errors
