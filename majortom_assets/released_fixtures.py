"""Files in exactly the shape the public reference embedder writes (../shared/RELEASED_FORMAT.md).

Used by the tests, the benchmark and the demo: no network, so the released sets are stood in for by
files with the same schema, metadata and faults: variable-length ``list<float>`` embeddings,
``geo`` metadata with ``crs: null``, footprints with rows and columns swapped, one lon/lat polygon
per fragment even across ±180°, float32 centres, zone-less timestamp strings, int16 grid ints,
``list<int64>`` pixel boxes and ``unique_id`` = sha256 of numpy's truncated print of the vector.
Cells sit at their true UTM position (`synthetic.place_cell`), fragments follow Algorithm 1, and
vectors cluster by the cell's synthetic land-cover class so products give meaningful answers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import shapely

from majortom_assets import grid, synthetic
from majortom_assets.fragment import fragment_layout

IMAGE_SIDE = 1068
PIXEL_M = 10.0

RELEASED_SCHEMA = pa.schema([
    ("unique_id", pa.large_string()),
    ("embedding", pa.list_(pa.float32())),
    ("timestamp", pa.large_string()),
    ("product_id", pa.large_string()),
    ("grid_cell", pa.large_string()),
    ("grid_row_u", pa.int16()),
    ("grid_col_r", pa.int16()),
    ("geometry", pa.binary()),
    ("centre_lat", pa.float32()),
    ("centre_lon", pa.float32()),
    ("utm_footprint", pa.large_string()),
    ("utm_crs", pa.large_string()),
    ("pixel_bbox", pa.list_(pa.int64())),
])


def reference_rows(cells: Sequence[str], dim: int, fragment_size: int = 224, timestamps: int = 1,
                   seed: int = 0, transposed: bool = True) -> dict[str, list]:
    """Column lists of one released-style table (rows in cell, time, fragment order)."""
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(seed + 1).normal(size=(len(synthetic.LAND_COVER_CLASSES), dim))
    layout = fragment_layout(IMAGE_SIDE, IMAGE_SIDE, fragment_size)
    out: dict[str, list] = {name: [] for name in RELEASED_SCHEMA.names}
    start = datetime(2021, 1, 15, 10, 10, 31, tzinfo=UTC)
    for cell in cells:
        place = synthetic.place_cell(cell, IMAGE_SIDE)
        _, _, x0, _, _, y0 = place.transform
        to_ll = pyproj.Transformer.from_crs(f"EPSG:{place.epsg}", "EPSG:4326", always_xy=True)
        cls = synthetic.cell_class(cell)
        for t in range(timestamps):
            when = start + timedelta(days=37 * t, minutes=3 * t)
            product = f"S2A_MSIL1C_{when:%Y%m%dT%H%M%S}_N0500_R{place.epsg % 100:03d}_T{cell.replace('_', '')}"
            for r0, c0, r1, c1 in layout.boxes:
                # the reference reads [row, col, ...] as [col, row, ...]
                a0, b0, a1, b1 = (c0, r0, c1, r1) if transposed else (r0, c0, r1, c1)
                xmin, xmax = x0 + PIXEL_M * b0, x0 + PIXEL_M * b1
                ymin, ymax = y0 - PIXEL_M * a1, y0 - PIXEL_M * a0
                utm = shapely.box(xmin, ymin, xmax, ymax)
                xs, ys = np.asarray(utm.exterior.coords).T
                lon, lat = to_ll.transform(xs, ys)
                geom = shapely.Polygon(np.stack([lon, lat], axis=1))
                clon, clat = to_ll.transform((xmin + xmax) / 2, (ymin + ymax) / 2)
                vec = (protos[cls] + 0.6 * rng.normal(size=dim) + 0.1 * t).astype(np.float32)
                out["unique_id"].append(hashlib.sha256(str(vec).encode()).hexdigest())
                out["embedding"].append(vec.tolist())
                out["timestamp"].append(when.strftime("%Y-%m-%dT%H:%M:%S"))
                out["product_id"].append(product)
                out["grid_cell"].append(cell)
                out["grid_row_u"].append(place.row)
                out["grid_col_r"].append(place.col)
                out["geometry"].append(shapely.to_wkb(geom))
                out["centre_lat"].append(clat)
                out["centre_lon"].append(clon)
                out["utm_footprint"].append(utm.wkt)
                out["utm_crs"].append(f"EPSG:{place.epsg}")
                out["pixel_bbox"].append([int(r0), int(c0), int(r1), int(c1)])
    return out


def write_reference_file(path: str | os.PathLike, cells: Sequence[str], dim: int, fragment_size: int = 224,
                         timestamps: int = 1, seed: int = 0, transposed: bool = True,
                         row_group_size: int | None = None) -> Path:
    """One parquet file as geopandas writes the reference embedder's GeoDataFrame."""
    cols = reference_rows(cells, dim, fragment_size, timestamps, seed, transposed)
    table = pa.Table.from_pydict(cols, schema=RELEASED_SCHEMA)
    geoms = shapely.from_wkb(cols["geometry"])
    bounds = shapely.total_bounds(geoms).tolist() if len(geoms) else [0.0, 0.0, 0.0, 0.0]
    geo = {"primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "crs": None, "geometry_types": ["Polygon"],
                                    "bbox": bounds}},
           "version": "1.1.0", "creator": {"library": "geopandas", "version": "1.0.1"}}
    pandas_meta = {"index_columns": [{"kind": "range", "name": None, "start": 0, "stop": table.num_rows,
                                      "step": 1}], "column_indexes": [], "columns": [
        {"name": f.name, "field_name": f.name, "pandas_type": "object", "numpy_type": "object",
         "metadata": None} for f in RELEASED_SCHEMA], "creator": {"library": "pyarrow"}}
    table = table.replace_schema_metadata({b"geo": json.dumps(geo).encode(),
                                           b"pandas": json.dumps(pandas_meta).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_reference_set(folder: str | os.PathLike, rows: Sequence[str], cells_per_row: int, dim: int,
                        fragment_size: int = 224, timestamps: int = 1, files: int = 1, seed: int = 0) -> Path:
    """A released-style folder ``<folder>/embeddings/part_XXXXX.parquet`` over the cells of ``rows``."""
    cells = synthetic.cells_for_rows(rows, cells_per_row)
    cells = sorted(cells, key=lambda c: grid.parse_cell_name(c))
    chunks = np.array_split(np.arange(len(cells)), files)
    folder = Path(folder)
    for i, idx in enumerate(chunks):
        if len(idx):
            write_reference_file(folder / "embeddings" / f"part_{i:05d}.parquet", [cells[j] for j in idx],
                                 dim, fragment_size, timestamps, seed + i)
    return folder


# ------------------------------------------------------------------------ AlphaEarth stand-ins
def write_aef_tile(path: str | os.PathLike, codes_north_up: np.ndarray, west: float, north: float, epsg: int,
                   positive_y: bool = False, pixel_m: float = PIXEL_M) -> Path:
    """A 64-band int8 COG (no data -128) whose pixel (i, j) of ``codes_north_up`` lies at
    (west + pixel_m·j, north − pixel_m·i); ``positive_y`` stores the rows south-to-north, as some
    AEF tiles do (a positive y step in the geotransform)."""
    import rasterio
    from affine import Affine

    _, h, w = codes_north_up.shape
    if positive_y:
        data = codes_north_up[:, ::-1, :]
        transform = Affine(pixel_m, 0.0, west, 0.0, pixel_m, north - pixel_m * h)
    else:
        data = codes_north_up
        transform = Affine(pixel_m, 0.0, west, 0.0, -pixel_m, north)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="COG", width=w, height=h, count=codes_north_up.shape[0], dtype="int8",
                       crs=f"EPSG:{epsg}", transform=transform, nodata=-128, compress="none", overviews="NONE",
                       blocksize=256) as dst:
        dst.write(np.ascontiguousarray(data))
    return path


def write_aef_tiles(folder: str | os.PathLike, cells: Sequence[str], year: int = 2021, seed: int = 0,
                    margin_px: int = 20) -> Path:
    """One AEF-style tile per cell (every other one with a positive y step) and ``index.parquet``
    (path, year, crs, wgs84 bounds). Codes cluster by the cell's synthetic land-cover class, with
    a no-data strip along each tile's west edge. Returns the index path."""
    import pandas as pd
    from rasterio.warp import transform_bounds

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(seed + 1).normal(size=(len(synthetic.LAND_COVER_CLASSES), 64))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    rows = []
    for k, cell in enumerate(cells):
        place = synthetic.place_cell(cell, IMAGE_SIDE)
        _, _, x0, _, _, y0 = place.transform
        side = IMAGE_SIDE + 2 * margin_px
        proto = protos[synthetic.cell_class(cell)]
        base = np.clip(np.round(np.sign(proto) * np.sqrt(np.abs(proto)) * 127.5), -100, 100).astype(np.int8)
        noise = rng.integers(-12, 13, size=(64, side, side), dtype=np.int8)
        codes = noise + base[:, None, None]        # stays within [-112, 112]: never the no-data code
        codes[:, :, : margin_px + 30] = -128
        west, north = x0 - PIXEL_M * margin_px, y0 + PIXEL_M * margin_px
        name = f"aef_{year}_{cell}.tif"
        write_aef_tile(folder / name, codes, west, north, place.epsg, positive_y=bool(k % 2))
        bounds = transform_bounds(f"EPSG:{place.epsg}", "OGC:CRS84", west, north - PIXEL_M * side,
                                  west + PIXEL_M * side, north)
        rows.append({"path": name, "year": year, "crs": f"EPSG:{place.epsg}", "wgs84_west": bounds[0],
                     "wgs84_south": bounds[1], "wgs84_east": bounds[2], "wgs84_north": bounds[3]})
    index = folder / "index.parquet"
    pd.DataFrame(rows).to_parquet(index)
    return index
