"""Rules for values that the library, the job config and the CLI all accept: one rule each, in one place.

Standard library only, so config validation and the CLI use them without loading numpy or torch. Each
check raises the caller's FlowrayError subclass (InputError for library calls, ConfigError for configs).
"""

from __future__ import annotations

from flowray.errors import FlowrayError, InputError

TAU_RANGE = "strictly between 0 and 1"


def check_tau(tau, *, name: str = "tau", error: type[FlowrayError] = InputError) -> float:
    """A route threshold: a number strictly between 0 and 1 (the paper uses 0.01 to 0.04).

    At 0 nothing with a positive importance is ever pruned (the route is the whole graph), at 1 or more
    everything is; neither is a route, so the library, the config and the CLI all refuse both.
    """
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0 < float(tau) < 1:
        raise error(f"{name} must be a number {TAU_RANGE}; got {tau!r} (the paper uses 0.01 to 0.04)")
    return float(tau)
