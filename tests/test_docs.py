"""
The documents render: every reStructuredText file of the project parses
without an error or a warning (a table whose column overflows, a list
without its blank line), as a reader's renderer would show them.
"""

from __future__ import annotations

from pathlib import Path

import docutils.core
import docutils.utils
import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([REPOSITORY / "README.rst", *(REPOSITORY / "docs").glob("*.rst")])


@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_documentRendersCleanly(path: Path) -> None:
    problems: list[str] = []

    def collect(message: object) -> None:
        problems.append(str(message))

    settings = {"report_level": 5, "halt_level": 5, "warning_stream": False}
    document = docutils.core.publish_doctree(
        path.read_text(encoding="utf-8"), source_path=str(path), settings_overrides=settings
    )
    for node in document.findall(docutils.nodes.system_message):
        if node["level"] >= docutils.utils.Reporter.WARNING_LEVEL:
            problems.append(node.astext())
    assert problems == []
