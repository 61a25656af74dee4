"""Global PCA that streams: mergeable float64 moments, O(dim²) memory whatever the row count.

Each partition contributes :class:`PCAMoments` (count, mean, centred scatter matrix). Moments of
independent partitions merge exactly (Chan, Golub & LeVeque's pairwise update), so partitions
can be fitted in parallel and combined in any order. We keep the *centred* scatter rather than
the raw sum of outer products: the two carry the same information (raw = scatter + n·μμᵀ) but
subtracting n·μμᵀ at the end cancels catastrophically when |μ|² ≫ variance, which is common for
post-ReLU CNN features. ``sum_`` and ``outer_sum_`` are exposed for anyone who wants the raw form.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from majortom_assets import geoparquet
from majortom_assets.vectors import files
from majortom_assets.vectors.pca_map import (
    render_map,
    scores_to_rgb,
    write_geotiff,
    write_png,
    write_points_geoparquet,
)

_MOMENT_BLOCK = 8192  # rows per float64 update: bounds the temporary copy to 8192·dim·8 bytes


@dataclass
class PCAMoments:
    """Sufficient statistics of a set of vectors; the identity element has count 0."""

    count: int
    mean: np.ndarray     # (dim,) float64
    scatter: np.ndarray  # (dim, dim) float64, Σ (x-μ)(x-μ)ᵀ

    @classmethod
    def empty(cls, dim: int) -> PCAMoments:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, x: np.ndarray) -> PCAMoments:
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"expected a (N, dim) matrix, got shape {x.shape}")
        out = cls.empty(x.shape[1])
        for start in range(0, len(x), _MOMENT_BLOCK):
            block = x[start:start + _MOMENT_BLOCK].astype(np.float64)
            mu = block.mean(axis=0)
            c = block - mu
            out = out.merge(cls(len(block), mu, c.T @ c))
        return out

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def sum_(self) -> np.ndarray:
        return self.count * self.mean

    @property
    def outer_sum_(self) -> np.ndarray:
        return self.scatter + self.count * np.outer(self.mean, self.mean)

    def merge(self, other: PCAMoments) -> PCAMoments:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {self.dim} and {other.dim}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / n)
        return PCAMoments(n, mean, scatter)

    def subtract(self, part: PCAMoments) -> PCAMoments:
        """The moments of this set without `part` (which must have been merged into it).

        The exact inverse of `merge`, so a global fit can drop a replaced or removed row in O(dim²)
        instead of re-merging every other row.
        """
        if part.dim != self.dim:
            raise ValueError(f"cannot subtract moments of dimension {part.dim} from {self.dim}")
        if part.count == 0:
            return self
        if part.count > self.count:
            raise ValueError(f"cannot subtract {part.count} vectors from a set of {self.count}")
        n = self.count - part.count
        if n == 0:
            return PCAMoments.empty(self.dim)
        mean = (self.count * self.mean - part.count * part.mean) / n
        delta = part.mean - mean
        scatter = self.scatter - part.scatter - np.outer(delta, delta) * (n * part.count / self.count)
        return PCAMoments(n, mean, scatter)

    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"PCA needs at least 2 vectors, got {self.count}")
        return self.scatter / (self.count - 1)

    def save(self, path: str | os.PathLike) -> Path:
        """npz (no pickles), written atomically so a crashed partition never leaves half a file."""
        with geoparquet.atomic_output(Path(path)) as tmp, open(tmp, "wb") as f:
            np.savez(f, count=np.int64(self.count), mean=self.mean, scatter=self.scatter)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PCAMoments:
        with np.load(path, allow_pickle=False) as z:
            return cls(int(z["count"]), z["mean"], z["scatter"])


def merge_all(moments: Iterable[PCAMoments]) -> PCAMoments:
    total: PCAMoments | None = None
    for m in moments:
        total = m if total is None else total.merge(m)
    if total is None:
        raise ValueError("no moments to merge")
    return total


def file_moments(
    path: str | os.PathLike, central_only: bool = True, batch_rows: int = files.DEFAULT_BATCH_ROWS
) -> PCAMoments:
    """Moments of one partition: the central fragment of each sample, or all fragments."""
    path = Path(path)
    mask = files.file_central_mask(path) if central_only else None
    total = PCAMoments.empty(files.file_dim(path))
    for offset, x, _ in files.iter_embeddings(path, batch_rows):
        if mask is not None:
            x = x[mask[offset:offset + len(x)]]
        if len(x):
            total = total.merge(PCAMoments.of(x))
    return total


class StreamingPCA:
    """PCA from merged moments; components are unit rows sorted by decreasing variance.

    Sign convention: the largest-magnitude loading of each component is positive, so two fits of
    the same data give identical signs (PCA itself is only defined up to sign).
    """

    def __init__(self, n_components: int = 3) -> None:
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        self.n_components = n_components
        self.moments: PCAMoments | None = None

    def partial_fit(self, x: np.ndarray) -> StreamingPCA:
        m = PCAMoments.of(x)
        self.moments = m if self.moments is None else self.moments.merge(m)
        return self._solve()

    def fit_moments(self, moments: PCAMoments) -> StreamingPCA:
        self.moments = moments
        return self._solve()

    def fit_files(
        self, paths, central_only: bool = True, progress: bool = False,
        batch_rows: int = files.DEFAULT_BATCH_ROWS,
    ) -> StreamingPCA:
        paths = files.global_paths(paths)
        it = tqdm(paths, desc="PCA moments", unit="partition", disable=not progress)
        return self.fit_moments(merge_all(file_moments(p, central_only, batch_rows) for p in it))

    def _solve(self) -> StreamingPCA:
        assert self.moments is not None
        dim = self.moments.dim
        if self.n_components > dim:
            raise ValueError(f"n_components={self.n_components} exceeds the embedding dimension {dim}")
        values, vectors = np.linalg.eigh(self.moments.covariance())
        order = np.argsort(values)[::-1]
        values = np.clip(values[order], 0.0, None)
        comps = vectors[:, order[: self.n_components]].T
        flip = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
        self.components_ = comps * flip[:, None]
        self.mean_ = self.moments.mean
        self.n_samples_ = self.moments.count
        self.explained_variance_ = values[: self.n_components]
        total = values.sum()
        self.explained_variance_ratio_ = self.explained_variance_ / total if total > 0 else values[:0]
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise RuntimeError("StreamingPCA is not fitted yet")

    def transform(self, x: np.ndarray) -> np.ndarray:
        self._check_fitted()
        x = np.asarray(x)
        if x.shape[-1] != self.mean_.shape[0]:
            raise ValueError(f"vectors of dimension {x.shape[-1]} do not match the PCA's {self.mean_.shape[0]}")
        return (x.astype(np.float64) - self.mean_) @ self.components_.T

    def metadata(self) -> dict:
        self._check_fitted()
        return {
            "n_components": self.n_components,
            "n_samples": int(self.n_samples_),
            "dim": int(self.mean_.shape[0]),
            "explained_variance": [float(v) for v in self.explained_variance_],
            "explained_variance_ratio": [float(v) for v in self.explained_variance_ratio_],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Moments + n_components as npz; the fit is recomputed on load (cheap: one eigh)."""
        self._check_fitted()
        with geoparquet.atomic_output(Path(path)) as tmp, open(tmp, "wb") as f:
            np.savez(f, count=np.int64(self.moments.count), mean=self.moments.mean,
                     scatter=self.moments.scatter, n_components=np.int64(self.n_components),
                     info=np.array(json.dumps(self.metadata())))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StreamingPCA:
        with np.load(path, allow_pickle=False) as z:
            moments = PCAMoments(int(z["count"]), z["mean"], z["scatter"])
            return cls(int(z["n_components"])).fit_moments(moments)


