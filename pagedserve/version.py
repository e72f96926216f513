"""The version the CLI and both APIs report (`--version`, ``/version``, ``/api/version``) and the
registry client sends as its user agent: the installed package's."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pagedserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
