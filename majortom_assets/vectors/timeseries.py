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


# ---------------------------------------------------------------- change files per row (incremental)
FRAGMENT_CHANGE_SCHEMA = pa.schema([
    ("grid_cell", pa.string()), ("pixel_bbox", pa.list_(pa.int32())),
    ("t0", pa.timestamp("ns", tz="UTC")), ("t1", pa.timestamp("ns", tz="UTC")),
    ("product_t0", pa.string()), ("product_t1", pa.string()), ("cosine_distance", pa.float64()),
])
CELL_CHANGE_SCHEMA = pa.schema([
    ("grid_cell", pa.string()), ("t0", pa.timestamp("ns", tz="UTC")), ("t1", pa.timestamp("ns", tz="UTC")),
    ("cosine_distance", pa.float64()), ("fragments", pa.int64()),
])
CELLS_FILE, FRAGMENTS_FILE = "cells.parquet", "fragments.parquet"
CELLS_DIR, FRAGMENTS_DIR = "cells", "fragments"
#: Most-changed pairs each row keeps in the state, so the global top list needs no file reads.
TOP_PER_ROW = 10


def row_pair_scores(table: pa.Table) -> tuple[pa.Table, int]:
    """Per-fragment change scores of a row table (FRAGMENT_CHANGE_SCHEMA) and the number of series
    with two dates or more, vectorised: one sort, then every consecutive pair of one series.

    Same numbers as `change_scores(_group_series(table))` (same sort key, same float32 products
    summed in float64), without a DataFrame per series, which dominated at archive scale.
    """
    if table.num_rows == 0:
        return FRAGMENT_CHANGE_SCHEMA.empty_table(), 0
    boxes = files.pixel_boxes(table.column("pixel_bbox"))
    times = files.timestamps_ns(table.column("timestamp"))
    cells = table.column("grid_cell").to_numpy(zero_copy_only=False)
    products = table.column("product_id").to_numpy(zero_copy_only=False)
    order = np.lexsort((times, boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], cells))
    c, b = cells[order], boxes[order]
    same = (c[1:] == c[:-1]) & (b[1:] == b[:-1]).all(axis=1)
    i, j = order[:-1][same], order[1:][same]
    series = int(np.count_nonzero(np.r_[True, ~same[:-1]] & same)) if len(same) else 0
    if len(i) == 0:
        return FRAGMENT_CHANGE_SCHEMA.empty_table(), 0
    emb = geoparquet.embedding_matrix(table.column("embedding"))
    d = _cosine_distance(emb[i], emb[j])
    ts = pa.timestamp("ns", tz="UTC")
    out = pa.table({
        "grid_cell": pa.array(cells[i], pa.string()),
        "pixel_bbox": pa.FixedSizeListArray.from_arrays(pa.array(boxes[i].reshape(-1).astype(np.int32)), 4)
        .cast(pa.list_(pa.int32())),
        "t0": pa.array(times[i]).cast(ts), "t1": pa.array(times[j]).cast(ts),
        "product_t0": pa.array(products[i], pa.string()), "product_t1": pa.array(products[j], pa.string()),
        "cosine_distance": pa.array(np.asarray(d, np.float64)),
    }, schema=FRAGMENT_CHANGE_SCHEMA)
    return out, series


