"""Importance kernels behind one interface (``base.Kernel``), one backend per file, chosen once per call.

``select_kernel(backend, device)`` resolves ``"auto"``: ``"cpu"`` (numba loops) for CPU tensors when numba
is installed, ``"triton"`` on CUDA when triton imports, else ``"torch"``. Only ``triton_*.py`` import
triton; a missing triton on CUDA falls back to torch with one log line under ``"auto"`` and is an error
when ``"triton"`` is asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from flowray.checks import BACKENDS
from flowray.errors import InputError, MissingDependencyError
from flowray.kernels.base import Block, BlockOut, HeadOutputs, HitSlots, Kernel, KernelConfig

__all__ = ["BACKENDS", "Block", "BlockOut", "HeadOutputs", "HitSlots", "Kernel", "KernelConfig", "resolve_backend",
           "select_kernel"]

log = logging.getLogger(__name__)
_warned: set = set()


def _triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    from flowray.kernels.triton_available import triton_imports

    return triton_imports()


def _numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def resolve_backend(backend: str, device) -> str:
    """``"auto"`` -> a concrete backend for ``device``; a bad name or an impossible pairing is a clear error."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {list(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if _numba_available() else "torch"
        if device.type == "cuda" and _triton_available():
            return "triton"
        if device.type == "cuda" and "triton" not in _warned:
            _warned.add("triton")
            log.info("triton is not installed: the importance kernel runs on the slower torch backend "
                     "(pip install triton)")
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise InputError(f"backend 'cpu' needs CPU tensors; got tensors on {device} (use 'torch' or 'auto')")
        if not _numba_available():
            raise MissingDependencyError("backend 'cpu' needs numba: pip install numba (or use backend='torch')")
    if backend == "triton":
        if not _triton_available():
            raise MissingDependencyError("backend 'triton' needs triton: pip install triton (or use backend='auto')")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise InputError(f"backend 'triton' needs a CUDA device; got device {str(device)!r} (use 'auto'; "
                             "TRITON_INTERPRET=1 runs it on the CPU, slowly, for testing)")
    return backend


def select_kernel(backend: str, device, config: KernelConfig | None = None) -> Kernel:
    """The kernel object for ``backend`` on ``device`` (see ``resolve_backend``)."""
    name = resolve_backend(backend, device)
    if name == "cpu":
        from flowray.kernels.cpu import CpuKernel

        return CpuKernel(config)
    if name == "torch":
        from flowray.kernels.torch_kernel import TorchKernel

        return TorchKernel(config)
    from flowray.kernels.triton_kernel import TritonKernel

    return TritonKernel(config)