def project_file(
    path: str | os.PathLike, pca: StreamingPCA, central_only: bool = False,
    batch_rows: int = files.DEFAULT_BATCH_ROWS,
) -> pa.Table:
    """PCA scores of one partition with the columns needed to place them (pc1..pcK)."""
    path = Path(path)
    keep = ["unique_id", "grid_cell", "product_id", "timestamp", "centre_lat", "centre_lon"]
    mask = files.file_central_mask(path) if central_only else None
    parts = []
    for offset, x, meta in files.iter_embeddings(path, batch_rows, keep):
        if mask is not None:
            m = mask[offset:offset + len(x)]
            x, meta = x[m], meta.filter(pa.array(m))
        scores = pca.transform(x)
        cols = {f"pc{i + 1}": pa.array(scores[:, i]) for i in range(scores.shape[1])}
        parts.append(pa.Table.from_pydict({**{c: meta.column(c) for c in keep}, **cols}))
    if not parts:
        return pa.table({c: [] for c in keep})
    return pa.concat_tables(parts)


def cell_scores(paths, pca: StreamingPCA, progress: bool = False) -> pd.DataFrame:
    """Mean PCA scores of each cell's central fragment(s), one row per grid cell.

    A cell seen at several timestamps/products contributes the mean of its central fragments, so
    the map shows one colour per place.
    """
    frames = []
    for path in tqdm(files.global_paths(paths), desc="PCA scores", unit="partition", disable=not progress):
        frames.append(project_file(path, pca, central_only=True).to_pandas())
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if df.empty:
        raise ValueError("no central fragments found in the given embedding files")
    pcs = [f"pc{i + 1}" for i in range(pca.n_components)]
    out = df.groupby("grid_cell", sort=True).agg(
        centre_lat=("centre_lat", "mean"), centre_lon=("centre_lon", "mean"),
        samples=("unique_id", "size"), **{c: (c, "mean") for c in pcs},
    )
    return out.reset_index()


