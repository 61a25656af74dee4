"""Embedding time series: fragments of one cell with the same pixel box, ordered by date.

Fragmenting is deterministic per cell (Algorithm 1), so the same pixel_bbox of the same cell at
two dates covers the same ground (same UTM product grid) and the two embeddings are comparable.
Change scores are cosine distances between consecutive dates of such a series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from majortom_assets import geoparquet
from majortom_assets.vectors import files

_COLUMNS = ["unique_id", "embedding", "grid_cell", "product_id", "timestamp", "pixel_bbox"]


@dataclass
class FragmentSeries:
    grid_cell: str
    pixel_bbox: tuple[int, int, int, int]
    timestamps: np.ndarray   # datetime64[ns] (UTC), increasing
    product_ids: np.ndarray
    unique_ids: np.ndarray
    embeddings: np.ndarray   # (T, dim) float32, aligned with timestamps

    def __len__(self) -> int:
        return len(self.timestamps)


def _cell_partitions(paths: Sequence[Path], grid_cell: str) -> list[Path]:
    """Only the partition of the cell's row when paths are hive-partitioned by row."""
    from majortom_assets.grid import parse_cell_name, row_name

    row = str(row_name(parse_cell_name(grid_cell)[0]))  # ValueError naming a malformed cell
    return [p for p in paths if files.partition_row(p) in (None, row)]


def _group_series(table: pa.Table) -> list[FragmentSeries]:
    """Split rows (any order, any cells) into per-(cell, box) series sorted by timestamp."""
    if table.num_rows == 0:
        return []
    boxes = files.pixel_boxes(table.column("pixel_bbox"))
    times = files.timestamps_ns(table.column("timestamp"))
    cells = table.column("grid_cell").to_numpy(zero_copy_only=False)
    emb = geoparquet.embedding_matrix(table.column("embedding"))
    products = table.column("product_id").to_numpy(zero_copy_only=False)
    uids = table.column("unique_id").to_numpy(zero_copy_only=False)
    order = np.lexsort((times, boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], cells))
    key = pd.DataFrame({"c": cells[order], "b0": boxes[order, 0], "b1": boxes[order, 1],
                        "b2": boxes[order, 2], "b3": boxes[order, 3]})
    starts = np.flatnonzero(np.r_[True, (key.iloc[1:].to_numpy() != key.iloc[:-1].to_numpy()).any(axis=1)])
    ends = np.r_[starts[1:], len(order)]
    out = []
    for s, e in zip(starts, ends):
        idx = order[s:e]
        out.append(FragmentSeries(str(cells[idx[0]]), tuple(int(v) for v in boxes[idx[0]]), times[idx],
                                  products[idx], uids[idx], emb[idx]))
    return out


def series_for(paths, grid_cell: str, pixel_bbox: Sequence[int] | None = None) -> list[FragmentSeries]:
    """Time series of a cell's fragments (one per distinct pixel box, or just the one given)."""
    paths = _cell_partitions(files.as_paths(paths), grid_cell)
    parts = [geoparquet.read_table(p, columns=_COLUMNS, filters=[("grid_cell", "==", grid_cell)])
             for p in paths]
    parts = [t for t in parts if t.num_rows]
    if not parts:
        raise KeyError(f"grid cell {grid_cell} has no embeddings in the given files")
    series = _group_series(pa.concat_tables(parts))
    if pixel_bbox is not None:
        want = tuple(int(v) for v in pixel_bbox)
        series = [s for s in series if s.pixel_bbox == want]
        if not series:
            raise KeyError(f"grid cell {grid_cell} has no fragment with pixel_bbox {list(want)}")
    return series


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1.0 - np.sum(files.l2_normalise(a) * files.l2_normalise(b), axis=-1, dtype=np.float64)


def change_scores(series: Sequence[FragmentSeries]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per fragment, per cell) cosine distances between consecutive dates.

    Per fragment: one row per consecutive pair (t0, t1). Per cell: the mean over the fragments
    observed at both dates of a pair, with how many fragments contributed.
    """
    rows = []
    for s in series:
        if len(s) < 2:
            continue
        d = _cosine_distance(s.embeddings[:-1], s.embeddings[1:])
        rows.append(pd.DataFrame({
            "grid_cell": s.grid_cell, "pixel_bbox": [list(s.pixel_bbox)] * len(d),
            "t0": pd.to_datetime(s.timestamps[:-1], utc=True), "t1": pd.to_datetime(s.timestamps[1:], utc=True),
            "product_t0": s.product_ids[:-1], "product_t1": s.product_ids[1:], "cosine_distance": d,
        }))
    cols = ["grid_cell", "pixel_bbox", "t0", "t1", "product_t0", "product_t1", "cosine_distance"]
    per_fragment = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)
    if per_fragment.empty:
        return per_fragment, pd.DataFrame(columns=["grid_cell", "t0", "t1", "cosine_distance", "fragments"])
    per_cell = (per_fragment.groupby(["grid_cell", "t0", "t1"], sort=True)["cosine_distance"]
                .agg(["mean", "size"]).reset_index()
                .rename(columns={"mean": "cosine_distance", "size": "fragments"}))
    return per_fragment, per_cell


def partition_change_scores(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Change scores of every cell in one row partition (memory: that partition's embeddings)."""
    return change_scores(_group_series(geoparquet.read_table(Path(path), columns=_COLUMNS)))
