"""Names that survive a power cut: a file's data is durable after its fsync,
but its name (a new file, a new directory, a rename) only after the
directory holding it is synced."""

from __future__ import annotations

import os
from pathlib import Path


def sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path, mode: int = 0o777) -> None:
    """Create a directory and its missing parents, each one durable in its
    parent's entries (a power cut would otherwise lose a new store whole)."""
    directory = Path(directory)
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(mode=mode, exist_ok=True)
        sync_dir(d.parent)
