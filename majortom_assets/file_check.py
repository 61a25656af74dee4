"""Every per-file check of an embedding file, in one place: `check_file(path)` -> results.

The Dagster asset checks (defs/checks.py) only map these results, and `majortom embed` runs the
same function on each row file it writes, so a file the CLI accepts is one the assets accept.

The checks, each a pure function of one file:

* ``table2_schema``: columns and types are Table 2 for the file's dim; GeoParquet ``geo``
  metadata names the geometry column's CRS.
* ``fragments_per_cell``: each sample carries exactly the Algorithm 1 boxes for its image size.
* ``finite_embeddings``: no NaN or infinite value in any embedding.
* ``unique_ids``: `geoparquet.verify_file` -- ids recompute, row count and content digest match
  the writer's footer, cell names are grid cells agreeing with grid_row_u/grid_col_r, boxes and
  centres agree with the UTM footprints, the random-weights flag is consistent.
* ``inside_grid_cell``: every footprint lies inside its grid cell grown by the image margin.

What "inside its grid cell" means: a Core image is s_I x 10 m (10.68 km) square, anchored at the
cell's bottom-left corner and axis-aligned in the cell's UTM zone, while the cell is one grid
step (10 km) high and at most 10 km wide. So fragments legitimately reach past the cell's north
and east edges, by the image's overshoot, and the UTM grid's rotation against true north (grid
convergence, up to ~6 degrees in the wide Svalbard zones) swings the image corners by
s_I x 10 m x sin(6 deg) more. A footprint is inside when every vertex lies within the cell box
grown by that margin on every side. Errors the check exists for (row/column swapped footprints,
a wrong CRS or transform, a georeference shifted off its cell) move fragments by whole cells or
far more. A footprint filed under a row/column that is not a grid cell counts as outside.

A check that cannot run on a damaged file (an exception) fails with the reason; it never raises.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely

from majortom_assets import geoparquet, grid
from majortom_assets.fragment import fragment_layout
from majortom_assets.standard import NOMINAL_PIXEL_M

MAX_GRID_CONVERGENCE_DEG = 6.0
_M_PER_DEG = math.pi / 180.0 * grid.EARTH_RADIUS_KM * 1000.0
CHECK_NAMES = ("table2_schema", "fragments_per_cell", "finite_embeddings", "unique_ids", "inside_grid_cell")
MAX_LISTED = 10

DESCRIPTIONS = {
    "table2_schema": "Columns and types equal geoparquet.embedding_schema(dim); GeoParquet 'geo' metadata with CRS.",
    "fragments_per_cell": "Each sample has exactly the Algorithm 1 boxes of its fragment size (fragment.fragment_layout).",
    "finite_embeddings": "No NaN or infinite value in any embedding.",
    "unique_ids": "geoparquet.verify_file: unique_ids recompute; row count and content digest match the "
                  "writer's footer; cell names, row/col, boxes, centres and the random-weights flag agree.",
    "inside_grid_cell": "Every footprint lies inside its grid cell grown by the image margin (file_check docstring).",
}


@dataclass
class CheckResult:
    """One check of one file: passed or not, the problems in words, and numbers for a report."""

    name: str
    passed: bool
    problems: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.name}: {'ok' if self.passed else '; '.join(self.problems) or 'failed'}"


# --- the checks ----------------------------------------------------------------------------


def schema_problems(path: Path) -> list[str]:
    problems = []
    try:
        info = geoparquet.read_info(path)
    except ValueError as exc:
        return [str(exc)]
    expected = geoparquet.embedding_schema(info.embedding_dim)
    actual = pq.read_schema(path)
    if not actual.equals(expected, check_metadata=False):
        problems.append(f"schema differs from Table 2 (dim {info.embedding_dim}): {actual.names}")
    try:
        geo = geoparquet.read_geo_metadata(path)
        if geo.get("primary_column") != "geometry" or "crs" not in geo.get("columns", {}).get("geometry", {}):
            problems.append("GeoParquet 'geo' metadata lacks the geometry column's CRS")
    except ValueError as exc:
        problems.append(str(exc))
    return problems


def fragment_count_problems(path: Path, fragment_size: int, target_overlap: float) -> tuple[int, list[str]]:
    """Each sample must carry exactly the boxes of Algorithm 1 for its image size."""
    table = pq.read_table(path, columns=["grid_cell", "product_id", "timestamp", "pixel_bbox"])
    if table.num_rows == 0:
        return 0, []
    frame = table.select(["grid_cell", "product_id", "timestamp"]).to_pandas()
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(frame))
    boxes = table.column("pixel_bbox").combine_chunks().flatten().to_numpy().reshape(-1, 4).astype(np.int64)
    n_samples = len(uniques)
    counts = np.bincount(codes, minlength=n_samples)
    heights = np.zeros(n_samples, np.int64)
    widths = np.zeros(n_samples, np.int64)
    np.maximum.at(heights, codes, boxes[:, 2])
    np.maximum.at(widths, codes, boxes[:, 3])
    problems = []
    for h, w in {(int(a), int(b)) for a, b in zip(heights, widths, strict=True)}:
        try:
            layout = fragment_layout(h, w, fragment_size, target_overlap)
        except ValueError as exc:
            problems.append(f"samples of {h}x{w} px cannot hold {fragment_size} px fragments: {exc}")
            continue
        same = (heights == h) & (widths == w)
        wrong = np.nonzero(same & (counts != layout.count))[0]
        for i in wrong[:MAX_LISTED]:
            problems.append(
                f"{uniques[i][0]} ({uniques[i][1]}): {counts[i]} fragments, expected {layout.count} for {h}x{w} px"
            )
        # every box must be one of the layout's boxes, and none twice within a sample
        rows = same[codes]
        scale = np.int64(max(h, w) + 1)
        key = ((boxes[rows, 0] * scale + boxes[rows, 1]) * scale + boxes[rows, 2]) * scale + boxes[rows, 3]
        valid = (
            (layout.boxes[:, 0] * scale + layout.boxes[:, 1]) * scale + layout.boxes[:, 2]
        ) * scale + layout.boxes[:, 3]
        if not np.isin(key, valid).all():
            problems.append(
                f"{int((~np.isin(key, valid)).sum())} pixel boxes are not Algorithm 1 boxes for {h}x{w} px"
            )
        pairs = np.stack([codes[rows], key], axis=1)
        if len(np.unique(pairs, axis=0)) != len(pairs):
            problems.append(f"duplicate pixel boxes within a sample ({h}x{w} px images)")
    return n_samples, problems


def non_finite_rows(path: Path) -> int:
    bad = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192, columns=["embedding"]):
        matrix = geoparquet.embedding_matrix(batch.column("embedding"))
        bad += int((~np.isfinite(matrix)).any(axis=1).sum())
    return bad


def outside_cell_fragments(path: Path) -> tuple[int, float, list[str]]:
    """Fragments with a vertex outside their cell grown by the image margin (or filed under a
    row/column that is no grid cell): (count, margin in m, up to MAX_LISTED offending cells)."""
    table = pq.read_table(path, columns=["grid_cell", "grid_row_u", "grid_col_r", "geometry", "pixel_bbox"])
    if table.num_rows == 0:
        return 0, 0.0, []
    g = grid.get_grid()
    rows = table.column("grid_row_u").to_numpy().astype(np.int64)
    cols = table.column("grid_col_r").to_numpy().astype(np.int64)
    names = table.column("grid_cell").to_numpy(zero_copy_only=False)
    in_grid, _, _ = grid.valid_cells(grid.cell_name(rows, cols))
    # a row/col outside the grid is checked against a stand-in cell, then counted as outside
    rows = np.where(in_grid, rows, 0)
    cols = np.where(in_grid, cols, 0)
    boxes = table.column("pixel_bbox").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    image_m = float(boxes[:, 2:].max()) * NOMINAL_PIXEL_M
    west, south, east, north = (np.asarray(a, np.float64) for a in g.cell_bounds(rows, cols))
    height_m = (north - south) * _M_PER_DEG
    width_top_m = (east - west) * _M_PER_DEG * np.cos(np.radians(north))
    margin_m = np.maximum(np.maximum(image_m - height_m, image_m - width_top_m), 0.0) + image_m * math.sin(
        math.radians(MAX_GRID_CONVERGENCE_DEG)
    )
    margin_lat = margin_m / _M_PER_DEG
    margin_lon = margin_m / (_M_PER_DEG * np.cos(np.radians(np.minimum(np.abs(north) + margin_lat, 89.9))))
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    xy, owner = shapely.get_coordinates(geoms, return_index=True)
    # longitudes relative to the cell's west edge, wrapped so cells at +-180 compare correctly
    dlon = (xy[:, 0] - west[owner] + 180.0) % 360.0 - 180.0
    outside = (
        (dlon < -margin_lon[owner])
        | (dlon > (east - west)[owner] + margin_lon[owner])
        | (xy[:, 1] < south[owner] - margin_lat[owner])
        | (xy[:, 1] > north[owner] + margin_lat[owner])
    )
    bad = (np.bincount(owner, weights=outside, minlength=len(geoms)) > 0) | ~in_grid
    cells = list(dict.fromkeys(str(c) for c in names[bad]))[:MAX_LISTED]
    return int(bad.sum()), float(margin_m.max()), cells


# --- one entry point -----------------------------------------------------------------------


def _guarded(name: str, run: Callable[[], CheckResult]) -> CheckResult:
    """A check that cannot run on a damaged file fails, naming why; it never raises."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 -- any crash on a tampered file is a failed check
        return CheckResult(name, False, [f"check could not run: {type(exc).__name__}: {exc}"])


