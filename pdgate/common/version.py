"""The installed pdgate version."""

from importlib import metadata


def package_version() -> str | None:
    """The installed pdgate version (``None`` when run from a tree that was never installed)."""
    try:
        return metadata.version("pdgate")
    except metadata.PackageNotFoundError:
        return None
