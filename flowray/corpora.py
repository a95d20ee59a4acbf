"""Corpus sources: each source dict (one "domain" of a corpus job) yields ``Document`` records.

Kinds and their keys (``validate_source`` fills in the defaults shown):

    {"kind": "hf", "path": "allenai/c4", "name": None, "split": "train", "text_field": "text",
     "streaming": True, "data_files": None, "cache_dir": None, "meta_fields": [], "max_chars": None}
        datasets.load_dataset(path, name, split=..., streaming=..., data_files=..., cache_dir=...);
        a local file goes through the same code path as path="json" / "parquet" with data_files.
    {"kind": "jsonl", "paths": [...], "text_field": "text", "meta_fields": [], "base_dir": None, "max_chars": None,
     "skip_bad_lines": False}
        a line that is not a UTF-8 JSON object stops the job (naming the line) unless skip_bad_lines is true.
    {"kind": "parquet", "paths": [...], "text_field": "text", "meta_fields": [], "base_dir": None, "max_chars": None}
    {"kind": "text", "paths": [...], "mode": "lines", "base_dir": None, "max_chars": None}
        "lines": one document per line (FLORES devtest files); "file": one document per file.
    {"kind": "stdlib_code", "max_chars": 20000}
        the running Python's standard library .py files (no test folders, no site-packages), sorted.
    {"kind": "pydoc_topics", "max_chars": None}
        English prose: pydoc_data.topics.topics (topic -> help text), sorted by topic.
    {"kind": "task", "task": "ioi", "variant": "original", "n": 1000, "seed": None, ...task options}
        flowray.tasks prompts (variant "contrastive": their twins); options as flowray.tasks.TASK_OPTIONS.
        meta holds task, variant, template, answer, wrong and the prompt's meta; in both variants answer
        and wrong are the *original* prompt's (on a twin they are the pair to compare, not its answer).
        Arithmetic texts are the prompt followed by its whole answer (``prompt_chars`` = where the answer
        starts: each generation step is a prediction); IOI / greater-than texts are the prompt, with
        ``source_chars``, the character span of the indirect object / the start year's YY.

Paths: a file or a glob (``*``, ``?``, ``[``, recursive ``**``); relative ones are resolved against
``base_dir`` when given, else against the current directory (resolve them before shipping a source to
workers with another working directory). Missing files raise ConfigError when ``iter_documents`` is
called, not in ``validate_source``, which never touches the file system.

Document ids are deterministic: ``{file}:{row:06d}`` for row-based files (``file`` is the path relative
to the matched files' common folder, so one file gives its name, e.g. "eng_Latn.devtest:000017"; the
row of a JSONL record is its 0-based line number, blank lines counted),
``{file}`` in text "file" mode, ``{dataset}:{row:06d}`` for hf (the last part of ``path``, e.g.
"c4:000017"), ``stdlib:json/decoder.py``, ``pydoc:assert`` and ``{task}:{index:04d}`` (the same index
in the "original" and "contrastive" variants is one pair). Empty texts (and nulls) are yielded as ""
documents; the pipeline turns them into error rows. ``max_chars`` truncates long texts, at the last
line break in the second half of the kept part when there is one.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowray.errors import ConfigError, InputError

_log = logging.getLogger(__name__)

SOURCE_KINDS = ("hf", "jsonl", "parquet", "text", "stdlib_code", "pydoc_topics", "task")
TEXT_MODES = ("lines", "file")
TASK_VARIANTS = ("original", "contrastive")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Document:
    """One text of a domain, with a stable id and small JSON-serialisable extras."""

    doc_id: str  # stable, deterministic id within the domain, e.g. "c4:000017", "stdlib:json/decoder.py"
    text: str
    meta: dict  # e.g. {"file": ..., "row": ...} or a task prompt's answer / wrong / template


# ------------------------------------------------------------------------------------- validation


def _fail(kind: str, what: str, allowed: str, got: Any, fix: str = "") -> ConfigError:
    message = f"source of kind {kind!r}: {what}; allowed: {allowed}; got {got!r}"
    return ConfigError(message + (f"; {fix}" if fix else ""))


def _string(kind: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(kind, f"{key!r} must be a non-empty string", "a string", value)
    return value


def _optional_string(kind: str, key: str, value: Any) -> str | None:
    return None if value is None else _string(kind, key, value)


def _flag(kind: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(kind, f"{key!r} must be true or false", "true, false", value)
    return value


def _count(kind: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(kind, f"{key!r} must be an integer >= {minimum}", f"integers >= {minimum}", value)
    return value


def _optional_count(kind: str, key: str, value: Any) -> int | None:
    return None if value is None else _count(kind, key, value, 1)


def _string_list(kind: str, key: str, value: Any) -> list[str]:
    """A string or a list of strings, as a list (a single path may be written without brackets)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v for v in items):
        raise _fail(kind, f"{key!r} must be a string or a list of non-empty strings", "['a.jsonl', 'dir/*.jsonl']",
                    value)
    return list(items)