def check_file(path: str | os.PathLike, fragment_size: int | None = None,
               target_overlap: float | None = None) -> list[CheckResult]:
    """All checks of `CHECK_NAMES` on one embedding file, in that order.

    `fragment_size` / `target_overlap` default to the file's own provenance; a caller that knows
    the model (the asset checks) passes the model's values so a file of another layout fails.
    """
    path = Path(path)
    rows_in_file = pq.ParquetFile(path).metadata.num_rows
    if fragment_size is None or target_overlap is None:
        try:
            info = geoparquet.read_info(path)
            fragment_size = info.fragment_size if fragment_size is None else fragment_size
            target_overlap = info.target_overlap if target_overlap is None else target_overlap
        except ValueError:
            pass   # table2_schema names the missing provenance

    def schema() -> CheckResult:
        problems = schema_problems(path)
        return CheckResult("table2_schema", not problems, problems)

    def fragments() -> CheckResult:
        if fragment_size is None or target_overlap is None:
            return CheckResult("fragments_per_cell", False, ["no fragment size in the file's provenance"])
        samples, problems = fragment_count_problems(path, fragment_size, target_overlap)
        return CheckResult("fragments_per_cell", not problems, problems,
                           {"samples": samples, "fragments": rows_in_file})

    def finite() -> CheckResult:
        bad = non_finite_rows(path)
        return CheckResult("finite_embeddings", bad == 0,
                           [f"{bad} embeddings contain NaN or infinity"] if bad else [],
                           {"fragments": rows_in_file, "non-finite": bad})

    def ids() -> CheckResult:
        report = geoparquet.verify_file(path)
        problems = list(report.problems)
        if report.mismatched_ids:
            problems.insert(0, f"{len(report.mismatched_ids)} unique_ids do not recompute "
                               f"(e.g. {report.mismatched_ids[0]})")
        return CheckResult("unique_ids", report.ok, problems,
                           {"fragments": report.rows, "mismatched": len(report.mismatched_ids)})

    def inside() -> CheckResult:
        outside, margin, cells = outside_cell_fragments(path)
        message = (f"{outside} fragments lie outside their grid cell (+{margin:.0f} m margin): "
                   f"cells {', '.join(cells)}")
        problems = [message] if outside else []
        return CheckResult("inside_grid_cell", outside == 0, problems,
                           {"fragments": rows_in_file, "outside": outside, "margin (m)": round(margin, 1)})

    return [_guarded(name, run) for name, run in zip(CHECK_NAMES, (schema, fragments, finite, ids, inside),
                                                      strict=True)]


def failed(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if not r.passed]
