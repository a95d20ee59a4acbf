"""What the text commands (``flowray route``, ``importances``, ``explore``) share: their model and text options,
reading and checking the texts, loading the model and the progress bar.

Every CLI module imports this one and it imports none of them, so the main CLI and the subcommands' CLIs
never import each other (the main one only registers them). Heavy imports happen inside the functions:
``flowray --help`` loads no torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from flowray.cli_types import backend_arg, positive_int
from flowray.errors import InputError
from flowray.models.dtypes import DTYPES

log = logging.getLogger("flowray")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="alias 'smollm2' (packaged SmolLM2-135M), a HF model directory, a .gguf file or a hub id")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")


def add_text_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="one text")
    src.add_argument("--file", type=Path,
                     help="several texts: a .txt file (one text per non-blank line) or .jsonl with a 'text' field")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="keep only the first N tokens of each text (needed for texts longer than the context)")
    add_bos_argument(p)
    p.add_argument("--backend", type=backend_arg, default="auto",
                   help="importance kernel: 'cpu' (compiled loops, CPU only), 'triton' (NVIDIA GPUs), 'torch' "
                   "(any device) or 'auto' (cpu on the CPU, triton on a GPU when installed, else torch)")
    p.add_argument("--chunk-size", type=positive_int, default=None,
                   help="torch and triton backends: query positions per block; bounds their peak extra memory "
                   "(~ heads x chunk x tokens floats)")


def add_bos_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-bos", dest="prepend_bos", action="store_false",
                   help="do not put a BOS at position 0 (default: the tokenizer's BOS, else the model's document "
                   "separator such as <|endoftext|>, as the corpus job does)")


def texts_from_args(args) -> list[str]:
    """The texts of ``add_text_args``: ``--text`` alone, or every text of ``--file``."""
    return [args.text] if args.text is not None else read_texts(args.file)


def read_texts(path: Path) -> list[str]:
    """Texts from a .txt (one per non-blank line) or .jsonl ('text' field) file."""
    from flowray.io_checks import read_text_file

    lines = read_text_file(path, "text file").splitlines()  # missing, a directory, binary: InputError
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{n}: not valid JSON ({exc.msg}); expected one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f"{path}:{n}: expected an object with a string 'text' field; got {line[:60]!r}")
            texts.append(record["text"])
    else:
        texts = [line for line in lines if line.strip()]
    if not texts:
        raise InputError(f"text file {str(path)!r} holds no texts; expected one text per non-blank line")
    return texts


def check_texts(texts: list[str], many: bool = False) -> None:
    """Reject an empty --text before the (slow) model load (with --file, an empty text is one failure)."""
    for text in texts:
        if not text.strip() and not many:
            raise InputError(f"text is empty or only whitespace; got {text!r}; give at least one word")


def progress(items, total: int, desc: str):
    """A bar on stderr over the texts, shown only when there are several."""
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="text", disable=total < 2, file=sys.stderr)


def load_model_from_args(args):
    """The model of ``add_model_args``."""
    from flowray.models.loading import load_model

    if getattr(args, "backend", "auto") != "auto":  # a kernel the device cannot run fails before the model loads
        import torch

        from flowray.kernels import resolve_backend

        device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        resolve_backend(args.backend, device)
    log.info("loading model %s", args.model)
    return load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
