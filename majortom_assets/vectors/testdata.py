"""Synthetic Table 2 embedding partitions with known structure, for tests and benchmarks.

Vectors are clustered, not uniform noise: each class has a centre in a low-rank subspace (real
embeddings have low intrinsic dimension), each cell adds its own offset around its class centre,
each fragment and date adds smaller noise. Files are written with the project's GeoParquet
writer, so everything downstream reads exactly what the embedding pipeline produces.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyproj

from majortom_assets import geoparquet
from majortom_assets.fragment import fragment_layout
from majortom_assets.grid import cell_name, get_grid, parse_cell_name, row_name
from majortom_assets.standard import CORE_IMAGE_SIZE, NOMINAL_PIXEL_M


@dataclass
class SyntheticEmbeddings:
    root: Path
    model: str
    paths: list[Path]
    labels: pd.DataFrame  # grid_cell, class_id, centre_lat, centre_lon
    timestamps: list[pd.Timestamp]
    changed_cells: dict[str, int] = field(default_factory=dict)  # cell -> index of the changed date


def cells_in_rows(rows: Sequence[int], cells_per_row: int, first_col: int = 0, step: int = 3) -> list[str]:
    grid = get_grid()
    out = []
    for r in rows:
        cols = grid.cells_in_row(int(r))
        start = int(np.searchsorted(cols, first_col))
        picked = cols[(start + step * np.arange(cells_per_row)) % len(cols)]
        out.extend(str(cell_name(int(r), int(c))) for c in picked)
    return out


def class_centres(n_classes: int, dim: int, rng: np.random.Generator, rank: int = 32) -> np.ndarray:
    basis = rng.standard_normal((min(rank, dim), dim))
    return rng.standard_normal((n_classes, min(rank, dim))) @ basis / np.sqrt(rank)


def clustered_vectors(
    n: int, dim: int, n_clusters: int, rng: np.random.Generator, rank: int = 64,
    sub_per_cluster: int = 32, sub_scale: float = 0.35, noise: float = 0.12,
    point_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(n, dim) float32 hierarchical clusters (cluster -> sub-cluster -> point) in a low-rank space.

    The structure comes from ``rng``; the points from ``point_rng`` (default ``rng``), so batches
    drawn with fresh point generators share one set of clusters.
    """
    centres = class_centres(n_clusters, dim, rng, rank).astype(np.float32)
    basis = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    sub = centres[:, None, :] + sub_scale * (
        rng.standard_normal((n_clusters, sub_per_cluster, rank)).astype(np.float32) @ basis
    )
    sub = sub.reshape(-1, dim)
    prng = point_rng or rng
    out = sub[prng.integers(0, len(sub), n)]
    out += noise * prng.standard_normal((n, dim), dtype=np.float32)
    return out


def _transform_for(grid_cell: str, size: int) -> tuple[str, tuple[float, ...]]:
    row, col = parse_cell_name(grid_cell)
    grid = get_grid()
    lat, lon = grid.cell_corner(row, col)
    epsg = int(grid.utm_epsg(row, col))
    to_utm = pyproj.Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    x, y = to_utm.transform(float(lon), float(lat))
    pixel = float(NOMINAL_PIXEL_M)
    return f"EPSG:{epsg}", (pixel, 0.0, x, 0.0, -pixel, y + pixel * size)


