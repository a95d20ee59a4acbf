"""argparse types shared by the CLI modules (``flowray.cli``, ``flowray.pipeline.cli``, later subcommands).

Only CLI modules import this one; the rules themselves live in the library (``flowray.checks``), so the
CLI, the job config and the library accept exactly the same values.
"""

from __future__ import annotations

import argparse
import sys

from flowray.checks import check_tau
from flowray.errors import InputError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line and status 2, like every other bad input.

    argparse's own ``error`` prints the whole usage block first, which buries the one line that says what
    was wrong; the line here points at ``--help`` instead. Subparsers inherit the class.
    """

    def error(self, message: str):
        print(f"{self.prog}: error: {message}; see '{self.prog} --help'", file=sys.stderr)
        sys.exit(2)


def tau_arg(value: str) -> float:
    """argparse type: a route threshold strictly inside (0, 1) (``flowray.checks.check_tau``)."""
    try:
        tau = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tau must be a number in (0, 1); got {value!r}") from None
    try:
        return check_tau(tau)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value!r}")
    return n


def positive_float(value: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {value!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number; got {value!r}")
    return x


def positive_ints(value: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers like ``1,5,10``."""
    try:
        ks = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,5,10; got {value!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {value!r}")
    return ks


def backend_arg(value: str) -> str:
    """argparse type: an importance backend of ``flowray.checks.BACKENDS`` (``flowray.kernels``)."""
    from flowray.checks import BACKENDS

    if value not in BACKENDS:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(map(repr, BACKENDS))})")
    return value
