"""One validation step for the files flowray reads and the paths it will write, run before any slow work.

A text/config file that is missing, a directory, unreadable or not UTF-8 text, and an output that cannot be
written (a missing folder that cannot be made, ``/proc``, a directory where a file goes, a file where a
folder goes) each give one named error saying what arrived and how to fix it, never a traceback after the
model load and the computation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from flowray.errors import InputError


def read_text_file(path: str | Path, what: str = "file", *, error: type[Exception] = InputError,
                   hint: str = "") -> str:
    """The UTF-8 text of ``path``; ``error`` (InputError or ConfigError) for anything else."""
    path = Path(path)
    fix = f" ({hint})" if hint else ""
    if path.is_dir():
        raise error(f"{what} {str(path)!r} is a directory; expected a file{fix}")
    if not path.is_file():
        kind = "does not exist" if not path.exists() else "is not a regular file"
        raise error(f"{what} {str(path)!r} {kind}; check the path{fix}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{what} {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start}, line {line}: "
                    f"{data[exc.start:exc.start + 4]!r}); is it a binary file? Convert it to UTF-8 text") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise error(f"{what} {str(path)!r} holds NUL bytes (line {line}); it looks binary, expected UTF-8 text")
    return text


def check_output_file(path: str | Path, what: str = "--out", *, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` can be written as a file: its folder exists or is created, it is not a directory."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise InputError(f"{what} must end in {' or '.join(suffixes)}; got {str(path)!r}")
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is an existing directory; expected a file name")
    _make_dir(path.parent, what)
    _probe(path.parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{what} {str(path)!r} exists and cannot be overwritten (no write permission)")
    return path


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """``path`` is (or is created as) a writable directory; an existing file there is refused."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {str(path)!r} is an existing file; with --file it must be a directory "
                         "(one output per text): choose another name")
    _make_dir(path, what)
    _probe(path, what)
    return path


def _make_dir(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{what}: cannot create the folder {str(folder)!r} ({exc.strerror or exc}); "
                         "choose a writable location") from None


def _probe(folder: Path, what: str) -> None:
    """Create and remove a file: the only test that also catches /proc, read-only mounts and the like."""
    probe = folder / f".flowray-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{what}: cannot write into {str(folder)!r} ({exc.strerror or exc}); "
                         "choose a writable location") from None


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes, read in blocks (model weights run to gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 23):
            h.update(block)
    return h.hexdigest()
