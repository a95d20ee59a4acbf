"""The corpus job: prepare shards -> Ray actor pool of model replicas -> reduce tables -> manifest -> report.

The same code runs on a laptop (``ray.init()`` starts an embedded local Ray) and under ``ray job submit``
(``RAY_ADDRESS`` is set, so ``ray.init()`` joins the cluster; each actor asks for ``gpus_per_actor``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

from flowray.config import JobConfig
from flowray.errors import ConfigError
from flowray.pipeline.commit import pending_shards, remove_unplanned
from flowray.pipeline.lock import RunLock
from flowray.pipeline.prepare import check_same_experiment, check_writable, prepare
from flowray.pipeline.reduce import reduce_run, withdraw_outputs
from flowray.pipeline.resources import check_cluster_resources, check_ray_address
from flowray.pipeline.storage import Storage, StorageError
from flowray.signals import raise_on_sigterm
from flowray.run_report import write_report

log = logging.getLogger(__name__)
# Everything a run writes besides its lease: what --restart discards.
RUN_FILES = ("manifest.json", "config.json", "summary.md", "report.html")
RUN_DIRS = ("shards", "done", "predictions", "errors", "tables", "figures")


@dataclass(frozen=True)
class RunResult:
    run_uri: str
    manifest: dict


def run_job(config: JobConfig, *, ray_init: dict | None = None, restart: bool = False) -> RunResult:
    """Run (or resume) the job described by ``config``; returns where it wrote and its manifest.

    The run directory is held by one run at a time (``flowray.pipeline.lock``); ``restart`` discards what
    it holds first (another config's run, an edited corpus) instead of refusing to resume it.
    """
    from flowray.models.loading import load_tokenizer
    from flowray.models.weights import check_weights

    started = time.time()
    storage = Storage(f"{config.output.rstrip('/')}/{config.run_name}")
    log.info("run directory: %s", storage.uri)
    new_run = storage.is_empty()
    mapping = False
    try:
        check_writable(config, storage)
        with RunLock(storage) as lock:
            if restart:
                discard_run(storage)
            check_same_experiment(config, storage)  # under the lease: nothing else changes what is checked
            withdraw_outputs(storage)  # the manifest first: none outlives the files it describes
            if config.gpus_per_actor or os.environ.get("RAY_ADDRESS") or _ray_started():
                _start_ray(config, ray_init or {})  # a request no node can meet fails now, not after prepare
            tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
            check_weights(config.model)  # the actors load the weights: a broken folder fails here, once
            index = prepare(config, storage, tokenizer)  # every config/corpus error surfaces here, before the actors
            storage.write_json("config.json", config.to_dict())
            remove_unplanned(storage, index["shards"])
            timings = {"prepare_s": round(time.time() - started, 2)}
            pending, redone = pending_shards(storage, index["shards"])  # a marker counts only if it proves its files
            done = len(index["shards"]) - len(pending)
            log.info("%d shards, %d already done, %d to process (%d redone: their files failed their marker)",
                     len(index["shards"]), done, len(pending), len(redone))
            t_map = time.time()
            mapping = True
            if pending:
                _map_stage(config, storage, pending, index, ray_init=ray_init or {})
            timings["map_s"] = round(time.time() - t_map, 2)  # actor start-up (model loads) included
            lock.check()
            manifest = reduce_run(config, storage, index, started=started, resumed_shards=done, timings=timings,
                                  guard=lock.check)
            write_report(storage)  # summary.md, figures, report.html: from the files just written, as `flowray report` does
    except BaseException:
        if new_run and not mapping:  # failed before its first shard: no folder left for a rerun to trip on
            storage.delete_all()
        raise
    return RunResult(run_uri=storage.uri, manifest=manifest)


def discard_run(storage: Storage) -> None:
    """Remove everything a run wrote (``--restart``), the manifest first."""
    log.warning("--restart: discarding the run in %s", storage.uri)
    for rel in RUN_FILES:
        storage.delete(rel)
    for rel in RUN_DIRS:
        storage.delete_dir(rel)


def _connect(config: JobConfig, ray_init: dict) -> None:
    """``ray.init``: an unreachable cluster is a one-line error after ``ray_connect_timeout_s``, not minutes
    of Ray's retries; SIGTERM stays flowray's (``ray.init`` installs a handler that exits mid-stage)."""
    import ray

    address = ray_init.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address, config.ray_connect_timeout_s)
    quiet_ray_notices()
    try:
        ray.init(**ray_init_kwargs(config, ray_init))
    except (ConnectionError, TimeoutError) as exc:
        raise ConfigError(f"could not join the Ray cluster at {address or 'the local machine'}: {exc}; check "
                          "RAY_ADDRESS, or unset it to run on an embedded local Ray") from None
    raise_on_sigterm()


def _map_stage(config: JobConfig, storage: Storage, pending: list[str], index: dict, *, ray_init) -> None:
    import ray

    _start_ray(config, ray_init)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    if (config.min_actors or config.actors) < config.actors:
        # Ray Data grows a pool only above 175% utilisation by default, which the shards in flight per actor
        # (its concurrent calls: 100% at most) never reach: the pool would stay at min_actors. 100% = every
        # replica is busy.
        ctx.autoscaling_config.actor_pool_util_upscaling_threshold = 1.0
    log.info("Ray prints a `core_worker.cc ... constructor arguments in the object store` line per replica: "
             "expected (Ray Data keeps the workers' settings, the job config and run URI, a few kB and no weights, "
             "in the object store for the whole stage, so a restarted replica finds them; ray#53727)")
    storage_uri = storage.uri if not storage.is_local else os.path.abspath(storage.uri)
    texts = {s["shard_id"]: s["texts"] for s in index["shards"]}
    from flowray.pipeline.worker import ShardWorker

    if not os.environ.get("RAY_ADDRESS") and not config.gpus_per_actor:
        from flowray.kernels import cpu_loops

        cpu_loops.warm_up()  # replicas on this machine then load cached kernels instead of each compiling

    ds = ray.data.from_items([{"shard_id": s} for s in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        ShardWorker,
        fn_constructor_kwargs=dict(run_uri=storage_uri, config=config, submitted=time.time()),
        compute=ray.data.ActorPoolStrategy(min_size=config.min_actors or config.actors, max_size=config.actors,
                                           **shards_in_flight(config)),
        batch_size=1,
        batch_format="numpy",
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
    )
    progress = _Progress(len(pending), sum(texts[s] for s in pending), config.progress_interval_s)
    for row in ds.iter_rows():
        if row.get("fault"):  # a worker could not write (disk full, read-only): one line, not a Ray traceback
            raise StorageError(f"shard {row['shard_id']}: {row['fault']}")
        progress.update(row)
    progress.close()


def shards_in_flight(config: JobConfig) -> dict:
    """``ActorPoolStrategy`` arguments: how many shards an actor holds at once.

    A shard is a big unit of work: one per CPU actor, so no shard queues behind a busy replica. A GPU actor
    takes ``worker.SHARDS_IN_FLIGHT`` calls at once, so that one shard's Parquet encoding and writes (which
    release the GIL) run while its device computes the other shards' batches (``device.DeviceQueue`` serves
    the oldest first).
    """
    if not config.gpus_per_actor:
        return {"max_tasks_in_flight_per_actor": 1}
    from flowray.pipeline.worker import SHARDS_IN_FLIGHT

    return {"max_tasks_in_flight_per_actor": SHARDS_IN_FLIGHT, "max_concurrent_calls_per_actor": SHARDS_IN_FLIGHT,
            "enable_true_multi_threading": True}


def _ray_started() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _start_ray(config: JobConfig, ray_init: dict) -> None:
    """Start (or join) Ray, then fail fast, never wait forever, when no node can ever host one actor.

    Before prepare when the answer may be no (a GPU request, a cluster, a Ray already running); the
    embedded Ray gets enough logical CPUs for any CPU-only pool, so it starts at the map stage.
    """
    import ray

    if not ray.is_initialized():
        _connect(config, ray_init)
    check_cluster_resources(config.cpus_per_actor, config.gpus_per_actor)


def ray_init_kwargs(config: JobConfig, extra: dict) -> dict:
    """``ray.init`` arguments: join the cluster when ``RAY_ADDRESS`` is set, else an embedded local Ray.

    The embedded Ray has no dashboard (nothing listens on 8265) and keeps Ray 2.60's default for a local
    cluster, token authentication on (``RAY_AUTH_MODE=disabled`` in the environment turns it off, with
    Ray's own warning). ``extra`` (``run_job(ray_init=...)``) wins.
    """
    if os.environ.get("RAY_ADDRESS"):
        return dict(extra)  # inside `ray job submit` or pointed at a cluster
    # enough logical CPUs for the pool even on a 2-core laptop
    need = int(config.actors * max(config.cpus_per_actor, 1)) + 1
    return {"num_cpus": max(os.cpu_count() or 1, need), "include_dashboard": False, "configure_logging": True,
            "logging_level": logging.WARNING, **extra}


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# Ray notices that say nothing a flowray user must act on: (logger, message start, why it is harmless).
RAY_NOTICES = (
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled",
     "token auth is Ray's default for a local cluster and flowray keeps it on"),
    ("ray.data._internal.progress", "Progress bars disabled",
     "flowray turns Ray's bars off when stderr is not a terminal and logs its own progress lines"),
)


def quiet_ray_notices() -> None:
    """Drop exactly the messages of ``RAY_NOTICES`` (idempotent); Ray's other warnings and errors pass."""
    for name, prefix, _why in RAY_NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))


