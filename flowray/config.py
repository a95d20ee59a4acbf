"""The corpus job's configuration: frozen dataclasses, validated on construction, from YAML.

Unknown keys are errors (a typo must not silently fall back to a default). Everything is checked on the
driver before any Ray actor starts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowray.checks import check_tau
from flowray.errors import ConfigError
from flowray.models.dtypes import DTYPES

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CONTENT_KEYS = ("corpora", "model", "dtype", "max_tokens", "truncate", "texts_per_domain", "texts_per_shard", "tau",
                "seed", "general_domain", "trust_remote_code", "prepend_bos")


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
            dict: "a mapping"}.get(t, str(t))


def _check_type(where: str, value: Any, *types) -> None:
    ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in types)
    if not ok:
        expected = " or ".join(_type_name(t) for t in types)
        raise ConfigError(f"{where}: expected {expected}; got {value!r}")


def _check_keys(where: str, data: dict, allowed: set[str], required: set[str] = frozenset()) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys; got {data!r}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(sorted(allowed))}"
        )
    missing = sorted(required - set(data))
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")


@dataclass(frozen=True)
class CorpusConfig:
    """One domain of the corpus job: where its texts come from."""

    domain: str  # a name used in tables and file names ([A-Za-z0-9_.-])
    source: dict  # see flowray.corpora.SOURCE_KINDS
    language: str = "en"  # POS tags only for "en" (NLTK's English tagger)
    texts: int | None = None  # overrides JobConfig.texts_per_domain

    @property
    def is_task(self) -> bool:
        """Task prompts: only the last position is the prediction under study."""
        return self.source.get("kind") == "task"

    @classmethod
    def from_dict(cls, data: dict, where: str) -> CorpusConfig:
        fields_ = {f.name for f in dataclasses.fields(cls)}
        _check_keys(where, data, fields_, {"domain", "source"})
        domain = data["domain"]
        _check_type(f"{where}.domain", domain, str)
        if not _NAME.match(domain):
            raise ConfigError(f"{where}.domain: use letters, digits, '_', '-', '.'; got {domain!r}")
        language = data.get("language", "en")
        _check_type(f"{where}.language", language, str)
        texts = data.get("texts")
        if texts is not None:
            _check_type(f"{where}.texts", texts, int)
            if texts < 1:
                raise ConfigError(f"{where}.texts: expected a positive integer; got {texts!r}")
        from flowray.corpora import validate_source

        try:
            source = validate_source(data["source"])
        except ConfigError as exc:
            raise ConfigError(f"{where}.source: {exc}") from None
        return cls(domain=domain, source=source, language=language, texts=texts)


@dataclass(frozen=True)
class JobConfig:
    """The corpus job. Defaults are the embedded laptop run; a cluster config overrides actors/GPUs/output."""

    corpora: tuple[CorpusConfig, ...]
    run_name: str = "default"
    model: str = "smollm2"
    dtype: str = "float32"
    device: str = "auto"  # per actor: a GPU when the actor was given one
    backend: str = "auto"  # the importance kernel: auto = cpu (numba) on CPUs, triton on GPUs (else torch)
    trust_remote_code: bool = False
    general_domain: str | None = None  # the domain others are compared with; None: the first corpus
    max_tokens: int = 128  # tokens kept per text
    truncate: bool = True  # False: texts longer than max_tokens become error rows instead of being cut
    prepend_bos: bool = True  # a BOS at position 0 (flowray.text.document_start); its row is not written
    texts_per_domain: int = 100
    texts_per_shard: int = 16  # the unit of work, output and resume
    tau: tuple[float, ...] = (0.01, 0.03, 0.04)  # route thresholds recorded per prediction
    actors: int = 2  # model replicas (max size of the actor pool)
    min_actors: int | None = None  # autoscaling clusters: start with fewer; None = actors
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int = 4  # texts per forward pass inside an actor
    output: str = "runs"  # local directory or s3:// / gs:// URI; the run goes to <output>/<run_name>
    seed: int = 0
    data_dir: str | None = None  # base of relative corpus paths; "auto": find shared/data; None: config's dir
    progress_interval_s: float = 10.0  # driver log line period when stdout is not a terminal
    ray_connect_timeout_s: float = 30.0  # how long to wait for the cluster at RAY_ADDRESS before giving up

    def __post_init__(self):
        if not self.corpora:
            raise ConfigError("corpora: expected at least one corpus (domain + source)")
        domains = [c.domain for c in self.corpora]
        dupes = sorted({d for d in domains if domains.count(d) > 1})
        if dupes:
            raise ConfigError(f"corpora: domain names must be unique; repeated: {', '.join(dupes)}")
        if self.general_domain is not None:
            _check_type("general_domain", self.general_domain, str)
        if self.general_domain is not None and self.general_domain not in domains:
            raise ConfigError(
                f"general_domain: {self.general_domain!r} is not one of the corpora's domains ({', '.join(domains)})"
            )
        _check_type("run_name", self.run_name, str)
        _check_type("model", self.model, str)
        if not _NAME.match(self.run_name):
            raise ConfigError(f"run_name: use letters, digits, '_', '-', '.'; got {self.run_name!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}; got {self.dtype!r}")
        for name in ("max_tokens", "texts_per_domain", "texts_per_shard", "actors", "batch_size"):
            value = getattr(self, name)
            _check_type(name, value, int)
            if value < 1:
                raise ConfigError(f"{name}: expected a positive integer; got {value!r}")
        if self.min_actors is not None:
            _check_type("min_actors", self.min_actors, int)
            if not 1 <= self.min_actors <= self.actors:
                raise ConfigError(f"min_actors: expected 1..actors ({self.actors}); got {self.min_actors!r}")
        for name in ("cpus_per_actor", "gpus_per_actor", "progress_interval_s", "ray_connect_timeout_s"):
            value = getattr(self, name)
            _check_type(name, value, int, float)
            if not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number; got {value!r}")
            if value < 0 or (name != "gpus_per_actor" and value == 0):
                raise ConfigError(f"{name}: expected a {'non-negative' if name == 'gpus_per_actor' else 'positive'} number; got {value!r}")
        if not self.tau:
            raise ConfigError("tau: expected at least one threshold in (0, 1)")
        for t in self.tau:
            _check_type("tau", t, int, float)
            check_tau(t, name="tau: every threshold", error=ConfigError)
        _check_distinct_taus(self.tau)
        for name in ("truncate", "trust_remote_code", "prepend_bos"):
            _check_type(name, getattr(self, name), bool)
        _check_device(self.device, self.gpus_per_actor)
        _check_backend(self.backend, self.device, self.gpus_per_actor)
        _check_type("output", self.output, str)
        if not self.output.strip():
            raise ConfigError(f"output: expected a local folder or a bucket URI (s3://..., gs://...); got "
                              f"{self.output!r}; leave the key out for the default ('runs') or name a folder")
        _check_type("seed", self.seed, int)

    # --- derived ---------------------------------------------------------------------------------
    @property
    def general(self) -> str:
        return self.general_domain or self.corpora[0].domain

    @property
    def contrasts(self) -> tuple[tuple[str, str], ...]:
        """(original, contrastive) task domains paired by doc id: a contrastive domain goes with the first
        original domain of the same task and seed (so prompt i and twin i are the same example)."""
        pairs = []
        for twin in self.corpora:
            src = twin.source
            if src.get("kind") != "task" or src.get("variant") != "contrastive":
                continue
            match = next((c.domain for c in self.corpora if c.source.get("kind") == "task"
                          and c.source.get("variant") == "original" and c.source.get("task") == src.get("task")
                          and c.source.get("seed") == src.get("seed")), None)
            if match is not None:
                pairs.append((match, twin.domain))
        return tuple(pairs)

    def texts_for(self, corpus: CorpusConfig) -> int:
        return corpus.texts or self.texts_per_domain

    def content(self) -> dict:
        """What determines the shards and every output value (not the resources used to compute them)."""
        return {k: _jsonable(getattr(self, k)) for k in CONTENT_KEYS}

    def content_hash(self) -> str:
        blob = json.dumps(self.content(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return _jsonable(self)

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, *, base_dir: str | Path | None = None) -> JobConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        _check_keys("config", data, allowed, {"corpora"})
        data = dict(data)
        corpora = data.pop("corpora")
        _check_type("corpora", corpora, list)
        data_dir = _resolve_data_dir(data.get("data_dir"), base_dir)
        parsed = []
        for i, entry in enumerate(corpora):
            corpus = CorpusConfig.from_dict(entry, f"corpora[{i}]")
            source = _rebase_paths(corpus.source, data_dir)
            _check_files_exist(f"corpora[{i}].source.paths", source)
            parsed.append(dataclasses.replace(corpus, source=source))
        if "tau" in data:
            tau = data["tau"]
            data["tau"] = tuple(tau) if isinstance(tau, list) else (tau,)
        if data_dir is not None:
            data["data_dir"] = str(data_dir)
        for key in ("cpus_per_actor", "gpus_per_actor", "progress_interval_s", "ray_connect_timeout_s"):
            if isinstance(data.get(key), int) and not isinstance(data.get(key), bool):
                data[key] = float(data[key])
        return cls(corpora=tuple(parsed), **data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> JobConfig:
        import yaml

        from flowray.io_checks import read_text_file

        path = Path(path)
        text = read_text_file(path, "config file", error=ConfigError, hint="see jobs/configs/")
        try:
            data = yaml.load(text, Loader=yaml_loader())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level; got {type(data).__name__}")
        return cls.from_dict(apply_overrides(data, overrides), base_dir=path.parent)


@functools.lru_cache(maxsize=1)
def yaml_loader():
    """PyYAML's safe loader, reading ``1e-9`` and ``2E+3`` as numbers (YAML 1.1, which PyYAML follows, wants
    a dot in a float: ``1e-9`` would be the string "1e-9", and a tau written so would be refused)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", number, list("-+0123456789"))
    return Loader


