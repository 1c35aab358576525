"""
edgeproxy/ is mypy clean (STYLE.md), with the configuration in setup.cfg
(the zope.interface plugin Twisted's own typing needs; mypy and the plugin
pinned in the test extra, so that a release of either does not move this).
"""

from __future__ import annotations

import os
from pathlib import Path

from mypy import api

REPO = Path(__file__).resolve().parent.parent


def test_mypyFindsNothing(tmp_path: Path) -> None:
    """
    mypy on edgeproxy/ reports no error; its report is the failure message,
    one line per error (file, line, what and its code).
    """
    here = os.getcwd()
    os.chdir(REPO)
    try:
        report, errors, status = api.run(["--cache-dir", str(tmp_path / "cache"), "--no-error-summary"])
    finally:
        os.chdir(here)
    assert status == 0 and not errors, report + errors
