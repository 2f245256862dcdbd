"""The installed storegate's version (``storegate --version``, ``storegate-hq --version``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("storegate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
