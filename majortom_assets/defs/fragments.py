"""Fragment grids per fragment size (`fragment_grid`): one GeoParquet file per grid row and size,
covering every sample of every collection whose models cut fragments of that size.
"""

import time

import dagster as dg
import pandas as pd
import pyarrow as pa

from majortom_assets.core import SampleFailure
from majortom_assets.defs import keys, presentation
from majortom_assets.defs.partitions import GRID_ROWS, ROW_BACKFILL, RowResults
from majortom_assets.defs.resources import StorageResource, load_settings
from majortom_assets.defs.shards import local_shard
from majortom_assets.deployment import io_step_tags
from majortom_assets.fragment import fragment_layout
from majortom_assets.fragment_grid import samples_fragment_rows, write_fragment_file
from majortom_assets.models.spec import MODEL_SPECS
from majortom_assets.standard import CORE_IMAGE_SIZE

TARGET_OVERLAP = 0.1


def overlap_for_size(size: int) -> float:
    overlaps = {spec.target_overlap for spec in MODEL_SPECS.values() if spec.fragment_size == size}
    return overlaps.pop() if len(overlaps) == 1 else TARGET_OVERLAP


def build_fragments_asset(size: int, sources: tuple[str, ...]) -> dg.AssetsDefinition:
    overlap = overlap_for_size(size)

    @dg.asset(
        key=keys.fragments_key(size),
        group_name="fragments",
        kinds={"geoparquet"},
        description=(
            f"{size} px fragment grid (Algorithm 1, target overlap {overlap}) of every sample of "
            f"{', '.join(sources)} in the row: pixel boxes, footprints, centres."
        ),
        partitions_def=GRID_ROWS,
        deps=[keys.core_shards_key(s) for s in sources],
        backfill_policy=ROW_BACKFILL,
        op_tags=io_step_tags(),
    )
    def _fragments(context: dg.AssetExecutionContext, storage: StorageResource):
        layout_paths = storage.layout
        results = RowResults(context, keys.fragments_key(size))
        for row_key in context.partition_keys:
            started = time.perf_counter()
            tables: list[pa.Table] = []
            skipped: list[SampleFailure] = []
            per_source: dict[str, int] = {}
            try:
                copies = [(source, *local_shard(storage, source, row_key)) for source in sources]
            except dg.Failure as missing:  # this row's shards were never copied: the row fails alone
                results.fail(row_key, missing.description)
                continue
            for source, collection, samples in copies:
                found, failed = samples_fragment_rows(collection, samples, source, size, overlap)
                tables += found
                skipped += failed
                per_source[source] = len(found)
            path = layout_paths.fragments_file(size, row_key)
            n = write_fragment_file(path, tables)
            results.record(
                row_key,
                {
                    "row": row_key,
                    "samples": sum(per_source.values()),
                    "samples per source": dg.MetadataValue.json(per_source),
                    "fragments": n,
                    "fragments per sample": fragment_layout(CORE_IMAGE_SIZE, CORE_IMAGE_SIZE, size, overlap).count,
                    "samples skipped": len(skipped),
                    "skipped samples": dg.MetadataValue.md(presentation.failures_markdown(skipped)),
                    "seconds": round(time.perf_counter() - started, 3),
                    "preview": dg.MetadataValue.md(
                        presentation.markdown_table(
                            tables[0].slice(0, 5).to_pandas() if tables else pd.DataFrame()
                        )
                    ),
                    **presentation.file_metadata(path),
                },
            )
        yield from results.finish()

    return _fragments


_MODELS = load_settings().models
fragments_assets = [
    build_fragments_asset(size, keys.sources_for_size(size, _MODELS))
    for size in keys.sizes_for_models(_MODELS)
]
