"""The global PCA map kept up to date row by row: adding or replacing a grid row costs O(row).

State beside the map (``<map dir>/state/``):

* ``central/row=<ROW>.parquet``  the row's central fragments (cell, centre, float32 embedding): the
                             data the map is made of, 1/25 of the row's embeddings. A row's moments
                             are recomputed from it when the row is replaced (to subtract them), and a
                             refit re-projects from these files instead of the embedding files;
* ``total.npz``              the merged PCA moments of every row's central fragments;
* ``basis.npz``              the *frozen* projection (mean, 3 components, their variances) and the
                             colour scale (robust lo/hi and channel gains) the map is coloured with;
* ``state.json``             every absorbed row with its embedding file's stamp (`rowcache`).

An update reads only rows whose file is new or was rewritten: their moments replace the old ones in
the total (`PCAMoments.subtract` then `merge`, O(row · dim²)), the PCA is re-solved from the total
(one eigh of dim × dim), and the new fit is compared with the frozen basis. While the basis has not
drifted (each component within `drift_deg` degrees of the frozen one and the mean within
`max_mean_shift` standard deviations along it) the frozen basis and colour scale stay, so every
other row's colours are still right and only the changed rows are projected. Past the threshold the
basis is refitted and every row is projected again (a full rebuild, reported as such).

Outputs: ``pca.parquet`` (GeoParquet points, one row group per grid row, so an update streams the
old file and swaps only the changed row groups), the archive-scale ``pca.tif`` Cloud-Optimised
GeoTIFF (0.05°/pixel, overviews; painted by streaming row groups, so memory is the image), the
2048 px ``pca.png`` and the small UI preview.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from majortom_assets import geoparquet
from majortom_assets.layout import validate_row_key
from majortom_assets.vectors import files, rowcache
from majortom_assets.vectors.pca import PCAMoments, StreamingPCA
from majortom_assets.vectors.pca_map import (
    COG_DEG_PER_PIXEL,
    CellRaster,
    apply_colour_scale,
    colour_scale,
    render_map,
    write_png,
    write_preview,
)

CELL_COLUMNS = ["row", "grid_cell", "centre_lat", "centre_lon", "samples", "pc1", "pc2", "pc3"]
CELLS_SCHEMA = pa.schema([
    ("row", pa.string()), ("grid_cell", pa.string()), ("centre_lat", pa.float64()),
    ("centre_lon", pa.float64()), ("samples", pa.int64()), ("pc1", pa.float64()), ("pc2", pa.float64()),
    ("pc3", pa.float64()), ("r", pa.uint8()), ("g", pa.uint8()), ("b", pa.uint8()), ("geometry", pa.binary()),
])
#: Default drift thresholds: past either one the basis (and every row's colours) is refitted.
DRIFT_DEG = 10.0
MAX_MEAN_SHIFT = 0.25


@dataclass
class Basis:
    """A frozen PCA projection and the colour scale the map was coloured with."""

    mean: np.ndarray        # (dim,)
    components: np.ndarray  # (3, dim) unit rows
    variance: np.ndarray    # (3,) variance along each component when frozen
    lo: np.ndarray
    hi: np.ndarray
    gain: np.ndarray

    n_components = 3

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.mean, self.components, self.lo, self.hi, self.gain):
            h.update(np.ascontiguousarray(a, np.float64).tobytes())
        return h.hexdigest()[:16]

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"vectors of dimension {x.shape[-1]} do not match the map's PCA ({self.mean.shape[0]})")
        return (x.astype(np.float64) - self.mean) @ self.components.T

    def colours(self, scores: np.ndarray) -> np.ndarray:
        return apply_colour_scale(scores, self.lo, self.hi, self.gain)

    def drift(self, fit: StreamingPCA) -> tuple[float, float]:
        """(largest angle in degrees between a frozen component and the new fit's, largest mean
        shift along a frozen component in its standard deviations)."""
        cos = np.abs(np.sum(self.components * fit.components_, axis=1)).clip(0.0, 1.0)
        angle = float(np.degrees(np.arccos(cos)).max())
        sd = np.sqrt(np.maximum(self.variance, 1e-30))
        shift = float((np.abs(self.components @ (fit.mean_ - self.mean)) / sd).max())
        return angle, shift

    def save(self, path: Path) -> Path:
        with geoparquet.atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mean=self.mean, components=self.components, variance=self.variance,
                     lo=self.lo, hi=self.hi, gain=self.gain)
        return path

    @classmethod
    def load(cls, path: Path) -> Basis:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mean"], z["components"], z["variance"], z["lo"], z["hi"], z["gain"])


CENTRAL_COLUMNS = ["unique_id", "grid_cell", "centre_lat", "centre_lon"]


def central_fragments(path: Path, batch_rows: int = files.DEFAULT_BATCH_ROWS) -> pa.Table | None:
    """The central fragment of every sample in one row file, with its embedding (float32); None
    for a row file without samples (a grid row that holds none, or whose every sample failed)."""
    mask = files.file_central_mask(path)
    parts = []
    for offset, x, meta in files.iter_embeddings(path, batch_rows, CENTRAL_COLUMNS):
        m = mask[offset:offset + len(x)]
        if m.any():
            x = np.ascontiguousarray(x[m], np.float32)
            parts.append(meta.filter(pa.array(m)).replace_schema_metadata(None).append_column(
                "embedding", pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])))
    return pa.concat_tables(parts) if parts else None


def central_matrix(table: pa.Table) -> np.ndarray:
    return geoparquet.embedding_matrix(table.column("embedding"))


def row_cells(central: pa.Table, basis, row: str) -> pa.Table:
    """Mean PCA scores of each cell's central fragment(s) in one row (CELL_COLUMNS).

    numpy group-by (bincount) rather than pandas: this runs once per row, ~1,700 times for the
    archive, where a DataFrame's fixed cost would outweigh the arithmetic.
    """
    scores = basis.transform(central_matrix(central))
    names, inverse = np.unique(central.column("grid_cell").to_numpy(zero_copy_only=False).astype(str),
                               return_inverse=True)
    counts = np.bincount(inverse, minlength=len(names))

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(inverse, weights=values, minlength=len(names)) / counts

    columns = {
        "row": pa.array([row] * len(names), pa.string()), "grid_cell": pa.array(names, pa.string()),
        "centre_lat": pa.array(mean(central.column("centre_lat").to_numpy())),
        "centre_lon": pa.array(mean(central.column("centre_lon").to_numpy())),
        "samples": pa.array(counts.astype(np.int64)),
        **{f"pc{i + 1}": pa.array(mean(scores[:, i])) for i in range(3)},
    }
    return pa.table(columns, schema=pa.schema([CELLS_SCHEMA.field(c) for c in CELL_COLUMNS]))


def _with_colours(table: pa.Table, basis: Basis) -> pa.Table:
    table = table.select(CELL_COLUMNS)
    pcs = np.stack([table.column(c).to_numpy() for c in ("pc1", "pc2", "pc3")], axis=1)
    rgb = basis.colours(pcs)
    points = shapely.points(table.column("centre_lon").to_numpy(), table.column("centre_lat").to_numpy())
    for i, c in enumerate("rgb"):
        table = table.append_column(c, pa.array(rgb[:, i], pa.uint8()))
    return table.append_column("geometry", pa.array(shapely.to_wkb(points), pa.binary()))


def _row_groups(path: Path, keep: set[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """(row, cells) per row group of a cells file written by this module (one group per row)."""
    if not path.is_file():
        return
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        table = pf.read_row_group(i, columns=CELL_COLUMNS)
        if table.num_rows == 0:
            continue
        row = table.column("row")[0].as_py()
        if keep is None or row in keep:
            yield row, table


def _row_key(item: tuple[str, pa.Table]):
    from majortom_assets.grid import parse_row_name

    return parse_row_name(item[0])


def _write_cells(path: Path, tables: Iterator[tuple[str, pa.Table]], basis: Basis,
                 raster: CellRaster) -> int:
    """Stream (row, cells) in row order into the GeoParquet cells file, painting the raster."""
    schema = CELLS_SCHEMA.with_metadata({b"geo": _geo_json()})
    cells = 0
    with geoparquet.atomic_output(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for _, table in tables:
            if table.num_rows == 0:
                continue
            table = _with_colours(table, basis)
            rgb = np.stack([table.column(c).to_numpy() for c in "rgb"], axis=1)
            raster.paint(table.column("centre_lon").to_numpy(), table.column("centre_lat").to_numpy(), rgb)
            writer.write_table(table.cast(schema), row_group_size=table.num_rows)
            cells += table.num_rows
    return cells


def _geo_json() -> bytes:
    import json

    return json.dumps(geoparquet.geo_metadata(["Point"], None)).encode()


def _paint_cores(path: Path, raster: CellRaster) -> None:
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        t = pf.read_row_group(i, columns=["centre_lon", "centre_lat", "r", "g", "b"])
        rgb = np.stack([t.column(c).to_numpy() for c in "rgb"], axis=1)
        raster.paint(t.column("centre_lon").to_numpy(), t.column("centre_lat").to_numpy(), rgb, cores=True)


def update_pca_map(
    paths: Sequence[str | Path], out_dir: str | Path, *, refresh: bool = False,
    drift_deg: float = DRIFT_DEG, max_mean_shift: float = MAX_MEAN_SHIFT,
    deg_per_pixel: float = COG_DEG_PER_PIXEL, png_size: tuple[int, int] = (2048, 1024),
    preview: bool = True,
) -> dict:
    """Bring the PCA map in `out_dir` up to date with the row files `paths`; returns what it did.

    `refresh` forgets the state (every row read, basis refitted). See the module docstring.
    """
    out = Path(out_dir)
    state_dir = out / "state"
    state_path, total_path, basis_path = state_dir / "state.json", state_dir / "total.npz", state_dir / "basis.npz"
    central_dir = state_dir / "central"
    state = {} if refresh else rowcache.load_state(state_path)
    if state and not (total_path.is_file() and basis_path.is_file() and (out / "pca.parquet").is_file()):
        state = {}  # half a state is no state: rebuild
    if not state and central_dir.exists():
        shutil.rmtree(central_dir)
    current = rowcache.current_rows(paths)
    if not current:
        raise ValueError("no embedding files given")
    diff = rowcache.diff(current, state.get("rows", {}))
    if state and not diff.dirty:
        return {**state["result"], **diff.summary(), "rows read": 0, "rows projected": 0, "basis refit": False,
                "refit reason": "nothing changed", "basis drift (deg)": 0.0, "mean shift (sd)": 0.0}

    def central_file(row: str) -> Path:
        return central_dir / f"row={validate_row_key(row)}.parquet"

    def load_central(row: str) -> pa.Table | None:
        """The cached central fragments of a row; None for a row without samples (nothing cached)."""
        path = central_file(row)
        return pq.read_table(path) if path.is_file() else None

    rows_meta: dict = dict(state.get("row_info", {}))
    total = PCAMoments.load(total_path) if state else None
    for row in diff.to_drop:
        old = load_central(row)
        if old is not None:
            total = total.subtract(PCAMoments.of(central_matrix(old)))
        rows_meta.pop(row, None)
        if row in diff.removed:
            central_file(row).unlink(missing_ok=True)
    dim = state.get("dim")
    for row in diff.to_read:
        path = current[row][0]
        central = central_fragments(path)
        if central is None:   # an empty row file: nothing to fit or paint, and no stale cache
            central_file(row).unlink(missing_ok=True)
            rows_meta[row] = {"random_weights": bool(geoparquet.read_info(path).random_weights), "fitted": 0}
            continue
        x = central_matrix(central)
        if dim is not None and x.shape[1] != dim:
            raise ValueError(f"{path}: embeddings of dimension {x.shape[1]}, the map's other rows have {dim}")
        dim = x.shape[1]
        central_file(row).parent.mkdir(parents=True, exist_ok=True)
        with geoparquet.atomic_output(central_file(row)) as tmp:
            pq.write_table(central, tmp)
        m = PCAMoments.of(x)
        total = m if total is None else total.merge(m)
        rows_meta[row] = {"random_weights": bool(geoparquet.read_info(path).random_weights), "fitted": m.count}
        del central, x  # memory stays one row: projection re-reads the cached file
    if total is None or total.count < 2:
        raise ValueError(f"the PCA map needs at least 2 central fragments, the rows hold {0 if total is None else total.count}")
    fit = StreamingPCA(3).fit_moments(total)

    basis = Basis.load(basis_path) if state else None
    angle = shift = float("nan")
    if basis is None:
        reason = "first build" if not refresh else "full rebuild requested"
    else:
        angle, shift = basis.drift(fit)
        reason = (f"basis drifted {angle:.1f}° (limit {drift_deg}°)" if angle > drift_deg else
                  f"mean moved {shift:.2f} sd (limit {max_mean_shift})" if shift > max_mean_shift else "")
    refit = bool(reason)

    raster = CellRaster(deg_per_pixel)
    cells_path = out / "pca.parquet"
    if refit:
        # pass 1: project every row with the new components into a temp file, collecting the scores
        # (3 floats per cell) for the colour scale; pass 2 colours them into the cells file.
        provisional = Basis(fit.mean_, fit.components_, fit.explained_variance_, np.zeros(3), np.ones(3), np.ones(3))
        tmp_cells = state_dir / "cells.tmp.parquet"
        state_dir.mkdir(parents=True, exist_ok=True)
        scores = []
        with pq.ParquetWriter(tmp_cells, pa.schema([CELLS_SCHEMA.field(c) for c in CELL_COLUMNS])) as writer:
            for row in sorted(current, key=lambda r: _row_key((r, None))):
                central = load_central(row)
                if central is None:
                    continue
                table = row_cells(central, provisional, row)
                if table.num_rows:
                    writer.write_table(table, row_group_size=table.num_rows)
                    scores.append(np.stack([table.column(c).to_numpy() for c in ("pc1", "pc2", "pc3")], axis=1))
        lo, hi, gain = colour_scale(np.concatenate(scores) if scores else np.zeros((0, 3)))
        basis = Basis(fit.mean_, fit.components_, fit.explained_variance_, lo, hi, gain)
        projected = len(current)
        try:
            cells = _write_cells(cells_path, _row_groups(tmp_cells), basis, raster)
        finally:
            tmp_cells.unlink(missing_ok=True)
    else:
        fresh = [(row, row_cells(central, basis, row)) for row in diff.to_read
                 if (central := load_central(row)) is not None]
        projected = len(fresh)
        # the old file is read to the end inside the writer's block, before the temp replaces it
        old = _row_groups(cells_path, keep=set(diff.unchanged))
        cells = _write_cells(cells_path, heapq.merge(old, fresh, key=_row_key), basis, raster)
    _paint_cores(cells_path, raster)
    tif = raster.write_cog(out / "pca.tif")
    png = out / "pca.png"
    table = pq.read_table(cells_path, columns=["centre_lon", "centre_lat", "r", "g", "b"])
    rgb = np.stack([table.column(c).to_numpy() for c in "rgb"], axis=1)
    image, mask = render_map(table.column("centre_lon").to_numpy(), table.column("centre_lat").to_numpy(),
                             rgb, *png_size)
    del table
    write_png(image, png)
    caption = None
    if preview:
        caption = write_preview(cells_path, out / "pca_preview.png").caption()
    basis.save(basis_path)
    total.save(total_path)
    fit.save(out / "pca_model.npz")
    meta = fit.metadata()
    result = {
        "cells": int(cells), "rows": len(current), "png": str(png), "parquet": str(cells_path),
        "tif": str(tif), "tif size": [raster.width, raster.height], "deg per pixel": deg_per_pixel,
        "width": png_size[0], "height": png_size[1], "painted_pixels": int(mask.sum()),
        "basis digest": basis.digest, "preview caption": caption,
        "random weights": any(v["random_weights"] for v in rows_meta.values()), **meta,
    }
    rowcache.save_state(state_path, {
        "rows": {row: current[row][1] for row in current}, "row_info": rows_meta, "dim": dim,
        "basis": basis.digest, "result": result,
    })
    return {**result, **diff.summary(), "rows read": len(diff.to_read), "rows projected": projected,
            "basis refit": refit, "refit reason": reason or "basis within drift limits",
            "basis drift (deg)": None if math.isnan(angle) else round(angle, 3),
            "mean shift (sd)": None if math.isnan(shift) else round(shift, 4)}


def map_paths(root: str | Path, model: str) -> list[Path]:
    """Row files of a model under a storage root (helper for the CLI and benchmarks)."""
    return files.model_paths(root, model)
