"""Fragment grids per fragment size: every fragment's pixel box, WGS84/UTM footprint and centre.

One GeoParquet file per grid row and size, covering every sample of every collection whose
models cut fragments of that size. The embeddings of a model carry the same boxes and
footprints; this asset lets maps, joins and checks use the grid without reading embeddings.
"""

import time

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from rasterio.io import MemoryFile

from majortom_assets import geoparquet
from majortom_assets.core import CoreCollection, SampleError
from majortom_assets.defs import keys, presentation
from majortom_assets.defs.partitions import GRID_ROWS, ROW_BACKFILL
from majortom_assets.defs.resources import StorageResource, load_settings
from majortom_assets.deployment import io_step_tags
from majortom_assets.fragment import fragment_layout
from majortom_assets.models.spec import MODEL_SPECS

#: A 10 m band of each source: its GeoTIFF header gives the sample's pixel grid and CRS.
REFERENCE_BAND = {"S2L1C": "B04", "S2L2A": "B04", "S1RTC": "vv"}
TARGET_OVERLAP = 0.1

FRAGMENT_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("grid_cell", pa.string(), nullable=False),
        pa.field("grid_row_u", pa.int32(), nullable=False),
        pa.field("grid_col_r", pa.int32(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("fragment_row", pa.int32(), nullable=False),
        pa.field("fragment_col", pa.int32(), nullable=False),
        pa.field("pixel_bbox", pa.list_(pa.int32(), 4), nullable=False),
        pa.field("geometry", pa.binary(), nullable=False),
        pa.field("utm_footprint", pa.string(), nullable=False),
        pa.field("utm_crs", pa.string(), nullable=False),
        pa.field("centre_lat", pa.float64(), nullable=False),
        pa.field("centre_lon", pa.float64(), nullable=False),
    ]
)


def overlap_for_size(size: int) -> float:
    overlaps = {spec.target_overlap for spec in MODEL_SPECS.values() if spec.fragment_size == size}
    return overlaps.pop() if len(overlaps) == 1 else TARGET_OVERLAP


def sample_grid(raw_band: bytes) -> tuple[int, int, tuple[float, ...], str]:
    """(height, width, affine, crs) from a GeoTIFF header, without decoding its pixels."""
    with MemoryFile(bytes(raw_band)) as memfile, memfile.open() as ds:
        if ds.crs is None:
            raise ValueError("GeoTIFF has no CRS")
        return ds.height, ds.width, tuple(ds.transform)[:6], ds.crs.to_string()


def fragment_rows(
    source: str, sample, size: int, overlap: float, height: int, width: int, transform, crs
) -> pa.Table:
    """All fragments of one sample as one Arrow table (vectorised over fragments)."""
    layout = fragment_layout(height, width, size, overlap)
    feet = geoparquet.fragment_footprints(layout.boxes, transform, crs)
    n = layout.count
    stamp = pd.Timestamp(sample.timestamp)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")

    def repeat(value, typ):
        return pa.array(np.full(n, value, dtype=object), typ)

    return pa.Table.from_arrays(
        [
            repeat(source, pa.string()),
            repeat(str(sample.product_id), pa.string()),
            repeat(str(sample.grid_cell), pa.string()),
            pa.array(np.full(n, int(sample.grid_row_u), np.int32)),
            pa.array(np.full(n, int(sample.grid_col_r), np.int32)),
            pa.array(
                np.full(n, stamp.to_datetime64().astype("datetime64[us]")), pa.timestamp("us", tz="UTC")
            ),
            pa.array(layout.index[:, 0].astype(np.int32)),
            pa.array(layout.index[:, 1].astype(np.int32)),
            pa.FixedSizeListArray.from_arrays(pa.array(layout.boxes.astype(np.int32).reshape(-1)), 4),
            pa.array(feet.geometry_wkb, pa.binary()),
            pa.array(feet.utm_wkt, pa.string()),
            repeat(crs, pa.string()),
            pa.array(feet.centre_lat),
            pa.array(feet.centre_lon),
        ],
        schema=FRAGMENT_SCHEMA,
    )


def write_fragment_file(path, tables: list[pa.Table]) -> int:
    """One GeoParquet 1.1 file (WGS84 `geometry`), written atomically."""
    table = pa.concat_tables(tables) if tables else FRAGMENT_SCHEMA.empty_table()
    type_ids = np.unique(
        shapely.get_type_id(shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False)))
    )
    names = {3: "Polygon", 6: "MultiPolygon"}
    geo = geoparquet.geo_metadata([names.get(int(t), "Unknown") for t in type_ids], None)
    import json

    table = table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    with geoparquet.atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return table.num_rows


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
    def _fragments(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        layout_paths = storage.layout
        for row_key in context.partition_keys:
            started = time.perf_counter()
            tables: list[pa.Table] = []
            skipped: list[dict] = []
            per_source: dict[str, int] = {}
            for source in sources:
                shard_dir = layout_paths.shard_dir(source, row_key)
                meta_path = shard_dir / "metadata.parquet"
                if not meta_path.exists():
                    raise dg.Failure(
                        f"row {row_key}: no local {source} shard at {shard_dir}; materialise "
                        f"{keys.core_shards_key(source).to_user_string()} for this row first",
                        allow_retries=False,
                    )
                samples = pd.read_parquet(meta_path)
                collection = CoreCollection(str(shard_dir))
                band = REFERENCE_BAND[source]
                count = 0
                for sample in samples.itertuples(index=False):
                    try:
                        raw = collection.read_raw(
                            sample.parquet_url,
                            sample.parquet_row,
                            [band],
                            product_id=sample.product_id,
                            grid_cell=sample.grid_cell,
                        )
                        height, width, transform, crs = sample_grid(raw[band])
                        tables.append(
                            fragment_rows(source, sample, size, overlap, height, width, transform, crs)
                        )
                        count += 1
                    except (SampleError, ValueError, OSError) as exc:
                        skipped.append(
                            {
                                "source": source,
                                "product_id": sample.product_id,
                                "grid_cell": sample.grid_cell,
                                "reason": str(exc),
                            }
                        )
                per_source[source] = count
            path = layout_paths.fragments_file(size, row_key)
            n = write_fragment_file(path, tables)
            context.add_asset_metadata(
                {
                    "row": row_key,
                    "samples": sum(per_source.values()),
                    "samples per source": dg.MetadataValue.json(per_source),
                    "fragments": n,
                    "fragments per sample": fragment_layout(1068, 1068, size, overlap).count,
                    "samples skipped": len(skipped),
                    "skipped samples": dg.MetadataValue.md(presentation.skipped_table(skipped)),
                    "seconds": round(time.perf_counter() - started, 3),
                    "preview": dg.MetadataValue.md(
                        presentation.markdown_table(
                            tables[0].slice(0, 5).to_pandas() if tables else pd.DataFrame()
                        )
                    ),
                    **presentation.file_metadata(path),
                },
                partition_key=row_key,
            )
        return dg.MaterializeResult()

    return _fragments


_MODELS = load_settings().models
fragments_assets = [
    build_fragments_asset(size, keys.sources_for_size(size, _MODELS))
    for size in keys.sizes_for_models(_MODELS)
]
