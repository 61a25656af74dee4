"""Local copies of selected Core samples, themselves small Core collections.

A copy is ``metadata.parquet`` + ``images/samples-<digest>.parquet`` (one sample per row group),
so every later stage reads it with ``core.CoreCollection`` exactly as it would read the hub: the
same code path for a laptop and for production. Only the selected samples' row groups are read.
Samples that could not be copied are listed in the copy's ``failures.parquet`` (the failures
table schema, stage "shard copy"), so later stages can report them beside their own.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from majortom_assets.core import (
    CoreCollection,
    SampleError,
    SampleFailure,
    check_sample_identity,
    failures_from_table,
    failures_table,
)
from majortom_assets.geoparquet import atomic_output, fsync_path, read_table, temp_output
from majortom_assets.remote import redact_text

METADATA_FILE = "metadata.parquet"
FAILURES_FILE = "failures.parquet"
SHARD_COPY_STAGE = "shard copy"


def copy_samples(
    collection: CoreCollection, metadata: pd.DataFrame, out_dir: str | os.PathLike
) -> tuple[pd.DataFrame, list[SampleFailure]]:
    """Copy each metadata row's row group (all shard columns) into ``out_dir``.

    Returns the copy's metadata (``parquet_url`` / ``parquet_row`` pointing into the copy) and
    one `SampleFailure` (stage "shard copy") per sample that could not be read: such a sample is
    skipped, never fatal to the others, and also recorded in ``failures.parquet`` (see
    `copy_failures`). The metadata file is the commit point: the samples file is named by its
    content and the failures file is written first, and only then is the metadata replaced;
    stale sample files are removed afterwards.
    """
    out_dir = Path(out_dir)
    skipped: list[SampleFailure] = []
    kept: list[int] = []
    schema: pa.Schema | None = None
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with temp_output(images / "samples.parquet") as tmp_images:
        writer = None
        try:
            for i, row in enumerate(metadata.itertuples(index=False)):
                try:
                    if schema is None:
                        with collection.fs.open(collection.shard_path(row.parquet_url), "rb") as fh:
                            schema = pq.read_schema(fh).remove_metadata()
                        writer = pq.ParquetWriter(tmp_images, schema, compression="zstd")
                    raw = collection.read_raw(row.parquet_url, row.parquet_row, schema.names,
                                              product_id=row.product_id, grid_cell=row.grid_cell)
                    check_sample_identity(raw, row.product_id, row.grid_cell, parquet_row=row.parquet_row,
                                          file=collection.shard_path(row.parquet_url))
                    writer.write_table(pa.Table.from_pylist([raw], schema=schema))
                    digest.update(f"{row.product_id}/{row.grid_cell}/{row.parquet_url}/{row.parquet_row}".encode())
                    kept.append(i)
                except (SampleError, OSError, ValueError) as exc:
                    skipped.append(SampleFailure(str(row.product_id), str(row.grid_cell), redact_text(exc),
                                                 SHARD_COPY_STAGE))
        finally:
            if writer is not None:
                writer.close()
        name = f"images/samples-{digest.hexdigest()[:16]}.parquet"
        if kept:
            fsync_path(tmp_images)   # durable before metadata.parquet (the commit point) names it
            tmp_images.replace(out_dir / name)
            fsync_path(images, directory=True)
    with atomic_output(out_dir / FAILURES_FILE) as tmp:
        pq.write_table(failures_table(skipped), tmp)
    local = metadata.iloc[kept].reset_index(drop=True).copy()
    local["parquet_url"] = name
    local["parquet_row"] = range(len(local))
    with atomic_output(out_dir / METADATA_FILE) as tmp:
        local.to_parquet(tmp, index=False)
    for stale in images.glob("samples-*.parquet"):
        if stale.name != Path(name).name:
            stale.unlink(missing_ok=True)
    return local, skipped


def open_copy(copy_dir: str | os.PathLike) -> tuple[CoreCollection, pd.DataFrame]:
    """A copy made by ``copy_samples`` and its metadata; FileNotFoundError if there is none."""
    copy_dir = Path(copy_dir)
    meta_path = copy_dir / METADATA_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"no local sample copy at {copy_dir} (no {METADATA_FILE})")
    return CoreCollection(str(copy_dir)), pd.read_parquet(meta_path)


def copy_failures(copy_dir: str | os.PathLike) -> list[SampleFailure]:
    """Samples the copy at `copy_dir` skipped (stage "shard copy"); [] for a copy without a
    failures file (made before copies recorded them)."""
    path = Path(copy_dir) / FAILURES_FILE
    return failures_from_table(read_table(path)) if path.exists() else []
