"""Fragment grids: every fragment's pixel box, WGS84/UTM footprint and centre, as GeoParquet.

One file per grid row and fragment size, covering every sample of the collections cut at that
size. Embedding files carry the same boxes and footprints (the columns come from the same
``geoparquet.fragment_columns``); the grid lets maps, joins and checks use them without reading
embeddings. Only each sample's GeoTIFF header is read, never its pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from majortom_assets import geoparquet, geotiff
from majortom_assets.core import CoreCollection, SampleError, SampleFailure
from majortom_assets.fragment import fragment_layout
from majortom_assets.standard import REFERENCE_BAND

FRAGMENT_GRID_STAGE = "fragment grid"

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


def sample_grid(raw_band: Any) -> tuple[int, int, tuple[float, ...], str]:
    """(height, width, affine, crs) from a GeoTIFF header, without decoding its pixels."""
    info = geotiff.read_header(raw_band)
    if info.crs is None:
        raise ValueError("GeoTIFF has no CRS")
    return info.height, info.width, info.transform, info.crs


def fragment_rows(source: str, sample: Any, size: int, overlap: float, height: int, width: int,
                  transform: Sequence[float], crs: str) -> pa.Table:
    """All fragments of one sample (a metadata row) as one Arrow table, vectorised over fragments."""
    layout = fragment_layout(height, width, size, overlap)
    feet = geoparquet.fragment_footprints(layout.boxes, transform, crs)
    n = layout.count
    columns = geoparquet.fragment_columns(
        layout.boxes, feet, grid_cell=str(sample.grid_cell), grid_row_u=int(sample.grid_row_u),
        grid_col_r=int(sample.grid_col_r), product_id=str(sample.product_id), timestamp=sample.timestamp,
        crs=crs,
    )
    columns["source"] = pa.array(np.full(n, source, dtype=object), pa.string())
    columns["fragment_row"] = pa.array(layout.index[:, 0].astype(np.int32))
    columns["fragment_col"] = pa.array(layout.index[:, 1].astype(np.int32))
    return pa.Table.from_arrays([columns[name] for name in FRAGMENT_SCHEMA.names], schema=FRAGMENT_SCHEMA)


def samples_fragment_rows(collection: CoreCollection, samples: pd.DataFrame, source: str, size: int,
                          overlap: float) -> tuple[list[pa.Table], list[SampleFailure]]:
    """Fragment tables of each sample, reading only its reference band's header.

    A sample whose band cannot be read is skipped and reported as a `SampleFailure` (stage
    "fragment grid", with its source), never fatal to the others.
    """
    band = REFERENCE_BAND[source]
    tables: list[pa.Table] = []
    skipped: list[SampleFailure] = []
    for sample in samples.itertuples(index=False):
        try:
            raw = collection.read_raw(sample.parquet_url, sample.parquet_row, [band],
                                      product_id=sample.product_id, grid_cell=sample.grid_cell)
            height, width, transform, crs = sample_grid(raw[band])
            tables.append(fragment_rows(source, sample, size, overlap, height, width, transform, crs))
        except (SampleError, ValueError, OSError) as exc:
            error = _located(exc, collection, sample, band)
            skipped.append(SampleFailure(str(sample.product_id), str(sample.grid_cell), str(error),
                                         FRAGMENT_GRID_STAGE, source))
    return tables, skipped


def _located(exc: Exception, collection: CoreCollection, sample: Any, band: str) -> SampleError:
    """`exc` as a SampleError naming the sample, its reference band and its shard file."""
    try:
        file = collection.shard_path(sample.parquet_url)
    except ValueError:
        file = None
    if isinstance(exc, SampleError):   # keep its own reason / band / file, without repeating the location
        return SampleError(exc.reason, band=exc.band or band, product_id=str(sample.product_id),
                           grid_cell=str(sample.grid_cell), file=exc.file or file)
    return SampleError(str(exc), band=band, product_id=str(sample.product_id), grid_cell=str(sample.grid_cell),
                       file=file)


def write_fragment_file(path: str | os.PathLike, tables: list[pa.Table]) -> int:
    """One GeoParquet 1.1 file (WGS84 ``geometry``), written atomically; returns its row count."""
    table = pa.concat_tables(tables) if tables else FRAGMENT_SCHEMA.empty_table()
    geoparquet.write_geo_table(path, table)
    return table.num_rows