def _check_distinct_taus(taus) -> None:
    """Each tau names its own output columns (``route_heads@{tau:g}``): two that print alike would share one."""
    from flowray.tables import tau_columns

    seen: dict[str, float] = {}
    for t in taus:
        column = tau_columns(t).route_heads
        if column in seen:
            same = "are equal" if seen[column] == t else f"both name the column {column!r}"
            raise ConfigError(f"tau: thresholds must be distinct; {seen[column]!r} and {t!r} {same} (taus are "
                              f"told apart by 6 significant digits); got {list(taus)!r}")
        seen[column] = t


def apply_overrides(data: dict, overrides) -> dict:
    """``key=value`` strings (value parsed as YAML) replace top-level keys, e.g. ``texts_per_domain=8``."""
    import yaml

    data = dict(data)
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. texts_per_domain=8")
        try:
            data[key.strip()] = yaml.load(raw, Loader=yaml_loader())
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"override {item!r}: the value {raw!r} is not valid YAML ({problem}); quote it "
                              "or fix the brackets, e.g. tau=[0.01,0.04]") from None
    return data


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check_backend(backend, device: str, gpus_per_actor: float) -> None:
    """The importance kernel every actor will use, checked against the devices it will have."""
    from flowray.checks import BACKENDS

    _check_type("backend", backend, str)
    if backend not in BACKENDS:
        raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}; got {backend!r}")
    on_gpu = bool(gpus_per_actor) and not device.startswith(("cpu", "mps"))
    if backend == "triton" and not on_gpu:
        raise ConfigError("backend: 'triton' runs on NVIDIA GPUs, but no actor would have one (gpus_per_actor is "
                          f"{gpus_per_actor!r}, device {device!r}); set gpus_per_actor (e.g. 1) or backend: auto")
    if backend == "cpu" and on_gpu:
        raise ConfigError("backend: 'cpu' needs the model on the CPU, but the actors get GPUs; use backend: auto "
                          "(triton) or torch, or device: cpu")


