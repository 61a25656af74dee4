"""Turning three PCA scores per cell into colours and an equirectangular world map (paper Fig. 4).

Kept free of I/O on embeddings: inputs are per-cell score arrays, outputs are pixels and files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from majortom_assets import geoparquet


def scores_to_rgb(scores: np.ndarray, low_pct: float = 2.0, high_pct: float = 98.0) -> np.ndarray:
    """(N, 3) scores -> (N, 3) uint8.

    Each component is scaled robustly (its [low_pct, high_pct] percentile range maps to [0, 1], so
    a few outliers cannot wash out the map), then every channel is scaled so its mean intensity
    equals the mean over the three channels, as the paper does so no colour dominates the map.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != 3:
        raise ValueError(f"expected (N, 3) scores, got shape {s.shape}")
    if not 0 <= low_pct < high_pct <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_pct}, {high_pct}")
    if len(s) == 0:
        return np.zeros((0, 3), np.uint8)
    lo, hi = np.percentile(s, [low_pct, high_pct], axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    v = np.clip((s - lo) / span, 0.0, 1.0)
    v[:, hi <= lo] = 0.5
    means = v.mean(axis=0)
    target = means.mean()
    gain = np.divide(target, means, out=np.ones(3), where=means > 0)
    v = np.clip(v * gain, 0.0, 1.0)
    return np.rint(v * 255.0).astype(np.uint8)


def lonlat_to_pixel(lon: np.ndarray, lat: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Equirectangular pixel (x, y) of each point; the map spans [-180, 180] × [-90, 90]."""
    x = np.floor((np.asarray(lon, dtype=np.float64) + 180.0) / 360.0 * width).astype(np.int64)
    y = np.floor((90.0 - np.asarray(lat, dtype=np.float64)) / 180.0 * height).astype(np.int64)
    return np.clip(x, 0, width - 1), np.clip(y, 0, height - 1)


def render_map(
    lon: np.ndarray, lat: np.ndarray, rgb: np.ndarray, width: int = 2048, height: int = 1024,
    marker_px: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) bool coverage mask, each cell a marker_px square.

    At 2048 px a 10 km cell is about half a pixel wide, so a small square marker keeps sparse
    coverage visible; all markers are painted with one fancy-indexing assignment per offset.
    """
    if marker_px < 1:
        raise ValueError(f"marker_px must be >= 1, got {marker_px}")
    image = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), bool)
    x, y = lonlat_to_pixel(lon, lat, width, height)
    offsets = np.arange(marker_px) - marker_px // 2
    for dy in offsets:
        yy = np.clip(y + dy, 0, height - 1)
        for dx in offsets:
            xx = (x + dx) % width  # wrap across the antimeridian
            image[yy, xx] = rgb
            mask[yy, xx] = True
    return image, mask


def write_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with geoparquet.atomic_output(path) as tmp:
        Image.fromarray(image, mode="RGB").save(tmp, format="PNG")
    return path


def write_geotiff(image: np.ndarray, mask: np.ndarray, path: Path) -> Path:
    """EPSG:4326 RGBA GeoTIFF of the map; alpha marks painted pixels."""
    import rasterio
    from affine import Affine

    height, width = mask.shape
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": 4, "dtype": "uint8",
        "crs": "EPSG:4326", "transform": Affine(360.0 / width, 0.0, -180.0, 0.0, -180.0 / height, 90.0),
        "compress": "deflate", "photometric": "RGB",
    }
    with geoparquet.atomic_output(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(np.moveaxis(image, -1, 0), indexes=[1, 2, 3])
        dst.write(np.where(mask, 255, 0).astype(np.uint8), 4)
        dst.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                           rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.alpha]
    return path


def write_points_geoparquet(frame, path: Path) -> Path:
    """Cell centres as GeoParquet 1.1 points (OGC:CRS84) with the frame's columns."""
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(
        frame, geometry=gpd.points_from_xy(frame["centre_lon"], frame["centre_lat"]), crs="OGC:CRS84"
    )
    with geoparquet.atomic_output(path) as tmp:
        gdf.to_parquet(tmp, index=False, schema_version="1.1.0", write_covering_bbox=False)
    return path