def write_synthetic(
    root: str | Path, model: str = "test-model", cells: Sequence[str] | None = None, dim: int = 16,
    n_classes: int = 4, timestamps: int = 1, fragment_size: int = 224, image_size: int = CORE_IMAGE_SIZE,
    seed: int = 0, class_scale: float = 1.0, cell_scale: float = 0.3, fragment_scale: float = 0.1,
    date_scale: float = 0.02, changed_fraction: float = 0.0, change_scale: float = 1.0,
    row_group_size: int | None = None,
) -> SyntheticEmbeddings:
    """Write ``<root>/embeddings/<model>/row=<ROW>/embeddings.parquet`` for the given cells.

    embedding = class centre + cell offset + fragment offset (stable over time) + date noise;
    ``changed_fraction`` of cells jump by ``change_scale`` at one random date (ground truth for
    change scores in ``changed_cells``).
    """
    rng = np.random.default_rng(seed)
    cells = list(cells) if cells is not None else cells_in_rows([-30, 0, 1, 700], 4)
    layout = fragment_layout(image_size, image_size, fragment_size)
    nfrag = layout.count
    centres = class_scale * class_centres(n_classes, dim, rng)
    classes = rng.integers(0, n_classes, len(cells))
    dates = [pd.Timestamp("2021-01-01", tz="UTC") + pd.Timedelta(days=30 * i) for i in range(timestamps)]
    changed: dict[str, int] = {}
    if timestamps > 1 and changed_fraction > 0:
        k = max(1, round(changed_fraction * len(cells)))
        for c in rng.choice(len(cells), k, replace=False):
            changed[cells[c]] = int(rng.integers(1, timestamps))
    tables_by_row: dict[str, list] = defaultdict(list)
    lats, lons = [], []
    for ci, cell in enumerate(cells):
        base = centres[classes[ci]] + cell_scale * rng.standard_normal(dim)
        frag = base + fragment_scale * rng.standard_normal((nfrag, dim))
        jump = change_scale * rng.standard_normal(dim)
        crs, transform = _transform_for(cell, image_size)
        for ti, date in enumerate(dates):
            emb = frag + date_scale * rng.standard_normal((nfrag, dim))
            if cell in changed and ti >= changed[cell]:
                emb = emb + jump
            table = geoparquet.sample_table(
                emb.astype(np.float32), grid_cell=cell, product_id=f"SYN_{cell}_{ti:03d}",
                timestamp=date, crs=crs, transform=transform, boxes=layout.boxes,
            )
            if ti == 0:
                lats.append(float(np.mean(table.column("centre_lat").to_numpy())))
                lons.append(float(np.mean(table.column("centre_lon").to_numpy())))
            tables_by_row[str(row_name(parse_cell_name(cell)[0]))].append(table)
    info = geoparquet.EmbeddingFileInfo(
        model=model, weights="synthetic", random_weights=True, embedding_dim=dim,
        fragment_size=fragment_size, target_overlap=0.1, source_collection="synthetic",
    )
    paths = []
    for row in sorted(tables_by_row):
        path = Path(root) / "embeddings" / model / f"row={row}" / "embeddings.parquet"
        extra = {} if row_group_size is None else {"row_group_size": row_group_size}
        paths.append(geoparquet.write_embeddings(path, tables_by_row[row], info, **extra))
    labels = pd.DataFrame({"grid_cell": cells, "class_id": classes.astype(np.int64),
                           "centre_lat": lats, "centre_lon": lons})
    return SyntheticEmbeddings(Path(root), model, paths, labels, dates, changed)


def cnn_like_vectors(
    n: int, dim: int, rng: np.random.Generator, point_rng: np.random.Generator | None = None,
    rank: int = 64, n_classes: int = 1000, class_scale: float = 1.0, spread: float = 0.6,
    df: float = 4.0, noise: float = 0.35,
) -> np.ndarray:
    """(n, dim) float32 features shaped like pooled CNN activations: non-negative, sparse and
    heavy-tailed, low rank plus noise.

    latent = class centre (``n_classes`` in ``rank`` dims) + Student-t(``df``) spread; features =
    ReLU(latent @ W + bias + isotropic noise) × a log-normal scale per feature (some channels
    dominate, as in real backbones). Unlike `clustered_vectors`, neighbours are not separated by
    wide gaps: the classes overlap, so an IVF index's recall climbs steadily with nprobe and a
    good index can be told from a lucky one. Structure comes from ``rng`` (reset it to draw more
    points from the same space), points from ``point_rng`` (default ``rng``).
    """
    w = rng.standard_normal((rank, dim)).astype(np.float32) / np.float32(np.sqrt(rank))
    bias = (0.5 * rng.standard_normal(dim) - 0.3).astype(np.float32)
    scale = np.exp(0.6 * rng.standard_normal(dim)).astype(np.float32)
    centres = (class_scale * rng.standard_normal((n_classes, rank))).astype(np.float32)
    prng = point_rng or rng
    z = centres[prng.integers(0, n_classes, n)]
    z += np.float32(spread) * prng.standard_t(df, (n, rank)).astype(np.float32)
    h = z @ w
    h += bias
    h += np.float32(noise) * prng.standard_normal((n, dim), dtype=np.float32)
    np.maximum(h, 0, out=h)
    h *= scale
    return np.ascontiguousarray(h, dtype=np.float32)
