"""The Parquet encoding of the job's prediction tables in its layout and in others (``actor_host.py --layouts``).

CPU time of one thread per prediction to encode and to sha256 the same shards' tables in each layout, with
the bytes written; every layout must read back as the table written.
"""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pyarrow as pa


def layouts(schema: pa.Schema) -> dict[str, dict]:
    """``pyarrow.parquet.write_table`` options: the job's layout (``commit.parquet_layout``) and others."""
    from flowray.pipeline.commit import parquet_layout

    job = parquet_layout(schema)
    floats = [leaf for leaf, enc in job["column_encoding"].items() if enc == "BYTE_STREAM_SPLIT"]
    leaves = [*job["use_dictionary"], *job["column_encoding"]]

    def floats_as(codec):
        return {**job, "compression": {**dict.fromkeys(leaves, "zstd"), **dict.fromkeys(floats, codec)}}

    return {"job: zstd; floats split, ids delta": job, "job, floats lz4": floats_as("lz4"),
            "job, floats snappy": floats_as("snappy"), "job, floats uncompressed": floats_as("none"),
            "zstd, pyarrow's defaults": {"compression": "zstd"},
            "uncompressed, plain": {"compression": "none", "use_dictionary": False, "write_statistics": False}}


def _same_rows(a: pa.Table, b: pa.Table) -> bool:
    """Equal tables, NaN equal to NaN (shares are NaN where undefined)."""
    for name in b.column_names:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        if pa.types.is_list(y.type) and pa.types.is_floating(y.type.value_type):
            if not (x.type == y.type and x.value_lengths().equals(y.value_lengths()) and np.array_equal(
                    x.flatten().to_numpy(zero_copy_only=False), y.flatten().to_numpy(zero_copy_only=False),
                    equal_nan=True)):
                return False
        elif not x.equals(y):
            return False
    return a.schema.equals(b.schema) and a.num_rows == b.num_rows


def time_layouts(tables: list[pa.Table], repeats: int) -> None:
    """CPU microseconds per prediction to encode ``tables`` (and sha256 them) in each layout, and the whole
    table's encode split by column group in the job's layout; best of ``repeats``, interleaved. Every layout
    must read back as the table written."""
    import pyarrow.parquet as pq

    n = sum(t.num_rows for t in tables)
    groups = {"floats": lambda f: pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type),
              "route ids": lambda f: pa.types.is_list(f.type) and not pa.types.is_floating(f.type.value_type),
              "scalars": lambda f: not pa.types.is_list(f.type)}
    cases = {name: (tables, opts) for name, opts in layouts(tables[0].schema).items()}
    for group, keep in groups.items():
        parts = [t.select([f.name for f in t.schema if keep(f)]) for t in tables]
        cases[f"job layout, {group} only"] = (parts, layouts(parts[0].schema)["job: zstd; floats split, ids delta"])
    best: dict = {}
    for rep in range(repeats):
        for name, (parts, opts) in cases.items():
            t0, size, hashed = time.thread_time(), 0, 0.0
            for t in parts:
                buf = io.BytesIO()
                pq.write_table(t, buf, **opts)
                data = buf.getvalue()
                if rep == 0 and not _same_rows(pq.read_table(pa.BufferReader(data)), t):  # untimed
                    raise AssertionError(f"{name}: the table read back differs from the one written")
                h0 = time.thread_time()
                hashlib.sha256(data).hexdigest()
                hashed += time.thread_time() - h0
                size += len(data)
            encode = time.thread_time() - t0 - hashed
            if name not in best or encode < best[name][0]:
                best[name] = (encode, hashed, size)
    job = best["job: zstd; floats split, ids delta"][0]
    print(f"{'layout':<36} {'encode_us':>9} {'sha256_us':>9} {'B/pred':>7} {'encode/job':>10}")
    for name, (encode, hashed, size) in best.items():
        print(f"{name:<36} {1e6 * encode / n:>9.2f} {1e6 * hashed / n:>9.2f} {size / n:>7.0f} {encode / job:>10.2f}")
    print(f"# {n} predictions in {len(tables)} shards; CPU time of one thread, best of {repeats} interleaved repeats")