def write_change_files(path: str | Path, cells_path: str | Path, fragments_path: str | Path,
                       top: int = TOP_PER_ROW) -> dict:
    """Change scores of one row partition: per cell into `cells_path`, per fragment into `fragments_path`.

    Row partitions hold disjoint cells, so a row's series are complete on their own: memory is that
    row's embeddings. Returns the row's summary (counts, sum and max of the per-cell scores and its
    `top` most-changed cell pairs) so a global report adds rows up without re-reading them.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    table = geoparquet.read_table(path, columns=_COLUMNS)
    cells = len(pc.unique(table.column("grid_cell")))
    frag_table, series = row_pair_scores(table)
    del table
    if frag_table.num_rows:
        per_cell = (pd.DataFrame({"grid_cell": frag_table.column("grid_cell").to_numpy(zero_copy_only=False),
                                  "t0": frag_table.column("t0").to_pandas(), "t1": frag_table.column("t1").to_pandas(),
                                  "cosine_distance": frag_table.column("cosine_distance").to_numpy()})
                    .groupby(["grid_cell", "t0", "t1"], sort=True)["cosine_distance"].agg(["mean", "size"])
                    .reset_index().rename(columns={"mean": "cosine_distance", "size": "fragments"}))
        cell_table = pa.Table.from_pandas(per_cell[CELL_CHANGE_SCHEMA.names], schema=CELL_CHANGE_SCHEMA,
                                          preserve_index=False)
    else:
        per_cell = CELL_CHANGE_SCHEMA.empty_table().to_pandas()
        cell_table = CELL_CHANGE_SCHEMA.empty_table()
    for target, data in ((Path(fragments_path), frag_table), (Path(cells_path), cell_table)):
        target.parent.mkdir(parents=True, exist_ok=True)
        with geoparquet.atomic_output(target) as tmp:
            pq.write_table(data, tmp)
    scores = per_cell["cosine_distance"].to_numpy(dtype=float) if len(per_cell) else np.zeros(0)
    best = per_cell.sort_values(["cosine_distance", "grid_cell"], ascending=[False, True]).head(top) \
        if len(per_cell) else per_cell
    return {
        "random_weights": bool(geoparquet.read_info(path).random_weights),
        "cells": int(cells), "cells_with_pairs": int(per_cell["grid_cell"].nunique()) if len(per_cell) else 0,
        "pairs": len(per_cell), "series": int(series), "sum": float(scores.sum()),
        "max": float(scores.max()) if len(scores) else None,
        "top": [{"grid_cell": str(r.grid_cell), "t0": pd.Timestamp(r.t0).isoformat(), "t1": pd.Timestamp(r.t1).isoformat(),
                 "cosine_distance": float(r.cosine_distance), "fragments": int(r.fragments)}
                for r in best.itertuples(index=False)],
    }


def update_change(paths, out_dir: str | Path, *, refresh: bool = False) -> dict:
    """Per-row change files brought up to date: O(changed rows).

    ``out_dir/cells/row=<ROW>/cells.parquet`` (per cell and date pair) and
    ``out_dir/fragments/row=<ROW>/fragments.parquet`` (per fragment): each folder reads as one
    hive-partitioned dataset (``pq.read_table(out_dir / "cells")``, DuckDB
    ``read_parquet('<out_dir>/cells/*/*.parquet', hive_partitioning = true)``). Rows whose embedding
    file kept its stamp (`vectors.rowcache`) are not opened; their summaries come from the state.
    """
    import shutil

    from majortom_assets.layout import validate_row_key
    from majortom_assets.vectors import rowcache

    out = Path(out_dir)
    state_path = out / "state.json"
    state = {} if refresh else rowcache.load_state(state_path)
    current = rowcache.current_rows(paths)
    diff = rowcache.diff(current, state.get("rows", {}))
    summaries: dict = dict(state.get("summaries", {}))
    for row in diff.removed:
        summaries.pop(row, None)
        for sub in (CELLS_DIR, FRAGMENTS_DIR):
            shutil.rmtree(out / sub / f"row={validate_row_key(row)}", ignore_errors=True)
    for row in diff.to_read:
        part = f"row={validate_row_key(row)}"
        summaries[row] = write_change_files(current[row][0], out / CELLS_DIR / part / CELLS_FILE,
                                            out / FRAGMENTS_DIR / part / FRAGMENTS_FILE)
    rowcache.save_state(state_path, {"rows": {r: current[r][1] for r in current}, "summaries": summaries})
    return {"summaries": summaries, "update": {**diff.summary(), "rows read": len(diff.to_read)},
            "random_weights": any(v["random_weights"] for v in summaries.values())}


def change_totals(summaries: dict, top: int = TOP_PER_ROW) -> dict:
    """Archive totals and the `top` most-changed cell pairs from per-row summaries (no file reads)."""
    values = list(summaries.values())
    pairs = sum(v["pairs"] for v in values)
    maxima = [v["max"] for v in values if v["max"] is not None]
    best = sorted((t for v in values for t in v["top"]), key=lambda t: (-t["cosine_distance"], t["grid_cell"]))[:top]
    return {
        "cells": sum(v["cells"] for v in values), "cells_with_pairs": sum(v["cells_with_pairs"] for v in values),
        "pairs": pairs, "series": sum(v["series"] for v in values),
        "mean": sum(v["sum"] for v in values) / pairs if pairs else float("nan"),
        "max": max(maxima) if maxima else float("nan"), "top": best,
    }