def pca_rgb_map(
    paths, pca: StreamingPCA, out_png: str | os.PathLike, out_parquet: str | os.PathLike,
    out_tif: str | os.PathLike | None = None, width: int = 2048, height: int = 1024,
    marker_px: int = 3, low_pct: float = 2.0, high_pct: float = 98.0, progress: bool = False,
) -> dict:
    """World map of the first three components of each cell's central fragment, as RGB.

    Writes the PNG, a GeoParquet of cell centres with pc1..pc3 and r, g, b, and optionally an
    EPSG:4326 GeoTIFF of the same raster; returns metadata for the caller (e.g. a Dagster asset).
    """
    if pca.n_components < 3:
        raise ValueError(f"an RGB map needs a PCA with 3 components, this one has {pca.n_components}")
    cells = cell_scores(paths, pca, progress)
    rgb = scores_to_rgb(cells[["pc1", "pc2", "pc3"]].to_numpy(), low_pct, high_pct)
    cells["r"], cells["g"], cells["b"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    image, mask = render_map(cells["centre_lon"].to_numpy(), cells["centre_lat"].to_numpy(), rgb,
                             width, height, marker_px)
    write_png(image, Path(out_png))
    keep = ["grid_cell", "centre_lat", "centre_lon", "samples", "pc1", "pc2", "pc3", "r", "g", "b"]
    write_points_geoparquet(cells[keep], Path(out_parquet))
    if out_tif is not None:
        write_geotiff(image, mask, Path(out_tif))
    return {
        "cells": len(cells),
        "png": str(out_png), "parquet": str(out_parquet), "tif": str(out_tif) if out_tif else None,
        "width": width, "height": height, "painted_pixels": int(mask.sum()),
        "mean_rgb": [float(v) for v in rgb.mean(axis=0)],
        **pca.metadata(),
    }
