"""The transformers versions whose internals flowray knows, checked when a model is loaded.

flowray reaches into transformers' attention interface, masking utilities and modeling modules (the
adapters, ``flowray.models.attention``); a release outside the window below may move them, and the failure
would come deep inside a forward pass. The window runs from pyproject's minimum to the last major flowray
has been tested with; the exact versions the suite passed with are in ``constraints.txt``.
"""

from __future__ import annotations

import importlib.metadata
import re

from flowray.errors import MissingDependencyError, UnsupportedVersionError

# [minimum, first unsupported): the same range as pyproject's `transformers` requirement (a test checks)
TRANSFORMERS_WINDOW = ("4.57", "6")


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """``"5.24.0"`` -> ``(5, 24, 0)``; pre-release and local parts are ignored (``"6.0.0.dev1"`` is 6.0.0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise UnsupportedVersionError(f"cannot read the version string {version!r}; expected e.g. '5.24.0'")
    return tuple(int(part) for part in match.group(1).split("."))


def check_transformers(version: str | None = None) -> str:
    """Raise UnsupportedVersionError unless transformers (``version``, default: the installed one) lies in
    ``TRANSFORMERS_WINDOW``; return the version."""
    low, high = TRANSFORMERS_WINDOW
    spec = f">={low},<{high}"
    version = installed_version("transformers") if version is None else version
    if version is None:
        raise MissingDependencyError(f"flowray needs transformers{spec}; install it with `pip install 'transformers{spec}'`")
    if not _release(low) <= _release(version) < _release(high):
        raise UnsupportedVersionError(
            f"transformers {version} is installed, but flowray supports transformers{spec} (the versions whose "
            f"attention interface, masking utilities and module names it knows); install a supported one with "
            f"`pip install 'transformers{spec}'`, or the tested versions with `pip install -c constraints.txt -e .` "
            "in a flowray checkout"
        )
    return version