class _Progress:
    """A tqdm bar in a terminal; a log line every ``interval`` seconds otherwise (``ray job logs``)."""

    def __init__(self, shards: int, texts: int, interval: float):
        self.shards, self.texts, self.interval = shards, texts, interval
        self.done = self.done_texts = self.predictions = self.errors = 0
        self.t0 = self.last = time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=texts, unit="text", desc="flow routes", file=sys.stderr)

    def update(self, row: dict) -> None:
        self.done += 1
        self.done_texts += int(row["texts"])
        self.predictions += int(row["predictions"])
        self.errors += int(row["errors"])
        if self.bar is not None:
            self.bar.update(int(row["texts"]))
            self.bar.set_postfix(shards=f"{self.done}/{self.shards}", predictions=self.predictions, errors=self.errors)
        now = time.time()
        if self.bar is None and (now - self.last >= self.interval or self.done == self.shards):
            self.last = now
            rate = self.done_texts / max(now - self.t0, 1e-9)
            eta = (self.texts - self.done_texts) / rate if rate else float("nan")
            log.info("map: %d/%d shards, %d/%d texts, %d predictions, %d error rows, %.0f s elapsed, ETA %.0f s",
                     self.done, self.shards, self.done_texts, self.texts, self.predictions, self.errors,
                     now - self.t0, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
