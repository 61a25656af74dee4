"""AlphaEarth Foundations (AEF) annual embeddings pooled onto Major TOM fragments, as Table 2 files.

AEF publishes one 64-dimensional unit vector per 10 m pixel and year, quantised to int8
(``v = (q / 127.5)² · sign(q)``, ``q = -128`` = no data), as per-UTM-zone Cloud-Optimised GeoTIFF
tiles listed in a tile index. For a Major TOM cell the 1068 × 1068 px, 10 m image footprint of
the cell (`synthetic.place_cell`: the bottom-left corner in the cell's UTM zone, snapped to 10 m)
is filled pixel by pixel from every tile that covers it, by nearest pixel centre:

* tiles in the cell's own CRS are read as one window each; a tile with a *positive* y step
  (rows running north) is indexed through its own affine, so its rows come out north-up;
* tiles in another CRS (a neighbouring UTM zone) are resampled through a GDAL warped VRT.

Each fragment of Algorithm 1 (`fragment.fragment_layout`) is then the mean of its valid pixels'
dequantised vectors, renormalised to unit length. Pixels with no data in any band are left out;
a fragment with no valid pixel is skipped and reported (`PoolFailure`), never written as zeros.
The rows are written with `geoparquet.sample_table` / `write_embeddings` under model name
``alphaearth``, so search, PCA maps, time series and evaluation treat AEF like any other model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import shapely

from majortom_assets import geoparquet, grid
from majortom_assets.remote import redact_url

MODEL_NAME = "alphaearth"
BANDS = 64
NODATA = -128
IMAGE_SIDE = 1068
PIXEL_M = 10.0
DEFAULT_FRAGMENT = 224
WEIGHTS = "AlphaEarth Foundations annual satellite embedding (published, int8-quantised)"
_PATH_COLUMNS = ("path", "location", "url", "file", "tile")
_CRS_COLUMNS = ("crs", "utm_crs", "epsg")


class AlphaEarthError(ValueError):
    """An AEF tile or index that cannot be used; the message names the tile or cell."""


def dequantise_table() -> np.ndarray:
    """256-entry lookup: uint8 view of an int8 code -> float32 value (no-data maps to 0)."""
    q = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float64)
    values = np.sign(q) * (q / 127.5) ** 2
    values[q == NODATA] = 0.0
    return values.astype(np.float32)


_LUT = dequantise_table()


def dequantise(q: np.ndarray) -> np.ndarray:
    """int8 codes -> float32 values, ``(q/127.5)² · sign(q)``; no-data (-128) becomes 0."""
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise TypeError(f"AEF codes are int8, got {q.dtype}")
    return _LUT[q.view(np.uint8)]


# ---------------------------------------------------------------------------------- tile index
@dataclass(frozen=True)
class Tile:
    path: str            # as rasterio opens it (absolute path or URL)
    year: int | None
    crs: str             # e.g. EPSG:32633
    bounds: tuple[float, float, float, float]   # lon/lat west, south, east, north


def _column(frame: pd.DataFrame, names: Sequence[str], what: str, where: str, required: bool = True):
    for name in names:
        if name in frame.columns:
            return frame[name]
    if required:
        raise AlphaEarthError(f"tile index {where} has no {what} column (one of {', '.join(names)})")
    return None


def read_tile_index(index: str | os.PathLike) -> list[Tile]:
    """Tiles of a tile index (GeoParquet / parquet / CSV), or of a folder of GeoTIFFs.

    Index columns: the tile's ``path`` (or location/url/file; relative paths are taken from the
    index's folder), ``year`` (optional), ``crs`` (optional: read from the tile otherwise) and
    its lon/lat footprint as WKB ``geometry`` or ``wgs84_west/south/east/north`` (optional: from
    the tile header otherwise).
    """
    text = os.fspath(index)
    shown = redact_url(text)
    local = "://" not in text
    if local and Path(text).is_dir():
        paths = sorted(str(p) for p in Path(text).rglob("*.tif*"))
        if not paths:
            raise AlphaEarthError(f"tile folder {shown} holds no .tif files")
        return [_tile_from_header(p, None) for p in paths]
    if local and not Path(text).is_file():
        raise FileNotFoundError(f"AEF tile index {shown} does not exist")
    frame = pd.read_csv(text) if text.endswith(".csv") else pd.read_parquet(text)
    paths = _column(frame, _PATH_COLUMNS, "tile path", shown)
    years = _column(frame, ("year",), "year", shown, required=False)
    crss = _column(frame, _CRS_COLUMNS, "crs", shown, required=False)
    base = Path(text).parent if local else None
    tiles = []
    for i, p in enumerate(paths.astype(str)):
        full = p if ("://" in p or Path(p).is_absolute() or base is None) else str(base / p)
        year = int(years.iloc[i]) if years is not None and pd.notna(years.iloc[i]) else None
        bounds = _index_bounds(frame, i)
        crs = _crs_text(crss.iloc[i]) if crss is not None and pd.notna(crss.iloc[i]) else None
        if bounds is None or crs is None:
            t = _tile_from_header(full, year)
            tiles.append(Tile(full, year, crs or t.crs, bounds or t.bounds))
        else:
            tiles.append(Tile(full, year, crs, bounds))
    return tiles


def _crs_text(value) -> str:
    text = str(value)
    return f"EPSG:{int(float(text))}" if text.replace(".", "", 1).isdigit() else text


def _index_bounds(frame: pd.DataFrame, i: int) -> tuple[float, float, float, float] | None:
    names = ("wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north")
    if all(n in frame.columns for n in names):
        return tuple(float(frame[n].iloc[i]) for n in names)
    if "geometry" in frame.columns and frame["geometry"].iloc[i] is not None:
        g = frame["geometry"].iloc[i]
        geom = shapely.from_wkb(g) if isinstance(g, (bytes, bytearray)) else shapely.from_wkt(str(g))
        return tuple(float(v) for v in shapely.bounds(geom))
    return None


@lru_cache(maxsize=4096)
def _tile_from_header(path: str, year: int | None) -> Tile:
    import rasterio
    from rasterio.warp import transform_bounds

    try:
        with rasterio.open(path) as src:
            if src.count != BANDS or src.dtypes[0] != "int8":
                raise AlphaEarthError(f"AEF tile {redact_url(path)}: {src.count} bands of {src.dtypes[0]}, "
                                      f"expected {BANDS} bands of int8")
            crs = src.crs.to_string()
            bounds = transform_bounds(src.crs, "OGC:CRS84", *src.bounds, densify_pts=21)
    except rasterio.errors.RasterioIOError as exc:
        raise AlphaEarthError(f"AEF tile {redact_url(path)} cannot be opened: {exc}") from None
    return Tile(path, year, crs, tuple(float(b) for b in bounds))


# ------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class CellImage:
    grid_cell: str
    crs: str
    transform: tuple[float, float, float, float, float, float]
    codes: np.ndarray        # (64, H, W) int8, NODATA where no tile covers the pixel
    tiles: tuple[str, ...]   # tiles that contributed pixels


def cell_placement(grid_cell: str, size: int = IMAGE_SIDE):
    from majortom_assets.synthetic import place_cell

    return place_cell(grid_cell, size)


def _intersects(tile: Tile, cell_bounds: tuple[float, float, float, float]) -> bool:
    w, s, e, n = cell_bounds
    tw, ts, te, tn = tile.bounds
    if ts > n or tn < s:
        return False
    if tw <= te:
        return not (tw > e or te < w) if w <= e else True
    return True   # a tile footprint across ±180: let the pixel read decide


def read_cell(grid_cell: str, tiles: Sequence[Tile], year: int | None = None,
              size: int = IMAGE_SIDE) -> CellImage:
    """The cell's (64, size, size) int8 codes from every tile (of ``year``) that covers it."""
    place = cell_placement(grid_cell, size)
    crs = f"EPSG:{place.epsg}"
    a, _, x0, _, e, y0 = place.transform
    g = grid.get_grid()
    row, col = grid.parse_cell_name(grid_cell)
    # The image footprint in lon/lat, padded: the image can reach beyond the cell's own bounds.
    west, south, east, north = (float(v) for v in g.cell_bounds(row, col))
    pad = 0.1
    box = (west - pad, south - pad, east + pad, north + pad)
    codes = np.full((BANDS, size, size), NODATA, dtype=np.int8)
    used = []
    xs = x0 + a * (np.arange(size) + 0.5)     # target pixel centres
    ys = y0 + e * (np.arange(size) + 0.5)
    for tile in tiles:
        if year is not None and tile.year is not None and tile.year != year:
            continue
        if not _intersects(tile, box):
            continue
        if _fill_from_tile(codes, tile, crs, place.transform, xs, ys):
            used.append(tile.path)
    return CellImage(grid_cell, crs, tuple(place.transform), codes, tuple(used))