def _path_list(kind: str, key: str, value: Any) -> list[str]:
    paths = _string_list(kind, key, value)
    if not paths:
        raise _fail(kind, f"{key!r} must name at least one file or glob", "['a.jsonl', 'dir/*.jsonl']", value)
    return paths


def _choice(allowed: tuple[str, ...]) -> Callable[[str, str, Any], str]:
    def check(kind: str, key: str, value: Any) -> str:
        if value not in allowed:
            raise _fail(kind, f"{key!r} is not a known value", str(list(allowed)), value)
        return value

    return check


def _data_files(kind: str, key: str, value: Any):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _string_list(kind, f"{key}.{k}", v) for k, v in value.items()}
    raise _fail(kind, f"{key!r} must be a path, a list of paths or a split -> paths mapping", "str, list, dict", value)


def _seed(kind: str, key: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(kind, f"{key!r} must be an integer (or null to use iter_documents' seed)", "integers, null", value)
    return value


# Per kind: key -> (default, checker); _REQUIRED marks keys without a default.
_REQUIRED = object()
_FILES = {"paths": (_REQUIRED, _path_list), "base_dir": (None, _optional_string), "max_chars": (None, _optional_count)}
_ROWS = {**_FILES, "text_field": ("text", _string), "meta_fields": ([], _string_list)}
_SPECS: dict[str, dict[str, tuple[Any, Callable]]] = {
    "hf": {
        "path": (_REQUIRED, _string),
        "name": (None, _optional_string),
        "split": ("train", _string),
        "text_field": ("text", _string),
        "streaming": (True, _flag),  # C4 and the like are far too big to download for the first N rows
        "data_files": (None, _data_files),
        "cache_dir": (None, _optional_string),
        "meta_fields": ([], _string_list),
        "max_chars": (None, _optional_count),
    },
    "jsonl": {**_ROWS, "skip_bad_lines": (False, _flag)},  # true: a line that is not a JSON object is skipped
    "parquet": _ROWS,
    "text": {**_FILES, "mode": ("lines", _choice(TEXT_MODES))},
    "stdlib_code": {"max_chars": (20_000, _optional_count)},  # a few stdlib files are 100s of kB
    "pydoc_topics": {"max_chars": (None, _optional_count)},
    "task": {
        "task": (_REQUIRED, None),  # checked with the task options below
        "variant": ("original", _choice(TASK_VARIANTS)),
        "n": (1000, lambda kind, key, value: _count(kind, key, value, 0)),  # the paper uses 1000 per domain
        "seed": (None, _seed),
    },
}


def validate_source(source: dict) -> dict:
    """The source with defaults filled in and values checked; ConfigError says what is wrong and how to fix it.

    Pure: reads no files (missing files are reported by ``iter_documents``).
    """
    if not isinstance(source, dict):
        raise ConfigError(f"a corpus source must be a mapping with a 'kind' key; got {source!r}")
    kind = source.get("kind")
    if kind not in SOURCE_KINDS:
        raise ConfigError(
            f"corpus source 'kind' must be one of {list(SOURCE_KINDS)}; got {kind!r}; "
            f"e.g. {{'kind': 'jsonl', 'paths': ['data/*.jsonl'], 'text_field': 'text'}}"
        )
    spec = dict(_SPECS[kind])
    if kind == "task":
        spec.update(_task_option_specs(source.get("task")))
    unknown = sorted(set(source) - set(spec) - {"kind"})
    if unknown:
        raise _fail(kind, f"unknown key(s) {unknown}", str(sorted(spec)), source, "remove or rename them")
    normalised = {"kind": kind}
    for key, (default, check) in spec.items():
        if key not in source:
            if default is _REQUIRED:
                raise _fail(kind, f"the key {key!r} is required", str(sorted(spec)), source, f"add {key!r}")
            normalised[key] = list(default) if isinstance(default, list) else default
        else:
            normalised[key] = check(kind, key, source[key]) if check else source[key]
    return normalised


def _task_option_specs(task: Any) -> dict[str, tuple[Any, Callable]]:
    from flowray.tasks import TASK_OPTIONS, TASKS

    if task not in TASKS:
        raise _fail("task", "'task' must name a generated task set", str(list(TASKS)), task)
    options = {"task": (_REQUIRED, None)}
    for key, allowed in TASK_OPTIONS[task].items():
        options[key] = (allowed[0], _choice(allowed))
    return options


# ---------------------------------------------------------------------------------------- helpers


def _truncate(text: str, max_chars: int | None) -> str:
    """At most max_chars characters, cut after a line break when one falls in the second half."""
    if max_chars is None or len(text) <= max_chars:
        return text
    kept = text[:max_chars]
    cut = kept.rfind("\n")
    return kept[: cut + 1] if cut >= max_chars // 2 else kept


def _resolve_paths(kind: str, entries: list[str], base_dir: str | None) -> list[Path]:
    """Existing files named by ``entries`` (paths or globs), in order, each once."""
    base = Path(base_dir).expanduser() if base_dir else Path.cwd()
    files: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else base / path
        if _GLOB_CHARS & set(entry):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True) if os.path.isfile(m))
            if not matches:
                raise _fail(kind, f"no file matches the pattern {entry!r} (looked for {str(path)!r})",
                            "existing files or globs", entry, "check the path or set base_dir")
            files += matches
        elif path.is_file():
            files.append(path)
        else:
            raise _fail(kind, f"file not found: {entry!r} (resolved to {str(path)!r})",
                        "existing files or globs", entry, "check the path or set base_dir")
    return list(dict.fromkeys(files))


