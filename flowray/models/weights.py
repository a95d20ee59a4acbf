"""Are a model's weights there and whole? Read from file headers only: no tensor is loaded.

The corpus job's driver loads only the tokenizer (the actors load the model), so a model folder with a
valid tokenizer and missing or truncated weights would otherwise fail in every actor, inside Ray's
tracebacks. ``check_weights`` finds that once, on the driver, in milliseconds.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from flowray.errors import UnknownModelError

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= size - 8:
                return f"{path.name} has no valid header ({size:,} bytes: truncated or not safetensors)"
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return f"{path.name} has an unreadable header ({type(exc).__name__}: {exc})"
    if size < 8 + n + end:
        return f"{path.name} is {size:,} bytes but its header describes {8 + n + end:,} (truncated)"
    return None


def _file_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    with open(path, "rb") as fh:
        zipped = fh.read(2) == b"PK"  # torch.save's zip format (older pickles are read as they are)
    if path.stat().st_size == 0 or (zipped and not zipfile.is_zipfile(path)):
        return f"{path.name} is empty or truncated (its zip directory is missing)"
    return None


def weights_problem(folder: Path) -> str | None:
    """None when the HF model folder's weights are present and whole, else what is wrong."""
    for name in _INDEXES:
        index = folder / name
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                return f"{name} is not a readable weight index ({type(exc).__name__}: {exc})"
            return next((p for p in map(_file_problem, (folder / f for f in files)) if p), None)
    for name in _SINGLE:
        if (folder / name).exists():
            return _file_problem(folder / name)
    return f"it holds no weights ({', '.join(_SINGLE + _INDEXES)})"


def check_weights(spec: str, *, base_model: str | None = None) -> None:
    """UnknownModelError when ``spec`` is a local model folder (or a PEFT adapter over one) whose weights are
    missing or truncated. Aliases, .gguf files and hub ids are checked by their own loaders."""
    from flowray.models.loading import peft_adapter_base

    peft = peft_adapter_base(spec, base_model)
    folder = Path(spec if peft is None else peft[0]).expanduser()
    if not folder.is_dir():
        return
    problem = weights_problem(folder)
    if problem:
        raise UnknownModelError(f"model directory {str(folder)!r} cannot be loaded: {problem}; copy or download "
                                "the model again (a tokenizer alone is not a model)")
