"""Named errors. Each message says what was wrong, what was expected, and how to fix it."""

from __future__ import annotations


class FlowrayError(Exception):
    """Base class of every error flowray raises on purpose (bad input, unsupported model, bad config)."""


class InputError(FlowrayError, ValueError):
    """User input (text, tau, position, file) that cannot be used."""


class UnknownModelError(FlowrayError, ValueError):
    """A model spec that is neither an alias, a local directory/GGUF file, nor a loadable hub id."""


class UnsupportedArchitectureError(FlowrayError, ValueError):
    """A model whose architecture has no adapter, or whose config flowray cannot decompose exactly."""


class ConfigError(FlowrayError, ValueError):
    """A job config with unknown keys, wrong types or impossible values."""


class MissingDependencyError(FlowrayError, ImportError):
    """An optional library is needed for this feature; the message names the pip command."""


def require(module: str, pip_name: str | None = None, feature: str = "this feature"):
    """Import an optional module or raise MissingDependencyError naming the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{feature} needs the {module!r} package, which is not installed; "
            f"install it with `pip install {pip_name or module}`"
        ) from exc


class UnsupportedVersionError(FlowrayError, ImportError):
    """An installed library outside the versions whose internals flowray knows; the message names the pip command."""


class Terminated(KeyboardInterrupt):
    """The process was sent SIGTERM: it stops as an interrupt does (cleanup runs; the CLI exits with 143)."""