def _fill_from_tile(codes: np.ndarray, tile: Tile, crs: str, transform, xs: np.ndarray, ys: np.ndarray) -> bool:
    """Fill still-empty target pixels from one tile; True if it gave any pixel."""
    import rasterio
    from rasterio.crs import CRS

    try:
        src = rasterio.open(tile.path)
    except rasterio.errors.RasterioIOError as exc:
        raise AlphaEarthError(f"AEF tile {redact_url(tile.path)} cannot be opened: {exc}") from None
    with src:
        if src.count != BANDS or src.dtypes[0] != "int8":
            raise AlphaEarthError(f"AEF tile {redact_url(tile.path)}: {src.count} bands of {src.dtypes[0]}, "
                                  f"expected {BANDS} bands of int8")
        if src.crs == CRS.from_string(crs) and src.transform.b == 0 and src.transform.d == 0:
            block = _read_same_crs(src, xs, ys)
        else:
            block = _read_warped(src, crs, transform, len(ys), len(xs))
    if block is None:
        return False
    empty = (codes == NODATA).all(axis=0)
    have = (block != NODATA).all(axis=0)
    take = empty & have
    if not take.any():
        return False
    codes[:, take] = block[:, take]
    return True


def _read_same_crs(src, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
    """Nearest source pixel of each target centre through the tile's own affine (either y sign)."""
    t = src.transform
    cols = np.floor((xs - t.c) / t.a).astype(np.int64)
    rows = np.floor((ys - t.f) / t.e).astype(np.int64)    # t.e > 0: rows run north; still exact
    okc = (cols >= 0) & (cols < src.width)
    okr = (rows >= 0) & (rows < src.height)
    if not okc.any() or not okr.any():
        return None
    from rasterio.windows import Window

    c0, c1 = int(cols[okc].min()), int(cols[okc].max()) + 1
    r0, r1 = int(rows[okr].min()), int(rows[okr].max()) + 1
    window = src.read(window=Window(c0, r0, c1 - c0, r1 - r0))
    out = np.full((BANDS, len(ys), len(xs)), NODATA, dtype=np.int8)
    ri, ci = np.flatnonzero(okr), np.flatnonzero(okc)
    sr, sc = rows[ri] - r0, cols[ci] - c0
    dr, dc = np.diff(sr), np.diff(sc)
    if (dc == 1).all() and ((dr == 1).all() or (dr == -1).all()) and np.ptp(ri) + 1 == len(ri) \
            and np.ptp(ci) + 1 == len(ci):
        # aligned 10 m grids (the usual case): two slices, reversed for a positive y step
        step = 1 if len(dr) == 0 or dr[0] == 1 else -1
        stop = sr[-1] + step if sr[-1] + step >= 0 else None
        out[:, ri[0]:ri[-1] + 1, ci[0]:ci[-1] + 1] = window[:, sr[0]:stop:step, sc[0]:sc[-1] + 1]
    else:
        out[:, ri[:, None], ci[None, :]] = window[:, sr[:, None], sc[None, :]]
    return out


def _read_warped(src, crs: str, transform, height: int, width: int) -> np.ndarray:
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    with WarpedVRT(src, crs=crs, transform=Affine(*transform), width=width, height=height,
                   resampling=Resampling.nearest, src_nodata=NODATA, nodata=NODATA) as vrt:
        return vrt.read()


# ------------------------------------------------------------------------------------- pooling
@dataclass(frozen=True)
class PoolFailure:
    grid_cell: str
    pixel_bbox: tuple[int, int, int, int] | None
    reason: str


def pool_fragments(codes: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per box: unit mean of the valid pixels' dequantised vectors, and the valid-pixel count.

    Returns (vectors (N, 64) float32, counts (N,), ok (N,) bool); a box with no valid pixel, or
    whose mean is the zero vector, is not ok. A code has only 256 values, so each band's sum is
    a histogram of its codes (one ``bincount`` over all bands) times the dequantisation table:
    exact in float64 and about twice as fast as dequantising every pixel.
    """
    bands = codes.shape[0]
    lut = _LUT.astype(np.float64)
    offsets = (np.arange(bands, dtype=np.intp) * 256)[:, None]
    nodata = np.uint8(np.int8(NODATA).view(np.uint8))
    out = np.zeros((len(boxes), bands), np.float64)
    counts = np.zeros(len(boxes), np.int64)
    for k, (r0, c0, r1, c1) in enumerate(np.asarray(boxes)):
        u = codes[:, r0:r1, c0:c1].view(np.uint8)
        valid = (u != nodata).all(axis=0).reshape(-1)
        n = int(valid.sum())
        counts[k] = n
        if n == 0:
            continue
        u = u.reshape(bands, -1)
        if n < valid.size:      # a pixel missing any band is left out entirely (its codes -> 0)
            u = np.where(valid, u, nodata)
        hist = np.bincount((u + offsets).ravel(), minlength=bands * 256).reshape(bands, 256)
        out[k] = hist @ lut / n
    norms = np.linalg.norm(out, axis=1)
    ok = (counts > 0) & (norms > 0)
    out[ok] /= norms[ok, None]
    return out.astype(np.float32), counts, ok


@dataclass
class AlphaEarthResult:
    tables: list[pa.Table] = field(default_factory=list)
    failures: list[PoolFailure] = field(default_factory=list)
    fragments: int = 0
    cells: int = 0


def cell_table(image: CellImage, year: int, fragment_size: int = DEFAULT_FRAGMENT
               ) -> tuple[pa.Table | None, list[PoolFailure]]:
    """Table 2 rows of one cell's pooled fragments, and the fragments skipped (with why)."""
    from majortom_assets.fragment import fragment_layout

    size = image.codes.shape[1]
    layout = fragment_layout(size, image.codes.shape[2], fragment_size)
    vectors, counts, ok = pool_fragments(image.codes, layout.boxes)
    failures = [PoolFailure(image.grid_cell, tuple(int(v) for v in layout.boxes[k]),
                            "no valid AEF pixel (all no-data)" if counts[k] == 0 else "zero mean vector")
                for k in np.flatnonzero(~ok)]
    if not ok.any():
        return None, failures
    product = f"AEF_{year}"
    table = geoparquet.sample_table(
        np.ascontiguousarray(vectors[ok]), grid_cell=image.grid_cell, product_id=product,
        timestamp=pd.Timestamp(year=year, month=1, day=1, tz="UTC"), crs=image.crs,
        transform=image.transform, boxes=layout.boxes[ok])
    return table, failures


def embed_cells(cells: Iterable[str], tiles: Sequence[Tile], year: int,
                fragment_size: int = DEFAULT_FRAGMENT) -> Iterator[tuple[str, pa.Table | None, list[PoolFailure]]]:
    """(cell, Table 2 rows or None, skipped fragments) per cell; a cell no tile covers is reported."""
    for cell in cells:
        try:
            image = read_cell(cell, tiles, year)
        except AlphaEarthError as exc:
            yield cell, None, [PoolFailure(cell, None, str(exc))]
            continue
        if not image.tiles:
            yield cell, None, [PoolFailure(cell, None, f"no AEF tile of {year} covers the cell")]
            continue
        table, failures = cell_table(image, year, fragment_size)
        yield cell, table, failures


def file_info(index: str, year: int, fragment_size: int) -> geoparquet.EmbeddingFileInfo:
    return geoparquet.EmbeddingFileInfo(
        model=MODEL_NAME, weights=WEIGHTS, random_weights=False, embedding_dim=BANDS,
        fragment_size=fragment_size, target_overlap=0.1, source_collection=redact_url(index),
        extra={"year": int(year), "pooling": "mean of dequantised pixel vectors, renormalised; "
                                              "no-data pixels left out"})


def write_rows(root: str | os.PathLike, index: str | os.PathLike, cells: Sequence[str], year: int,
               fragment_size: int = DEFAULT_FRAGMENT, tiles: Sequence[Tile] | None = None
               ) -> dict[str, dict]:
    """Pool the cells' AEF pixels and write one Table 2 file per grid row under ``root``.

    Returns per row: the file, fragments written, cells covered and the skipped fragments. A row
    with no fragment at all writes no file (its failures are still written and returned).
    """
    from majortom_assets.core import SampleFailure
    from majortom_assets.engine import write_failures
    from majortom_assets.layout import StorageLayout

    layout = StorageLayout.at(root)
    tiles = list(tiles) if tiles is not None else read_tile_index(index)
    by_row: dict[str, list[str]] = {}
    for cell in cells:
        r, c = grid.parse_cell_name(cell)
        by_row.setdefault(str(grid.row_name(r)), []).append(str(grid.cell_name(r, c)))
    summary = {}
    for row, row_cells in sorted(by_row.items(), key=lambda kv: grid.parse_row_name(kv[0])):
        tables, failures, covered = [], [], 0
        for _cell, table, fails in embed_cells(row_cells, tiles, year, fragment_size):
            failures += fails
            if table is not None:
                tables.append(table)
                covered += 1
        path = layout.embeddings_file(MODEL_NAME, row)
        n = sum(t.num_rows for t in tables)
        if tables:
            geoparquet.write_embeddings(path, tables, file_info(os.fspath(index), year, fragment_size))
        write_failures(layout.failures_file(MODEL_NAME, row), [
            SampleFailure(f"AEF_{year}", f.grid_cell, f.reason if f.pixel_bbox is None
                          else f"fragment {list(f.pixel_bbox)}: {f.reason}", "alphaearth pooling")
            for f in failures])
        summary[row] = {"file": str(path) if tables else None, "fragments": n, "cells": covered,
                        "cells_requested": len(row_cells), "skipped": failures}
    return summary
