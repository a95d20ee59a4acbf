"""Rules for values that the library, the job config and the CLI all accept: one rule each, in one place.

Standard library only, so config validation and the CLI use them without loading numpy or torch. Each
check raises the caller's FlowrayError subclass (InputError for library calls, ConfigError for configs).
"""

from __future__ import annotations

from flowray.errors import FlowrayError, InputError

TAU_RANGE = "strictly between 0 and 1"
# the importance kernels (flowray.kernels): auto picks cpu (numba) on CPUs, triton on CUDA, else torch
BACKENDS = ("auto", "cpu", "torch", "triton")


def check_tau(tau, *, name: str = "tau", error: type[FlowrayError] = InputError) -> float:
    """A route threshold: a number strictly between 0 and 1 (the paper uses 0.01 to 0.04).

    At 0 nothing with a positive importance is ever pruned (the route is the whole graph), at 1 or more
    everything is; neither is a route, so the library, the config and the CLI all refuse both.
    """
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0 < float(tau) < 1:
        raise error(f"{name} must be a number {TAU_RANGE}; got {tau!r} (the paper uses 0.01 to 0.04)")
    return float(tau)


def check_weights_loaded(model) -> None:
    """InputError when a torch model's weights are on the meta device (shapes without values).

    Such a model comes from ``init_empty_weights``, ``device_map="meta"`` or a constructor run under
    ``torch.device("meta")``: its forward pass computes nothing, and the first number read from it fails
    deep inside the maths. Duck-typed (``named_parameters`` / ``is_meta``), so this module needs no torch.
    """
    named = getattr(model, "named_parameters", None)
    if named is None:
        return
    meta = next((name for name, p in named() if getattr(p, "is_meta", False)), None)
    if meta is not None:
        raise InputError(
            f"the model's weights are on the meta device (shapes only, no values; first: {meta!r}), so nothing "
            "can be computed from them; load the weights, e.g. flowray.load_model(spec) or "
            "AutoModelForCausalLM.from_pretrained(path) without device_map='meta' / init_empty_weights")
