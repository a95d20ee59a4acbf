"""A run directory on a local disk or in a bucket (``s3://``, ``gs://``) through ``pyarrow.fs``.

Every file is written whole: locally to a temporary name then renamed (atomic on POSIX), in a bucket by a
single PUT (objects appear whole or not at all). Readers therefore never see half a shard.

Buckets are reached with pyarrow's own settings, the standard ones of each cloud (nothing flowray-specific):
- S3 and S3-compatible stores (MinIO, Ceph, R2, moto): ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
  (or ``AWS_PROFILE``, or a node's IAM role), ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for a store
  other than AWS (``http://host:9000``). Query options in the URI also work:
  ``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``.
- GCS: ``gs://bucket/prefix`` with Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS`` or
  the VM's service account).
Every process that touches the run needs them: the driver, each Ray worker node and the notebooks.
"""

from __future__ import annotations

import errno
import io
import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from flowray.errors import FlowrayError


class StorageError(FlowrayError):
    """A bucket (s3://, gs://) could not be reached, read or written."""


# What an OSError of a local write means, and what to do about it.
_LOCAL_FAULTS = {
    errno.ENOSPC: "no space left on the device (disk full): free space or set output to another disk",
    errno.EDQUOT: "the disk quota is exceeded: free space or set output to another disk",
    errno.EROFS: "the file system is read-only: set output to a writable folder",
    errno.EACCES: "permission denied: set output to a folder this user can write",
    errno.EPERM: "operation not permitted: set output to a folder this user can write",
}

_SETTINGS = ("S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / an IAM role), AWS_DEFAULT_REGION, "
             "AWS_ENDPOINT_URL for an S3-compatible store; GCS: GOOGLE_APPLICATION_CREDENTIALS")


@dataclass(frozen=True)
class Storage:
    """The root of a run: ``uri`` is a local path or a ``scheme://`` URI."""

    uri: str

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri or self.uri.startswith("file://")

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        if self.is_local:
            return pafs.LocalFileSystem(), os.path.abspath(self.uri.removeprefix("file://"))
        with self._bucket("open"):
            return pafs.FileSystem.from_uri(self.uri)

    @contextmanager
    def _bucket(self, action: str, rel: str = ""):
        """Bucket errors (no such bucket, refused credentials, no endpoint) named, with the settings to check."""
        try:
            yield
        except (OSError, pa.ArrowException) as exc:
            if self.is_local or isinstance(exc, FileNotFoundError):
                raise
            where = f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri
            raise StorageError(
                f"could not {action} {where}: {exc}; check that the bucket exists and that this process (driver, "
                f"every Ray worker node, the notebooks) has its credentials and endpoint: {_SETTINGS}"
            ) from exc

    def path(self, rel: str) -> str:
        """A path inside the run that pyarrow/polars readers understand (local path or full URI)."""
        if self.is_local:
            return os.path.join(self._fs()[1], rel)
        return self.uri.rstrip("/") + "/" + rel

    # --- writing ---------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` whole; a failed write leaves no temporary file and raises StorageError saying why."""
        fs, root = self._fs()
        target = f"{root}/{rel}"
        parent = target.rsplit("/", 1)[0]
        if self.is_local:
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            try:
                fs.create_dir(parent, recursive=True)
                with fs.open_output_stream(tmp) as fh:
                    fh.write(data)
                fs.move(tmp, target)  # atomic rename
            except OSError as exc:
                self._discard(fs, tmp)
                raise self._local_fault("write", rel, exc) from exc
        else:
            with self._bucket("write", rel), fs.open_output_stream(target) as fh:  # one PUT: whole or absent
                fh.write(data)

    def create_new(self, rel: str, data: bytes) -> bool:
        """Local disks: create ``rel`` whole, only if it does not exist (atomic); False if it did.

        The data goes to a temporary file that is then hard-linked to ``rel`` (``link`` fails when the
        name exists), so a reader never sees it half written. Buckets offer no such call through pyarrow:
        NotImplementedError (``flowray.pipeline.lock`` writes, waits and reads back there).
        """
        if not self.is_local:
            raise NotImplementedError("exclusive create is only available on local disks")
        path = self.path(rel)
        tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._local_fault("create", rel, exc) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True

    @staticmethod
    def _discard(fs: pafs.FileSystem, path: str) -> None:
        try:
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)
        except OSError:  # the device refuses even this: nothing more can be done here
            pass

    def _local_fault(self, action: str, rel: str, exc: OSError) -> StorageError:
        code = getattr(exc, "errno", None)
        hint = _LOCAL_FAULTS.get(code) or next((h for c, h in _LOCAL_FAULTS.items() if os.strerror(c) in str(exc)),
                                               None)
        detail = hint or f"{type(exc).__name__}: {exc}"
        return StorageError(f"could not {action} {self.path(rel)}: {detail}; finished shards are kept, so the "
                            "same command resumes once this is fixed")

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj) -> None:
        self.write_text(rel, json.dumps(obj, indent=1, sort_keys=True, default=str))

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def delete(self, rel: str) -> None:
        """Remove one file if it is there (a stale commit marker, an outdated manifest)."""
        fs, root = self._fs()
        with self._bucket("delete", rel):
            if fs.get_file_info(f"{root}/{rel}").type == pafs.FileType.File:
                fs.delete_file(f"{root}/{rel}")

    def delete_dir(self, rel: str) -> None:
        """Remove a folder of the run and everything in it, if it is there (derived tables, figures)."""
        fs, root = self._fs()
        with self._bucket("delete", rel):
            if fs.get_file_info(f"{root}/{rel}").type == pafs.FileType.Directory:
                fs.delete_dir(f"{root}/{rel}")

    def delete_all(self) -> None:
        """Remove the run directory and everything in it; best effort (it may never have been created)."""
        fs, root = self._fs()
        try:
            if fs.get_file_info(root).type != pafs.FileType.NotFound:
                fs.delete_dir(root)
        except (OSError, pa.ArrowException):
            pass

    # --- reading ---------------------------------------------------------------------------------
    def is_empty(self) -> bool:
        """Nothing under the run directory (or no run directory at all)."""
        fs, root = self._fs()
        with self._bucket("look up"):
            selector = pafs.FileSelector(root, allow_not_found=True, recursive=False)
            return not fs.get_file_info(selector)

    def exists(self, rel: str) -> bool:
        fs, root = self._fs()
        with self._bucket("look up", rel):
            return fs.get_file_info(f"{root}/{rel}").type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        fs, root = self._fs()
        with fs.open_input_stream(f"{root}/{rel}") as fh:
            return fh.read()

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        fs, root = self._fs()
        return pq.read_table(f"{root}/{rel}", filesystem=fs, columns=columns)

    def list(self, rel_dir: str, suffix: str = "") -> list[str]:
        """File names (not paths) directly in ``rel_dir``, sorted; [] if it does not exist."""
        fs, root = self._fs()
        selector = pafs.FileSelector(f"{root}/{rel_dir}", allow_not_found=True)
        names = [info.base_name for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith(".tmp-"))
