"""
L{edgeproxy.acme.storage}: the layout, atomic writes, key modes and the
per-name lock (held across processes).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.acme.storage import Storage, directoryId, writeAtomically


def test_directoryId() -> None:
    assert directoryId("https://acme-v02.api.letsencrypt.org/directory") == "acme-v02.api.letsencrypt.org-directory"
    assert directoryId("https://127.0.0.1:14000/dir") == "127.0.0.1-14000-dir"


def test_saveAndLoad(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "acme"), "https://ca.example/dir")
    storage.prepare()
    assert stat.S_IMODE(os.stat(storage.root).st_mode) == 0o700
    assert storage.load("a.example") is None
    stored = storage.save("a.example", b"CERT", b"KEY", {"obtained": "now"})
    assert Path(stored.certificatePath).read_bytes() == b"CERT"
    assert stat.S_IMODE(os.stat(stored.keyPath).st_mode) == 0o600
    assert stored.keyPath == str(tmp_path / "acme/certificates/ca.example-dir/a.example/key.pem")
    assert storage.load("a.example").meta == {"obtained": "now"}  # type: ignore[union-attr]
    storage.saveAccountKey(b"ACCOUNT")
    assert stat.S_IMODE(os.stat(os.path.join(storage.accountFolder, "account.key")).st_mode) == 0o600
    # No temporary file is left behind.
    assert sorted(os.listdir(os.path.dirname(stored.keyPath))) == ["certificate.pem", "key.pem", "meta.json"]


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "A.example"])
def test_unsafeNamesRefused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        Storage(str(tmp_path), "https://ca.example/dir").folder(name)


def test_writeAtomicallyReplaces(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    before = path.stat().st_ino
    writeAtomically(str(path), b"new", 0o640)
    assert path.read_bytes() == b"new" and path.stat().st_ino != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_lockIsExclusiveAcrossProcesses(tmp_path: Path) -> None:
    """Another process (another machine on shared storage) cannot take a held lock."""
    storage = Storage(str(tmp_path), "https://ca.example/dir")
    lock = storage.lock("a.example")
    assert lock.acquire()
    probe = (
        "import sys; from edgeproxy.acme.storage import Storage;"
        f"print(Storage({str(tmp_path)!r}, 'https://ca.example/dir').lock('a.example').acquire())"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    held = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=30)
    assert held.stdout.strip() == "False", held.stderr
    lock.release()
    free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=30)
    assert free.stdout.strip() == "True", free.stderr