def _labels(files: list[Path]) -> list[str]:
    """Each file's path relative to the files' common folder: short, unique and independent of the cwd."""
    if not files:
        return []
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return [f.relative_to(root).as_posix() for f in files]


def _text_value(value: Any, field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(
            f"{where}: the text field {field!r} holds a {type(value).__name__}, expected a string; got {value!r:.80}"
        )
    return value


def _missing_field(kind: str, field: str, available: list[str], where: str) -> ConfigError:
    return _fail(kind, f"{where} has no field {field!r}", f"its fields {sorted(available)}", field,
                 "set text_field / meta_fields to existing fields")


# ---------------------------------------------------------------------------------------- readers


def _json_object(raw: bytes) -> tuple[dict | None, str | None]:
    """One JSONL line as ``(record, None)``, or ``(None, why it is not a JSON object)``."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except ValueError as exc:  # bad JSON; also an integer too long to convert
        return None, getattr(exc, "msg", str(exc))
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    return record, None


def _read_jsonl(src: dict, **_) -> Iterator[Document]:
    files = _resolve_paths("jsonl", src["paths"], src["base_dir"])
    fields = [src["text_field"], *src["meta_fields"]]

    def documents() -> Iterator[Document]:
        for path, label in zip(files, _labels(files), strict=True):
            with open(path, "rb") as f:  # decoded line by line, so a bad line names its number
                for row, raw in enumerate(f):
                    if not raw.strip():
                        continue  # a blank line holds no record
                    where = f"{path}:{row + 1}"
                    record, reason = _json_object(raw)
                    if reason is not None:
                        if src.get("skip_bad_lines"):
                            _log.warning("%s: skipped, not a UTF-8 JSON object (%s)", where, reason)
                            continue
                        raise InputError(
                            f"{where}: not a JSON object ({reason}); each line of a JSONL file must be one "
                            "(set skip_bad_lines: true in the source to skip such lines)"
                        )
                    for field in fields:
                        if field not in record:
                            raise _missing_field("jsonl", field, list(record), f"record {where}")
                    yield _row_document(label, row, record, src)

    return documents()


def _row_document(label: str, row: int, record: dict, src: dict) -> Document:
    text = _text_value(record[src["text_field"]], src["text_field"], f"{label} row {row}")
    meta = {"file": label, "row": row, **{k: record[k] for k in src["meta_fields"]}}
    return Document(f"{label}:{row:06d}", _truncate(text, src["max_chars"]), meta)


def _read_parquet(src: dict, **_) -> Iterator[Document]:
    import pyarrow.parquet as pq

    files = _resolve_paths("parquet", src["paths"], src["base_dir"])
    fields = [src["text_field"], *src["meta_fields"]]
    opened = [pq.ParquetFile(path) for path in files]
    for path, pf in zip(files, opened, strict=True):  # check every file's columns before yielding anything
        for field in fields:
            if field not in pf.schema_arrow.names:
                raise _missing_field("parquet", field, pf.schema_arrow.names, f"file {str(path)!r}")

    def documents() -> Iterator[Document]:
        for pf, label in zip(opened, _labels(files), strict=True):
            row = 0
            for batch in pf.iter_batches(batch_size=1024, columns=list(dict.fromkeys(fields))):
                for record in batch.to_pylist():
                    yield _row_document(label, row, record, src)
                    row += 1

    return documents()


def _read_text(src: dict, **_) -> Iterator[Document]:
    files = _resolve_paths("text", src["paths"], src["base_dir"])

    def documents() -> Iterator[Document]:
        for path, label in zip(files, _labels(files), strict=True):
            try:
                with open(path, encoding="utf-8") as f:  # universal newlines: \r\n ends a line too
                    if src["mode"] == "file":
                        yield Document(label, _truncate(f.read(), src["max_chars"]), {"file": label})
                        continue
                    for row, line in enumerate(f):
                        text = _truncate(line.removesuffix("\n"), src["max_chars"])
                        yield Document(f"{label}:{row:06d}", text, {"file": label, "row": row})
            except UnicodeDecodeError as exc:
                raise InputError(f"{path} is not UTF-8 text ({exc}); convert it or use another kind") from exc

    return documents()


def _read_hf(src: dict, **_) -> Iterator[Document]:
    import datasets

    try:
        ds = datasets.load_dataset(src["path"], src["name"], split=src["split"], streaming=src["streaming"],
                                   data_files=src["data_files"], cache_dir=src["cache_dir"])
    except (OSError, ValueError) as exc:  # not found / offline / bad split or config name
        raise ConfigError(
            f"source of kind 'hf': datasets.load_dataset could not load path={src['path']!r} name={src['name']!r} "
            f"split={src['split']!r}: {exc}; check these keys (offline, only local files and cached datasets load)"
        ) from exc
    fields = [src["text_field"], *src["meta_fields"]]
    columns = ds.column_names  # None for some streaming datasets: then each record is checked
    for field in fields:
        if columns is not None and field not in columns:
            raise _missing_field("hf", field, columns, f"dataset {src['path']!r}")
    label = src["path"].rstrip("/").rsplit("/", 1)[-1]

    def documents() -> Iterator[Document]:
        for row, record in enumerate(ds):
            for field in fields:
                if field not in record:
                    raise _missing_field("hf", field, list(record), f"dataset {src['path']!r} row {row}")
            text = _text_value(record[src["text_field"]], src["text_field"], f"{label} row {row}")
            meta = {"row": row, **{k: record[k] for k in src["meta_fields"]}}
            yield Document(f"{label}:{row:06d}", _truncate(text, src["max_chars"]), meta)

    return documents()


def stdlib_files() -> list[tuple[str, Path]]:
    """(posix path relative to the stdlib folder, file) for the standard library's own .py files, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS]  # prune: site-packages alone has 10k+ files
        for name in names:
            if name.endswith(".py"):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _read_stdlib(src: dict, **_) -> Iterator[Document]:
    import tokenize

    files = stdlib_files()

    def documents() -> Iterator[Document]:
        for rel, path in files:
            with tokenize.open(path) as f:  # honours PEP 263 coding cookies
                code = f.read()
            text = _truncate(code, src["max_chars"])
            yield Document(f"stdlib:{rel}", text, {"path": rel, "chars": len(code), "truncated": len(text) < len(code)})

    return documents()


def _read_pydoc(src: dict, **_) -> Iterator[Document]:
    from pydoc_data.topics import topics

    return (Document(f"pydoc:{topic}", _truncate(topics[topic], src["max_chars"]), {"topic": topic})
            for topic in sorted(topics))


def _read_task(src: dict, *, limit: int | None, seed: int, tokenizer) -> Iterator[Document]:
    from flowray.tasks import TASK_OPTIONS, task_prompts

    task = src["task"]
    count = src["n"] if limit is None else min(src["n"], limit)  # prompts are prefix-stable in n
    options = {key: src[key] for key in TASK_OPTIONS[task]}
    seed = src["seed"] if src["seed"] is not None else seed
    try:
        prompts = task_prompts(task, count, seed=seed, tokenizer=tokenizer, **options)
    except InputError as exc:
        raise ConfigError(f"source of kind 'task': {exc}") from exc
    contrastive = src["variant"] == "contrastive"
    return (Document(f"{task}:{i:04d}", *_task_text(task, p, contrastive, src["variant"])) for i, p in enumerate(prompts))


def _task_text(task: str, p, contrastive: bool, variant: str) -> tuple[str, dict]:
    """A task document: arithmetic texts are the prompt and its whole answer (every generation step is a
    prediction, ``prompt_chars`` marks where the answer starts); IOI / greater-than texts are the prompt
    (its next token is the one-token answer) with ``source_chars``, the indirect object / start year's YY."""
    prompt = p.contrastive if contrastive else p.text
    meta = {"task": task, "variant": variant, "template": p.template, "answer": p.answer, "wrong": p.wrong, **p.meta}
    if "completion" in p.meta:
        completion = p.meta["contrastive_completion" if contrastive else "completion"]
        meta["prompt_chars"] = len(prompt)
        return prompt + completion, meta
    span = p.meta.get("contrastive_source_span" if contrastive else "source_span")
    if span is not None:
        meta["source_chars"] = span
    return prompt, meta


def source_files(source: dict) -> list[Path]:
    """The files a jsonl / parquet / text source reads, resolved as its reader resolves them ([] for others)."""
    src = validate_source(source)
    return _resolve_paths(src["kind"], src["paths"], src["base_dir"]) if "paths" in src else []


_READERS: dict[str, Callable[..., Iterator[Document]]] = {
    "hf": _read_hf,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "text": _read_text,
    "stdlib_code": _read_stdlib,
    "pydoc_topics": _read_pydoc,
    "task": _read_task,
}


def iter_documents(source: dict, *, limit: int | None = None, seed: int = 0, tokenizer=None) -> Iterator[Document]:
    """The documents of ``source`` in a deterministic order; the first ``limit`` of them when given.

    The source is validated and its files resolved now, so configuration errors surface at the call,
    not at the first ``next()``. ``seed`` and ``tokenizer`` are used by "task" sources only (a source's
    own "seed" key wins over ``seed``). Nothing is dropped: empty texts come through as "".
    """
    src = validate_source(source)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InputError(f"limit must be None or an integer >= 0; got {limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer; got {seed!r}")
    documents = _READERS[src["kind"]](src, limit=limit, seed=seed, tokenizer=tokenizer)
    return documents if limit is None else itertools.islice(documents, limit)
