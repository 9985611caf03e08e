"""Debian's Chromium for browser tests, driven by Playwright's Python API.

Playwright is launched on the Debian executable (``chromium``), never on a browser build of
its own, so nothing is downloaded: on a machine without Chromium the package is installed
with apt-get when running as root, as ``pg_server`` does for PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "/usr/bin/chromium-browser")


def _found() -> str | None:
    for candidate in (shutil.which("chromium"), *_CANDIDATES):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def chromium_executable(install: bool = True) -> str:
    """The path of Debian's Chromium, installing the package if it is missing (root + apt)."""
    found = _found()
    if found is None and install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                       check=True, env=env, capture_output=True, timeout=1200)
        found = _found()
    if found is None:
        raise RuntimeError("Chromium is not installed and cannot be installed here (apt-get install chromium)")
    return found


def artifact_dir(name: str) -> Path:
    """Where a test keeps its screenshots (``test-artifacts/<name>``, git-ignored)."""
    path = ARTIFACTS / name
    path.mkdir(parents=True, exist_ok=True)
    return path