def _check_device(device, gpus_per_actor: float) -> None:
    """The device string every actor will use, checked here on the driver (not in a dying actor)."""
    _check_type("device", device, str)
    if not _DEVICE.match(device):
        raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}")
    if device.startswith("cuda") and not gpus_per_actor:
        raise ConfigError(f"device: {device!r} needs GPUs, but gpus_per_actor is 0 so no actor would see one; "
                          "set gpus_per_actor (e.g. 1) or device: auto")


def default_config_path(name: str = "default") -> Path:
    """A config shipped with flowray: ``default`` (embedded, no external data) or ``shared_data``."""
    path = Path(__file__).resolve().parent / "configs" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no shipped config named {name!r}; available: {', '.join(available)}")
    return path


def find_shared_data() -> Path | None:
    """``$FLOWRAY_SHARED_DATA``, else a ``shared/data`` folder above the working directory or the package."""
    env = os.environ.get("FLOWRAY_SHARED_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for parent in (start, *start.parents):
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def _resolve_data_dir(value, base_dir) -> Path | None:
    if value is None:
        return Path(base_dir) if base_dir is not None else None
    _check_type("data_dir", value, str)
    if value == "auto":
        found = find_shared_data()
        if found is None:
            raise ConfigError(
                "data_dir: 'auto' found no shared/data folder (looked at $FLOWRAY_SHARED_DATA and above the "
                "working directory), where the shared_data config reads C4, FLORES-200 and code samples; set "
                "FLOWRAY_SHARED_DATA=/path/to/shared/data or data_dir: /path, or run your own corpus instead: "
                "a copy of flowray/configs/default.yaml with your files under corpora, then `flowray job run "
                "--config my.yaml` and `python analysis/run_all.py --run runs/<run_name>`"
            )
        return found
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def _rebase_paths(source: dict, data_dir: Path | None) -> dict:
    """Make the file paths of file-based sources absolute (relative ones are relative to ``data_dir``)."""
    if data_dir is None or "paths" not in source:
        return source
    rebased = [p if os.path.isabs(os.path.expanduser(p)) or "://" in p else str(data_dir / p) for p in source["paths"]]
    return {**source, "paths": rebased}


def _check_files_exist(where: str, source: dict) -> None:
    """Local file sources must match at least one file now, not when a worker gets to them."""
    import glob

    for p in source.get("paths", ()):
        if "://" not in p and not glob.glob(os.path.expanduser(p)):
            raise ConfigError(f"{where}: {p!r} matches no file; check the path (relative paths are relative "
                              "to data_dir, or to the config file's folder)")


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
