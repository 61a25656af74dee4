"""Core collections: the filtered metadata selection, and each grid row's samples copied locally.

A row's local copy (`mirror.copy_samples`) is itself a small Core collection, so every later
stage reads it with `core.CoreCollection` exactly as it would read the hub.
"""

import time
from datetime import datetime

import dagster as dg
import pandas as pd
from pydantic import ValidationError

from majortom_assets import grid
from majortom_assets.core import CoreCollection, MetadataFilter
from majortom_assets.defs import keys, presentation
from majortom_assets.defs.partitions import GRID_ROWS, ROW_BACKFILL, RowResults
from majortom_assets.defs.resources import CollectionsResource, StorageResource, load_settings
from majortom_assets.deployment import io_step_tags
from majortom_assets.geoparquet import atomic_output
from majortom_assets.mirror import FAILURES_FILE, copy_samples, open_copy
from majortom_assets.remote import redact_text

#: Steps that read remote shards retry transient network failures with growing, jittered delays.
NETWORK_RETRY = dg.RetryPolicy(
    max_retries=3, delay=2.0, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


class CoreSelectionConfig(dg.Config):
    """Which samples of the collection to take (all criteria must hold; empty = everything)."""

    rows: list[str] | None = None
    cells: list[str] | None = None
    bbox: list[float] | None = None  # [min_lon, min_lat, max_lon, max_lat]; min_lon > max_lon crosses 180
    start: str | None = None  # ISO date or datetime, inclusive, UTC if naive
    end: str | None = None
    max_cloud_cover: float | None = None  # percent
    max_nodata: float | None = None  # fraction
    limit: int | None = None

    def to_filter(self) -> MetadataFilter:
        try:
            return MetadataFilter(
                rows=self.rows,
                cells=self.cells,
                bbox=tuple(self.bbox) if self.bbox is not None else None,
                start=datetime.fromisoformat(self.start) if self.start else None,
                end=datetime.fromisoformat(self.end) if self.end else None,
                max_cloud_cover=self.max_cloud_cover,
                max_nodata=self.max_nodata,
                limit=self.limit,
            )
        except (ValidationError, ValueError) as exc:
            raise dg.Failure(f"invalid core selection config: {exc}", allow_retries=False) from None


def read_selection(storage: StorageResource, source: str) -> pd.DataFrame:
    path = storage.layout.selection_file(source)
    if not path.exists():
        raise dg.Failure(
            f"no metadata selection for {source} at {path}; materialise {keys.core_metadata_key(source).to_user_string()} first",
            allow_retries=False,
        )
    return pd.read_parquet(path)


def local_shard(storage: StorageResource, source: str, row_key: str) -> tuple[CoreCollection, pd.DataFrame]:
    """The row's local sample copy and its metadata, or a Failure saying which asset to run first."""
    shard_dir = storage.layout.shard_dir(source, row_key)
    try:
        return open_copy(shard_dir)
    except FileNotFoundError:
        raise dg.Failure(
            f"row {row_key}: no local {source} shard at {shard_dir}; materialise "
            f"{keys.core_shards_key(source).to_user_string()} for this row first",
            allow_retries=False,
        ) from None


def build_core_metadata_asset(source: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=keys.core_metadata_key(source),
        group_name="core",
        kinds={"parquet"},
        description=f"Filtered metadata selection of the Core-{source} collection (which samples to process).",
        op_tags=io_step_tags(),
        retry_policy=NETWORK_RETRY,
    )
    def _metadata(
        context: dg.AssetExecutionContext,
        config: CoreSelectionConfig,
        storage: StorageResource,
        collections: CollectionsResource,
    ) -> dg.MaterializeResult:
        url = collections.url(source)
        flt = config.to_filter()
        try:
            selection = collections.open(source).select(flt)
        except (FileNotFoundError, ValueError, TimeoutError) as exc:
            raise dg.Failure(
                f"Core-{source} at {url}: {redact_text(exc)}",
                allow_retries=isinstance(exc, FileNotFoundError | TimeoutError),
            ) from None
        frame = selection.frame
        if not selection.dropped.empty:
            context.log.warning(f"Core-{source}: {selection.summary()}")
        path = storage.layout.selection_file(source)
        with atomic_output(path) as tmp:
            frame.to_parquet(tmp, index=False)
        per_row = frame.groupby("grid_row_u").size() if len(frame) else pd.Series(dtype=int)
        row_table = pd.DataFrame(
            {"row": [grid.row_name(int(r)) for r in per_row.index], "samples": per_row.to_numpy()}
        )
        return dg.MaterializeResult(
            metadata={
                "collection": dg.MetadataValue.url(url) if "://" in url else dg.MetadataValue.path(url),
                "filter": dg.MetadataValue.json(flt.model_dump(mode="json", exclude_none=True)),
                "samples": len(frame),
                "rows": len(row_table),
                "samples per row": dg.MetadataValue.md(presentation.markdown_table(row_table, limit=50)),
                # bad and repeated metadata rows are left out once, here, with counts per row
                "duplicates dropped": selection.duplicates,
                "rows rejected": selection.rejected,
                "dropped per row": dg.MetadataValue.md(presentation.markdown_table(
                    selection.per_row().query("`duplicates dropped` > 0 or `rows rejected` > 0"), limit=50)),
                "dropped rows": dg.MetadataValue.md(presentation.failures_markdown(selection.failures())),
                "preview": dg.MetadataValue.md(presentation.markdown_table(frame, limit=5)),
                **presentation.file_metadata(path),
            }
        )

    return _metadata


def build_core_shards_asset(source: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=keys.core_shards_key(source),
        group_name="core",
        kinds={"parquet"},
        description=f"Core-{source} samples of one grid row, copied by row group into a local Core collection.",
        partitions_def=GRID_ROWS,
        deps=[keys.core_metadata_key(source)],
        backfill_policy=ROW_BACKFILL,
        retry_policy=NETWORK_RETRY,
        op_tags=io_step_tags(),
    )
    def _shards(
        context: dg.AssetExecutionContext, storage: StorageResource, collections: CollectionsResource
    ):
        layout = storage.layout
        selection = read_selection(storage, source)
        collection = collections.open(source)
        # one pass over the selection, not one scan of it per row (a backfill holds ~1,900 rows)
        by_row = selection.groupby("grid_row_u").indices if len(selection) else {}
        results = RowResults(context, keys.core_shards_key(source))
        for row_key in context.partition_keys:
            out_dir = layout.shard_dir(source, row_key)
            rows = selection.iloc[by_row.get(grid.parse_row_name(row_key), [])]
            started = time.perf_counter()
            # a row without selected samples writes an empty copy: cheap, and it replaces a stale one
            local, skipped = copy_samples(collection, rows, out_dir)
            if len(rows) and not len(local):
                results.fail(
                    row_key,
                    f"none of the {len(rows)} Core-{source} samples could be read; "
                    f"first error: {skipped[0].reason}",
                )
                continue
            results.record(
                row_key,
                {
                    "row": row_key,
                    "samples": len(local),
                    "cells": int(local["grid_cell"].nunique()) if len(local) else 0,
                    "samples skipped": len(skipped),
                    "skipped samples": dg.MetadataValue.md(
                        presentation.failures_markdown(skipped)
                    ),
                    "failures table": dg.MetadataValue.path(str(out_dir / FAILURES_FILE)),
                    "seconds": round(time.perf_counter() - started, 3),
                    "preview": dg.MetadataValue.md(presentation.markdown_table(local, limit=5)),
                    **presentation.file_metadata(out_dir),
                },
            )
            if len(rows):
                context.log.info(f"{source} row {row_key}: {len(local)} samples copied, {len(skipped)} skipped")
        yield from results.finish()

    return _shards


SOURCES_IN_USE = keys.sources_for_models(load_settings().models)
core_metadata_assets = [build_core_metadata_asset(source) for source in SOURCES_IN_USE]
core_shards_assets = [build_core_shards_asset(source) for source in SOURCES_IN_USE]
