"""Synthetic Major TOM Core collections: real GeoTIFF-in-parquet shards in exactly the Core layout.

Each cell gets one land-cover class (its label, shared by every source and timestamp) and one
spatial layout: a dominant class mixed with a secondary one through smooth fields, crop parcels,
urban blocks and texture. S2 bands follow per-class reflectance signatures (x1e4, uint16; L1C adds
an atmospheric path-radiance offset), S1 bands per-class linear backscatter with gamma speckle.
Timestamps vary phenology, brightness, clouds and no-data a little. Images sit at the cell's true
UTM position: the bottom-left corner projected into the cell's zone, snapped to 10 m, the image
extending size x 10 m east and north of it.

CLI: ``python -m majortom_assets.synthetic OUT --source S2L2A --rows 12D 136U --timestamps 3``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pyproj import Transformer

from majortom_assets import geotiff, grid
from majortom_assets.core import LABELS_FILE, band_factor
from majortom_assets.geoparquet import atomic_output
from majortom_assets.standard import (
    BANDS,
    CORE_IMAGE_SIZE,
    NOMINAL_PIXEL_M,
    S1RTC_BANDS,
    S2_MASK_COLUMNS,
    S2L1C_BANDS,
    SOURCES,
    Source,
)

LAND_COVER_CLASSES: tuple[str, ...] = ("water", "forest", "cropland", "urban", "bare", "snow")

# Surface reflectance x1e4 per class, in S2L1C_BANDS order (B01..B08, B8A, B09, B10, B11, B12):
# textbook shapes (water dark and falling, vegetation red edge + NIR plateau, soil rising to SWIR,
# snow bright in the visible and dark in the SWIR). Cropland is a per-parcel mix of CROP_GREEN
# and CROP_SOIL that follows the season.
CLASS_REFLECTANCE: dict[str, tuple[int, ...]] = {
    "water":    (600, 500, 450, 300, 250, 200, 180, 150, 130, 60, 10, 80, 60),
    "forest":   (250, 300, 500, 280, 750, 2200, 2700, 2900, 3050, 900, 15, 1450, 650),
    "urban":    (1100, 1050, 1100, 1150, 1250, 1350, 1450, 1500, 1550, 500, 30, 1750, 1550),
    "bare":     (1300, 1400, 1800, 2300, 2600, 2800, 2900, 3000, 3100, 950, 35, 3800, 3200),
    "snow":     (9000, 9200, 9000, 8700, 8400, 8100, 7900, 7700, 7400, 2600, 250, 900, 700),
}
CROP_GREEN = (300, 400, 750, 450, 1200, 2800, 3400, 3700, 3800, 1100, 20, 2100, 1100)
CROP_SOIL = (900, 1000, 1350, 1650, 1900, 2100, 2200, 2300, 2400, 800, 25, 3000, 2500)
CLOUD_REFLECTANCE = (7000, 7200, 7300, 7400, 7400, 7500, 7500, 7600, 7600, 2500, 1500, 5500, 4200)
L1C_PATH_RADIANCE = (1000, 750, 450, 250, 180, 120, 100, 80, 70, 30, 0, 20, 10)   # TOA minus BOA
# Linear backscatter (vv, vh) per class; cropland mixes green and soil like S2.
CLASS_BACKSCATTER: dict[str, tuple[float, float]] = {
    "water": (0.008, 0.0015), "forest": (0.09, 0.025), "urban": (0.35, 0.06),
    "bare": (0.025, 0.004), "snow": (0.06, 0.01),
}
CROP_GREEN_BACKSCATTER = (0.07, 0.018)
CROP_SOIL_BACKSCATTER = (0.03, 0.005)
# Per-class texture: (amplitude of multiplicative texture, low-frequency control points per image).
CLASS_TEXTURE: dict[str, tuple[float, int]] = {
    "water": (0.03, 6), "forest": (0.10, 90), "cropland": (0.05, 30), "urban": (0.15, 40),
    "bare": (0.12, 12), "snow": (0.05, 10),
}
GEOTIFF_COMPRESSION = ("deflate", "zstd", "lzw", "none")


def _stable_int(*parts: object) -> int:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def cell_class(grid_cell: str, seed: int = 0) -> int:
    """The label of a cell: a pure function of (seed, cell), so every source agrees."""
    return _stable_int(seed, "class", grid_cell) % len(LAND_COVER_CLASSES)


def default_cells() -> list[str]:
    """Six cells covering the awkward cases: both ends of a row at ±180°, Svalbard (zones 31X-37X),
    the Norway 32V exception, the southern hemisphere (EPSG 327zz) and an ordinary mid-latitude cell."""
    g = grid.get_grid()
    fiji_row = int(g.latlon_to_cell(-17.5, 178.0)[0])
    west, east = g.cells_in_row(fiji_row)[[0, -1]]
    places = [(78.2, 15.6), (60.4, 5.3), (-33.9, 18.4), (45.5, 9.2)]   # Svalbard, Bergen, Cape Town, Milan
    names = [grid.cell_name(fiji_row, int(west)), grid.cell_name(fiji_row, int(east))]
    names += [str(g.latlon_to_cell_name(lat, lon)) for lat, lon in places]
    return names


def cells_for_rows(rows: Sequence[str], cells_per_row: int) -> list[str]:
    """Evenly spaced cells of each row, always including its west- and east-most cells."""
    g = grid.get_grid()
    out = []
    for name in rows:
        row = grid.parse_row_name(name)
        cols = g.cells_in_row(row)
        picks = np.unique(np.linspace(0, len(cols) - 1, max(1, cells_per_row)).round().astype(int))
        out += [grid.cell_name(row, int(c)) for c in cols[picks]]
    return out


class SyntheticConfig(BaseModel):
    """Validated inputs of :func:`generate_collection` (also what the CLI parses into)."""

    model_config = ConfigDict(extra="forbid")
    source: Source
    cells: list[str] | None = None
    rows: list[str] | None = None
    cells_per_row: int = Field(4, ge=1)
    timestamps: int = Field(1, ge=1)
    size: int = Field(CORE_IMAGE_SIZE, ge=6)
    seed: int = Field(0, ge=0)
    samples_per_shard: int = Field(16, ge=1)
    compress: Literal["deflate", "zstd", "lzw", "none"] = "deflate"

    @field_validator("cells")
    @classmethod
    def _cells(cls, cells):
        if cells is None:
            return None
        return [grid.cell_name(row, col) for row, col in grid.parse_cell_list(cells)]

    @field_validator("rows")
    @classmethod
    def _rows(cls, rows):
        if rows is None:
            return None
        grid.parse_row_names(rows)
        return list(rows)

    @field_validator("size")
    @classmethod
    def _size(cls, size):
        if size % 6:
            raise ValueError(f"size {size} must be a multiple of 6 so 20 m and 60 m bands have integer sizes")
        return size

    def resolved_cells(self) -> list[str]:
        cells = list(self.cells or [])
        if self.rows:
            cells += cells_for_rows(self.rows, self.cells_per_row)
        if not cells:
            cells = default_cells()
        return list(dict.fromkeys(cells))

    @property
    def band_columns(self) -> tuple[str, ...]:
        if self.source == "S1RTC":
            return S1RTC_BANDS
        return BANDS[self.source] + S2_MASK_COLUMNS


# --------------------------------------------------------------------------------------------
# georeferencing


@lru_cache(maxsize=128)
def _to_utm(epsg: int) -> Transformer:
    return Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)


@lru_cache(maxsize=128)
def _from_utm(epsg: int) -> Transformer:
    return Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)


@dataclass(frozen=True)
class CellPlacement:
    grid_cell: str
    row: int
    col: int
    epsg: int
    transform: tuple[float, float, float, float, float, float]   # 10 m grid, rasterio order
    centre_lat: float
    centre_lon: float


def place_cell(grid_cell: str, size: int) -> CellPlacement:
    """The cell's bottom-left corner in its UTM zone, snapped down to 10 m, as the image's bottom-left."""
    g = grid.get_grid()
    row, col = grid.parse_cell_name(grid_cell)
    lat, lon = (float(v) for v in g.cell_corner(row, col))
    epsg = int(g.utm_epsg(row, col))
    east, north = _to_utm(epsg).transform(lon, lat)
    east0 = np.floor(east / NOMINAL_PIXEL_M) * NOMINAL_PIXEL_M
    north0 = np.floor(north / NOMINAL_PIXEL_M) * NOMINAL_PIXEL_M
    extent = size * NOMINAL_PIXEL_M
    clon, clat = _from_utm(epsg).transform(east0 + extent / 2, north0 + extent / 2)
    clon = (clon + 180.0) % 360.0 - 180.0
    pixel = float(NOMINAL_PIXEL_M)
    transform = (pixel, 0.0, float(east0), 0.0, -pixel, float(north0 + extent))
    return CellPlacement(grid_cell, row, col, epsg, transform, float(clat), float(clon))


# --------------------------------------------------------------------------------------------
# scene content


@lru_cache(maxsize=16)
def _interp_matrix(size: int, points: int) -> np.ndarray:
    """(size, points + 1) linear interpolation weights: smooth fields are W @ noise @ W.T."""
    x = (np.arange(size) + 0.5) / size * points
    i0 = np.minimum(np.floor(x).astype(int), points - 1)
    frac = (x - i0).astype(np.float32)
    w = np.zeros((size, points + 1), np.float32)
    w[np.arange(size), i0] = 1.0 - frac
    w[np.arange(size), i0 + 1] = frac
    return w


def _smooth_field(rng: np.random.Generator, size: int, points: int) -> np.ndarray:
    """Zero-mean, unit-variance field with about ``points`` features across the image."""
    w = _interp_matrix(size, points)
    field = w @ rng.standard_normal((points + 1, points + 1), dtype=np.float32) @ w.T
    field -= field.mean()
    field /= field.std() + 1e-6
    return field


def _blocks(rng: np.random.Generator, size: int, low: int, high: int) -> tuple[np.ndarray, int]:
    """Per-pixel id of random rectangular blocks (parcels, city blocks) and the number of ids."""
    def edges() -> np.ndarray:
        cuts = np.cumsum(rng.integers(low, high, size // low + 2))
        return np.searchsorted(cuts, np.arange(size), side="right")
    ry, rx = edges(), edges()
    nx = int(rx.max()) + 1
    return ry[:, None] * nx + rx[None, :], (int(ry.max()) + 1) * nx


@dataclass
class _Layout:
    """What stays fixed for a cell across sources and timestamps."""

    classes: tuple[str, str]          # dominant, secondary
    dominant_weight: np.ndarray       # (size, size) float32 in [0, 1]
    texture: tuple[np.ndarray, np.ndarray]
    parcel_id: np.ndarray             # (size, size) int
    parcel_green: np.ndarray          # (n_parcels,) base green fraction
    parcel_phase: np.ndarray          # (n_parcels,) season phase


def _cell_layout(grid_cell: str, seed: int, size: int) -> _Layout:
    rng = np.random.default_rng(_stable_int(seed, "layout", grid_cell))
    dominant = LAND_COVER_CLASSES[cell_class(grid_cell, seed)]
    others = [c for c in LAND_COVER_CLASSES if c != dominant and not (dominant != "snow" and c == "snow")]
    secondary = others[int(rng.integers(len(others)))]
    share = _smooth_field(rng, size, 5)
    threshold = np.quantile(share[::8, ::8], 0.2)   # ~80 % of the image is the dominant class
    weight = 1.0 / (1.0 + np.exp(-(share - threshold) / 0.08))
    textures = []
    for cls in (dominant, secondary):
        amp, points = CLASS_TEXTURE[cls]
        tex = 1.0 + amp * _smooth_field(rng, size, points)
        if cls == "urban":
            ids, n = _blocks(rng, size, 6, 14)
            tex *= rng.uniform(0.75, 1.3, n).astype(np.float32)[ids]
        textures.append(np.clip(tex, 0.3, 3.0).astype(np.float32))
    parcel_id, n_parcels = _blocks(rng, size, 30, 90)
    return _Layout((dominant, secondary), weight.astype(np.float32), (textures[0], textures[1]),
                   parcel_id, rng.uniform(0.2, 0.9, n_parcels), rng.uniform(0, 2 * np.pi, n_parcels))


def _endmembers(cls: str, s1: bool) -> list[tuple[str, np.ndarray]]:
    """(kind, per-band signature) pairs of a class; cropland has a green and a soil member."""
    if cls == "cropland":
        green, soil = (CROP_GREEN_BACKSCATTER, CROP_SOIL_BACKSCATTER) if s1 else (CROP_GREEN, CROP_SOIL)
        return [("green", np.asarray(green, np.float32)), ("soil", np.asarray(soil, np.float32))]
    table = CLASS_BACKSCATTER if s1 else CLASS_REFLECTANCE
    return [("plain", np.asarray(table[cls], np.float32))]


@dataclass
class _Acquisition:
    when: datetime
    cloud_fraction: float
    nodata: bool


def _render(layout: _Layout, cfg: SyntheticConfig, acq: _Acquisition, rng: np.random.Generator
            ) -> tuple[dict[str, np.ndarray], float, float]:
    """Band arrays at native resolution, cloud cover (percent, S2 only) and no-data fraction.

    Every band is a linear mix of a few abundance maps, so all bands of one resolution come out
    of a single (bands x maps) @ (maps x pixels) product.
    """
    size, s1 = cfg.size, cfg.source == "S1RTC"
    season = 2 * np.pi * acq.when.timetuple().tm_yday / 365.25
    green = np.clip(layout.parcel_green + 0.35 * np.sin(season + layout.parcel_phase), 0, 1)
    green = green.astype(np.float32)[layout.parcel_id]
    vigour = np.float32(1.0 + 0.08 * np.sin(season))   # vegetation brightens in its season
    gain = np.float32(rng.uniform(0.97, 1.03))          # illumination / calibration drift
    band_names = S1RTC_BANDS if s1 else S2L1C_BANDS
    maps, coefs = [], []
    for cls, share, tex in zip(layout.classes, (layout.dominant_weight, 1.0 - layout.dominant_weight),
                               layout.texture):
        base = share * tex
        for kind, signature in _endmembers(cls, s1):
            maps.append(base * green if kind == "green" else base * (1.0 - green) if kind == "soil" else base)
            coef = signature * gain
            if cls in ("forest", "cropland"):
                coef = coef * np.where(np.arange(len(signature)) >= (0 if s1 else 4), vigour, 1.0)
            coefs.append(coef)
    maps_10m, coefs = np.stack(maps), np.stack(coefs, axis=1).astype(np.float32)   # (K, n, n), (bands, K)
    cloud = np.zeros((size, size), bool)
    if acq.cloud_fraction > 0 and not s1:
        field = _smooth_field(rng, size, 8)
        cloud = field > np.quantile(field[::4, ::4], 1.0 - acq.cloud_fraction)
    nodata = np.zeros((size, size), bool)
    if acq.nodata:   # a swath edge: a diagonal wedge off one corner
        yy, xx = np.ogrid[:size, :size]
        nodata = (xx + 0.6 * yy) < rng.uniform(0.15, 0.45) * size
    # one noise draw per resolution; each band takes a shifted window of it
    columns = [c for c in cfg.band_columns if c != "cloud_mask"]
    out: dict[str, np.ndarray] = {}
    for f in sorted({band_factor(c) for c in columns}):
        cols = [c for c in columns if band_factor(c) == f]
        idx = [band_names.index(c) for c in cols]
        n = size // f
        k = maps_10m.shape[0]
        values = (coefs[idx] @ _block_mean_stack(maps_10m, f).reshape(k, n * n)).reshape(len(cols), n, n)
        if s1:
            pool = rng.gamma(4.4, 1 / 4.4, (n + len(cols), n)).astype(np.float32)   # multi-looked speckle
        else:
            pool = 1.0 + 0.02 * rng.standard_normal((n + len(cols), n), dtype=np.float32)
        cld, nod = cloud[::f, ::f], nodata[::f, ::f]
        for j, (column, i) in enumerate(zip(cols, idx)):
            value = values[j] * pool[j: j + n]
            if s1:
                value = np.maximum(value, 1e-5)
            else:
                if cld.any():
                    value = np.where(cld, 0.1 * value + 0.9 * CLOUD_REFLECTANCE[i], value)
                if cfg.source == "S2L1C":
                    value += L1C_PATH_RADIANCE[i]
                value = np.clip(np.rint(value), 1, 65535).astype(np.uint16)
            if acq.nodata:
                value[nod] = 0
            out[column] = value.astype(np.float32 if s1 else np.uint16, copy=False)
    if not s1:
        out["cloud_mask"] = (cloud & ~nodata).astype(np.uint8)
    cloud_cover = float((cloud & ~nodata).mean() * 100.0)
    return out, cloud_cover, float(nodata.mean())


def _block_mean_stack(maps: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return maps
    k, n = maps.shape[0], maps.shape[1] // factor
    return maps.reshape(k, n, factor, n, factor).mean(axis=(2, 4))


# --------------------------------------------------------------------------------------------
# encoding and writing


def encode_geotiff(array: np.ndarray, transform: Sequence[float], epsg: int, compress: str = "deflate",
                   nodata: float | None = 0) -> bytes:
    """A single-band GeoTIFF as bytes (predictor 2 for integers, 3 for floats when compressed).

    Written by rasterio/GDAL when it is installed, else by :func:`encode_geotiff_numpy` (the GPU
    check's machine has no GDAL), which covers ``none`` and ``deflate``.
    """
    if not geotiff.rasterio_available():
        return encode_geotiff_numpy(array, transform, epsg, compress, nodata)
    from affine import Affine
    from rasterio.io import MemoryFile

    options: dict = {}
    if compress != "none":
        options = {"compress": compress, "predictor": 3 if array.dtype.kind == "f" else 2}
        if compress == "deflate":
            options["zlevel"] = 1   # same format and decode cost as level 6, far quicker to write
    with MemoryFile() as memfile:
        with memfile.open(driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
                          dtype=array.dtype, crs=f"EPSG:{epsg}", transform=Affine(*transform[:6]),
                          nodata=nodata, **options) as ds:
            ds.write(array, 1)
        return memfile.read()


# TIFF field types and the tags a GDAL GeoTIFF band carries, for the numpy writer below
_SHORT, _LONG, _DOUBLE, _ASCII = 3, 4, 12, 2
_TIFF_FIELD_DTYPES = {_SHORT: "<u2", _LONG: "<u4", _DOUBLE: "<f8", _ASCII: "u1"}
_SAMPLE_FORMAT = {"u": 1, "i": 2, "f": 3}
_STRIP_BYTES = 8192   # GDAL's default strip size, so both writers give the decoder the same work


def encode_geotiff_numpy(array: np.ndarray, transform: Sequence[float], epsg: int, compress: str = "deflate",
                         nodata: float | None = 0) -> bytes:
    """The same single-band GeoTIFF as GDAL writes, from numpy and zlib alone.

    Strips of ~8 KB like GDAL's default, DEFLATE level 1 with the horizontal predictor for
    integers (floats unpredicted: the floating-point predictor needs imagecodecs to read back),
    a north-up pixel-is-area grid (pixel scale + tie point) and a projected EPSG GeoKey directory.
    """
    if compress not in ("deflate", "none"):
        raise ValueError(f"GeoTIFF compression {compress!r} needs rasterio; without it use deflate or none")
    array = np.ascontiguousarray(array)
    if array.ndim != 2 or array.dtype.kind not in _SAMPLE_FORMAT:
        raise ValueError(f"expected a 2-d integer or float array, got {array.dtype} {array.shape}")
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    height, width = array.shape
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    if b != 0.0 or d != 0.0 or e >= 0.0:
        raise ValueError(f"only north-up grids can be written without rasterio, got {tuple(transform[:6])}")
    predictor = 2 if compress == "deflate" and array.dtype.kind in "ui" else 1
    rows = max(1, _STRIP_BYTES // (width * array.dtype.itemsize))
    if predictor == 2:   # horizontal differencing, wrapping like the decoder's cumulative sum
        array = np.concatenate([array[:, :1], np.diff(array, axis=1)], axis=1).astype(array.dtype)
    strips = [array[r: r + rows].tobytes() for r in range(0, height, rows)]
    if compress == "deflate":
        strips = [zlib.compress(strip, 1) for strip in strips]
    geokeys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, int(epsg)]
    tags: list[tuple[int, int, list | bytes]] = [
        (256, _LONG, [width]), (257, _LONG, [height]), (258, _SHORT, [8 * array.dtype.itemsize]),
        (259, _SHORT, [8 if compress == "deflate" else 1]), (262, _SHORT, [1]),
        (273, _LONG, [0] * len(strips)), (277, _SHORT, [1]), (278, _LONG, [rows]),
        (279, _LONG, [len(s) for s in strips]), (284, _SHORT, [1]), (317, _SHORT, [predictor]),
        (339, _SHORT, [_SAMPLE_FORMAT[array.dtype.kind]]), (33550, _DOUBLE, [a, -e, 0.0]),
        (33922, _DOUBLE, [0.0, 0.0, 0.0, c, f, 0.0]), (34735, _SHORT, geokeys),
    ]
    if nodata is not None:
        tags.append((42113, _ASCII, f"{nodata:g}".encode() + b"\0"))
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(tags) + 4
    blobs: list[bytes] = []   # out-of-line tag values, in tag order; the strips follow them
    entries: list[list[int]] = []
    slot: dict[int, int] = {}  # tag -> index of its blob
    for tag, typ, values in tags:
        raw = bytes(values) if typ == _ASCII else np.asarray(values, _TIFF_FIELD_DTYPES[typ]).tobytes()
        if len(raw) <= 4:   # the value sits in the entry itself
            entries.append([tag, typ, len(values), int.from_bytes(raw.ljust(4, b"\0"), "little")])
        else:
            slot[tag] = len(blobs)
            entries.append([tag, typ, len(values), data_offset + sum(len(x) for x in blobs)])
            blobs.append(raw)
    position = data_offset + sum(len(x) for x in blobs)
    strip_offsets = np.cumsum([position] + [len(x) for x in strips[:-1]]).astype("<u4")
    offsets_entry = next(entry for entry in entries if entry[0] == 273)
    if 273 in slot:
        blobs[slot[273]] = strip_offsets.tobytes()
    else:
        offsets_entry[3] = int(strip_offsets[0])
    header = b"II*\x00" + ifd_offset.to_bytes(4, "little")
    ifd = len(entries).to_bytes(2, "little") + np.array([tuple(x) for x in entries], geotiff.IFD_ENTRY).tobytes()
    return b"".join([header, ifd, bytes(4), *blobs, *strips])


def _thumbnail(bands: dict[str, np.ndarray], source: str) -> bytes:
    if source == "S1RTC":
        vv, vh = (10 * np.log10(np.maximum(bands[b][::4, ::4], 1e-6)) for b in ("vv", "vh"))
        rgb = np.stack([(vv + 25) / 25, (vh + 32) / 25, (vv - vh) / 15], axis=-1)
    else:
        rgb = np.stack([bands[b][::4, ::4] for b in ("B04", "B03", "B02")], axis=-1) * (2.5 / 1e4)
    buf = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


_LAT_BANDS = "CDEFGHJKLMNPQRSTUVWX"


def _product_id(source: str, when: datetime, place: CellPlacement, rng: np.random.Generator) -> str:
    sat = "AB"[int(rng.integers(2))]
    if source == "S1RTC":
        stop = when + timedelta(seconds=25)
        return (f"S1{sat}_IW_GRDH_1SDV_{when:%Y%m%dT%H%M%S}_{stop:%Y%m%dT%H%M%S}_"
                f"{int(rng.integers(10000, 60000)):06d}_{int(rng.integers(1, 2**24)):06X}_"
                f"{int(rng.integers(0, 2**16)):04X}")
    g = grid.get_grid()
    lat = float(g.cell_corner(place.row, place.col)[0])
    lat_band = _LAT_BANDS[min(int((lat + 80) // 8), len(_LAT_BANDS) - 1)] if lat >= -80 else "C"
    tile_rng = np.random.default_rng(_stable_int("tile", place.grid_cell))   # same tile and orbit every pass
    square = "".join(chr(ord("A") + int(v)) for v in tile_rng.integers(0, 26, 2))
    orbit = int(tile_rng.integers(1, 144))
    level = "MSIL1C" if source == "S2L1C" else "MSIL2A"
    processed = when + timedelta(hours=int(rng.integers(2, 30)), minutes=int(rng.integers(60)))
    return (f"S2{sat}_{level}_{when:%Y%m%dT%H%M%S}_N{int(rng.choice([209, 213, 214, 400, 509])):04d}_"
            f"R{orbit:03d}_T{place.epsg % 100:02d}{lat_band}{square}_"
            f"{processed:%Y%m%dT%H%M%S}")


def _acquisitions(grid_cell: str, place: CellPlacement, cfg: SyntheticConfig) -> list[_Acquisition]:
    """Dates every ~37 days from a per-cell start; S2 near 10:30 and S1 near 06:00 local solar time."""
    rng = np.random.default_rng(_stable_int(cfg.seed, "dates", cfg.source, grid_cell))
    local_hour = 6.0 if cfg.source == "S1RTC" else 10.5
    start = datetime(2020, 1, 15, tzinfo=UTC) + timedelta(days=int(rng.integers(0, 20)))
    out = []
    for t in range(cfg.timestamps):
        day = start + timedelta(days=37 * t + int(rng.integers(0, 5)))
        utc_hour = (local_hour - place.centre_lon / 15.0) % 24.0
        when = day + timedelta(hours=utc_hour, seconds=int(rng.integers(0, 600)))
        cloudy = cfg.source != "S1RTC" and rng.random() < 0.5
        out.append(_Acquisition(when.replace(microsecond=0),
                                float(rng.uniform(0.02, 0.3)) if cloudy else 0.0,
                                bool(rng.random() < 0.2)))
    return out


def _shard_schema(band_columns: Sequence[str]) -> pa.Schema:
    fields = [pa.field("product_id", pa.string()), pa.field("grid_cell", pa.string()),
              pa.field("product_datetime", pa.string()), pa.field("thumbnail", pa.binary())]
    return pa.schema(fields + [pa.field(b, pa.binary()) for b in band_columns])


@dataclass
class _Sample:
    product_id: str
    stamp: str
    cloud_cover: float
    nodata: float
    record: dict


def _make_sample(cfg: SyntheticConfig, layout: _Layout, place: CellPlacement, acq: _Acquisition,
                 cell: str, t: int, pool: ThreadPoolExecutor) -> _Sample:
    rng = np.random.default_rng(_stable_int(cfg.seed, "render", cfg.source, cell, t))
    bands, cloud_cover, nodata = _render(layout, cfg, acq, rng)
    product_id = _product_id(cfg.source, acq.when, place, rng)

    def encode(column: str) -> bytes:
        f = band_factor(column)
        a, b, c, d, e, ff = place.transform
        return encode_geotiff(bands[column], (a * f, b, c, d, e * f, ff), place.epsg, cfg.compress,
                              nodata=None if column == "cloud_mask" else 0)

    columns = cfg.band_columns
    encoded = dict(zip(columns, pool.map(encode, columns)))   # GDAL encodes outside the GIL
    stamp = f"{acq.when:%Y%m%dT%H%M%S}"
    record = {"product_id": [product_id], "grid_cell": [cell], "product_datetime": [stamp],
              "thumbnail": [_thumbnail(bands, cfg.source)], **{c: [encoded[c]] for c in columns}}
    return _Sample(product_id, stamp, cloud_cover, nodata, record)


def generate_collection(out_dir: str | os.PathLike, source: Source, cells: Sequence[str] | None = None,
                        rows: Sequence[str] | None = None, cells_per_row: int = 4, timestamps: int = 1,
                        size: int = CORE_IMAGE_SIZE, seed: int = 0, samples_per_shard: int = 16,
                        compress: str = "deflate") -> Path:
    """Write a Core collection: images/part_XXXXX.parquet, metadata.parquet, labels.parquet.

    Deterministic in ``seed``. Every file is written to a temporary name and renamed into place;
    metadata.parquet goes last, so a collection with metadata is complete.
    """
    cfg = SyntheticConfig(source=source, cells=list(cells) if cells else None,
                          rows=list(rows) if rows else None, cells_per_row=cells_per_row,
                          timestamps=timestamps, size=size, seed=seed,
                          samples_per_shard=samples_per_shard, compress=compress)
    out = Path(out_dir)
    cell_names = cfg.resolved_cells()
    band_columns = cfg.band_columns
    schema = _shard_schema(band_columns)
    binary = ["thumbnail", *band_columns]
    meta: dict[str, list] = {k: [] for k in ("grid_cell", "grid_row_u", "grid_col_r", "product_id",
                                             "timestamp", "cloud_cover", "nodata", "centre_lat",
                                             "centre_lon", "crs", "parquet_url", "parquet_row")}
    jobs = [(c, t) for c in cell_names for t in range(cfg.timestamps)]
    compression = {c: "NONE" for c in binary} | {c: "SNAPPY" for c in ("product_id", "grid_cell",
                                                                      "product_datetime")}
    current: tuple[str, _Layout, CellPlacement, list[_Acquisition]] | None = None
    with ThreadPoolExecutor(2) as pool:
        for shard, first in enumerate(range(0, len(jobs), cfg.samples_per_shard)):
            shard_name = f"part_{shard:05d}.parquet"
            with atomic_output(out / "images" / shard_name) as tmp, pq.ParquetWriter(
                    tmp, schema, compression=compression, use_dictionary=False,
                    write_statistics=["product_id", "grid_cell", "product_datetime"]) as writer:
                for row_in_shard, (cell, t) in enumerate(jobs[first: first + cfg.samples_per_shard]):
                    if current is None or current[0] != cell:   # one cell at a time: flat memory
                        place = place_cell(cell, cfg.size)
                        current = (cell, _cell_layout(cell, cfg.seed, cfg.size), place,
                                   _acquisitions(cell, place, cfg))
                    _, layout, place, acqs = current
                    sample = _make_sample(cfg, layout, place, acqs[t], cell, t, pool)
                    # one write_table call per sample = one row group per sample, as in Core
                    writer.write_table(pa.Table.from_pydict(sample.record, schema=schema))
                    for key, value in (("grid_cell", cell), ("grid_row_u", place.row),
                                       ("grid_col_r", place.col), ("product_id", sample.product_id),
                                       ("timestamp", sample.stamp),
                                       ("cloud_cover", round(sample.cloud_cover, 3)),
                                       ("nodata", round(sample.nodata, 5)),
                                       ("centre_lat", place.centre_lat), ("centre_lon", place.centre_lon),
                                       ("crs", f"EPSG:{place.epsg}"),
                                       ("parquet_url", f"images/{shard_name}"),
                                       ("parquet_row", row_in_shard)):
                        meta[key].append(value)
    if cfg.source == "S1RTC":
        del meta["cloud_cover"]   # like Core-S1RTC: no cloud cover for radar
    metadata = pa.table({**meta, "grid_row_u": pa.array(meta["grid_row_u"], pa.int32()),
                         "grid_col_r": pa.array(meta["grid_col_r"], pa.int32()),
                         "parquet_row": pa.array(meta["parquet_row"], pa.int64())})
    labels = pa.table({"grid_cell": cell_names,
                       "class_id": pa.array([cell_class(c, cfg.seed) for c in cell_names], pa.int32()),
                       "class_name": [LAND_COVER_CLASSES[cell_class(c, cfg.seed)] for c in cell_names]})
    with atomic_output(out / LABELS_FILE) as tmp:
        pq.write_table(labels, tmp)
    with atomic_output(out / "metadata.parquet") as tmp:
        pq.write_table(metadata, tmp)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m majortom_assets.synthetic",
                                     description="Write a synthetic Major TOM Core collection.")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--rows", nargs="+", help="grid rows such as 12D 136U")
    parser.add_argument("--cells", nargs="+", help="grid cells such as 136U_496R")
    parser.add_argument("--cells-per-row", type=int, default=4)
    parser.add_argument("--timestamps", type=int, default=1)
    parser.add_argument("--size", type=int, default=CORE_IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--compress", choices=GEOTIFF_COMPRESSION, default="deflate")
    args = parser.parse_args(argv)
    from pydantic import ValidationError

    try:
        out = generate_collection(args.out, args.source, cells=args.cells, rows=args.rows,
                                  cells_per_row=args.cells_per_row, timestamps=args.timestamps,
                                  size=args.size, seed=args.seed, samples_per_shard=args.samples_per_shard,
                                  compress=args.compress)
    except ValidationError as exc:
        parser.error("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    n = pq.read_metadata(out / "metadata.parquet").num_rows
    print(f"wrote {n} samples to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
