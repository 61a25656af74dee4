"""Embeddings per model and grid row: one Table 2 GeoParquet file per partition, via the engine.

The model is a resource (`embedder_<model>`), built once per process; the asset only points the
engine at the row's local Core copy and records what happened. Steps take the `gpu` pool, so one
embedding step at a time holds the device, and backfills batch many rows per run because loading
a model dominates small rows.
"""

import dagster as dg
import pyarrow.parquet as pq

from majortom_assets import geoparquet
from majortom_assets.defs import keys, presentation
from majortom_assets.defs.partitions import GRID_ROWS, ROW_BACKFILL, RowResults
from majortom_assets.defs.resources import (
    CollectionsResource,
    EmbedderResource,
    StorageResource,
    load_settings,
)
from majortom_assets.defs.shards import local_shard
from majortom_assets.deployment import GPU_POOL, gpu_step_tags
from majortom_assets.mirror import copy_failures
from majortom_assets.models.spec import MODEL_SPECS

PREVIEW_COLUMNS = [
    "unique_id",
    "grid_cell",
    "product_id",
    "timestamp",
    "pixel_bbox",
    "centre_lat",
    "centre_lon",
    "embedding",
]


def weights_metadata(embedder, resource: EmbedderResource) -> dict:
    ident = embedder.weights
    meta = {
        "model": embedder.spec.name,
        "weights": ident.name,
        "weights sha256": ident.sha256,
        "weights source": ident.source,
        "random weights": ident.random,
        "tiny model": resource.tiny,
        "embedding dim": int(embedder.embedding_dim),
    }
    if ident.random or resource.tiny:
        meta["WARNING"] = dg.MetadataValue.md(
            f"**{geoparquet.RANDOM_WEIGHTS_WARNING if ident.random else 'TINY MODEL'}**: "
            f"random weights = {ident.random}, tiny architecture = {resource.tiny}. "
            "These vectors demonstrate the pipeline; they carry no meaning."
        )
    return meta


def preview(path, rows: int = 5) -> str:
    pf = pq.ParquetFile(path)
    if pf.metadata.num_rows == 0:
        return "_(no rows)_"
    batch = next(pf.iter_batches(batch_size=rows, columns=PREVIEW_COLUMNS))
    return presentation.markdown_table(batch.to_pandas(), limit=rows)


def build_embeddings_asset(model: str) -> dg.AssetsDefinition:
    spec = MODEL_SPECS[model]
    resource_key = keys.embedder_resource_key(model)

    @dg.asset(
        key=keys.embeddings_key(model),
        group_name="embeddings",
        kinds={"pytorch", "geoparquet"},
        description=f"{spec.description} One Table 2 GeoParquet file per grid row.",
        partitions_def=GRID_ROWS,
        deps=[keys.core_shards_key(spec.source), keys.fragments_key(spec.fragment_size)],
        # A model's resource key differs per asset, so all resources come by key here (Dagster does
        # not allow mixing keyed and typed-parameter resources on one asset).
        required_resource_keys={"storage", "collections", resource_key},
        pool=GPU_POOL,
        backfill_policy=ROW_BACKFILL,
        op_tags=gpu_step_tags(),
        metadata={"model": model, "source": spec.source, "fragment size": spec.fragment_size},
    )
    def _embeddings(context: dg.AssetExecutionContext):
        # imported here, not at module level: the engine imports torch, which the code location
        # need not pay for when it loads (webserver, daemon, sensors)
        from majortom_assets.engine import embed_to_file, write_failures

        storage: StorageResource = context.resources.storage
        collections: CollectionsResource = context.resources.collections
        resource: EmbedderResource = getattr(context.resources, resource_key)
        embedder = resource.embedder
        config = resource.compute.engine_config()
        layout = storage.layout
        identity = weights_metadata(embedder, resource)
        source_url = collections.url(spec.source)
        # A run may hold many rows (backfill policy): a row whose samples all fail must not stop
        # the rows after it nor lose the rows before it (see RowResults).
        results = RowResults(context, keys.embeddings_key(model))
        for row_key in context.partition_keys:
            try:
                collection, samples = local_shard(storage, spec.source, row_key)
            except dg.Failure as missing:
                results.fail(row_key, missing.description)
                continue
            out_path = layout.embeddings_file(model, row_key)
            stats = embed_to_file(collection, samples, embedder, config, out_path, source_url)
            # one table per partition lists every skipped sample, whichever stage skipped it
            failures = [*copy_failures(layout.shard_dir(spec.source, row_key)), *stats.failures]
            failures_path = write_failures(layout.failures_file(model, row_key), failures)
            if len(samples) and stats.samples == 0:
                results.fail(
                    row_key,
                    f"every one of the {len(samples)} {spec.source} samples failed; "
                    f"first: {stats.failures[0].reason if stats.failures else 'unknown'}"
                    + (f"; the existing {out_path.name} of the last good run was left untouched"
                       if stats.kept_existing else ""),
                )
                continue
            results.record(
                row_key,
                {
                    "row": row_key,
                    **identity,
                    "device": str(stats.device),
                    "batch size": int(stats.batch_size),
                    "samples": int(stats.samples),
                    "fragments": int(stats.fragments),
                    "samples skipped": len(failures),
                    "skipped samples": dg.MetadataValue.md(presentation.failures_markdown(failures)),
                    "failures table": dg.MetadataValue.path(str(failures_path)),
                    "seconds": round(float(stats.seconds), 3),
                    "cells/s": round(float(stats.cells_per_s), 3),
                    "preview": dg.MetadataValue.md(preview(out_path)),
                    **presentation.file_metadata(out_path),
                },
            )
            if len(samples):
                context.log.info(
                    f"{model} row {row_key}: {stats.samples} samples, {stats.fragments} fragments, "
                    f"{len(failures)} skipped, {stats.cells_per_s:.2f} cells/s on {stats.device}"
                )
        yield from results.finish()

    return _embeddings


embeddings_assets = [build_embeddings_asset(model) for model in load_settings().models]
