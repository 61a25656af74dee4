"""Asset checks on each model's embedding files (one multi-check per model, built by a factory).

A check run inside a materialisation checks the rows that run wrote; run on its own it checks
every row file of the model. Each check reports per-row numbers in its metadata.

What "inside its grid cell" means: a Core image is s_I x 10 m (10.68 km) square, anchored at the
cell's bottom-left corner and axis-aligned in the cell's UTM zone, while the cell is one grid
step (10 km) high and at most 10 km wide. So fragments legitimately reach past the cell's north
and east edges, by the image's overshoot, and the UTM grid's rotation against true north (grid
convergence, up to ~6 degrees in the wide Svalbard zones) swings the image corners by
s_I x 10 m x sin(6 deg) more. A footprint is inside when every vertex lies within the cell box
grown by that margin on every side. Errors the check exists for (row/column swapped footprints,
a wrong CRS or transform) move fragments by whole cells or far more.
"""

import math
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely

from majortom_assets import geoparquet, grid
from majortom_assets.defs import keys, presentation
from majortom_assets.defs.resources import StorageResource, load_settings
from majortom_assets.fragment import fragment_layout
from majortom_assets.layout import StoragePathError
from majortom_assets.models.spec import MODEL_SPECS

PIXEL_METRES = 10.0
MAX_GRID_CONVERGENCE_DEG = 6.0
_M_PER_DEG = math.pi / 180.0 * grid.EARTH_RADIUS_KM * 1000.0
CHECK_NAMES = ("table2_schema", "fragments_per_cell", "finite_embeddings", "unique_ids", "inside_grid_cell")


def files_to_check(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, model: str
) -> dict[str, Path]:
    layout = storage.layout
    if context.has_partition_key or context.has_partition_key_range:
        return {row: layout.embeddings_file(model, row) for row in context.partition_keys}
    return {p.parent.name.removeprefix("row="): p for p in layout.embedding_files(model)}


# --- the checks, each a pure function of one file -----------------------------------------


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
        layout = fragment_layout(h, w, fragment_size, target_overlap)
        same = (heights == h) & (widths == w)
        wrong = np.nonzero(same & (counts != layout.count))[0]
        for i in wrong[:10]:
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


def outside_cell_fragments(path: Path) -> tuple[int, float]:
    """Fragments with a vertex outside their cell grown by the image margin; returns (count, margin m)."""
    table = pq.read_table(path, columns=["grid_row_u", "grid_col_r", "geometry", "pixel_bbox"])
    if table.num_rows == 0:
        return 0, 0.0
    g = grid.get_grid()
    rows = table.column("grid_row_u").to_numpy().astype(np.int64)
    cols = table.column("grid_col_r").to_numpy().astype(np.int64)
    boxes = table.column("pixel_bbox").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    image_m = float(boxes[:, 2:].max()) * PIXEL_METRES
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
    bad = np.bincount(owner, weights=outside, minlength=len(geoms)) > 0
    return int(bad.sum()), float(margin_m.max())


def build_embedding_checks(model: str) -> dg.AssetChecksDefinition:
    spec = MODEL_SPECS[model]
    asset_key = keys.embeddings_key(model)
    descriptions = {
        "table2_schema": "Columns and types equal geoparquet.embedding_schema(dim); GeoParquet 'geo' metadata with CRS.",
        "fragments_per_cell": f"Each sample has exactly the Algorithm 1 boxes of {spec.fragment_size} px fragments (fragment.fragment_layout).",
        "finite_embeddings": "No NaN or infinite value in any embedding.",
        "unique_ids": "Every unique_id equals the sha256 recomputed from geometry, timestamp, product_id and embedding bytes.",
        "inside_grid_cell": "Every footprint lies inside its grid cell grown by the image margin (see module docstring).",
    }

    @dg.multi_asset_check(
        name=f"{keys.model_slug(model)}_embedding_checks",
        specs=[
            dg.AssetCheckSpec(name, asset=asset_key, description=descriptions[name]) for name in CHECK_NAMES
        ],
    )
    def _checks(context: dg.AssetCheckExecutionContext, storage: StorageResource):
        try:
            files = files_to_check(context, storage, model)
        except StoragePathError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        missing = sorted(row for row, path in files.items() if not path.exists())
        present = {row: path for row, path in files.items() if path.exists()}
        results: dict[str, list[dict]] = {name: [] for name in CHECK_NAMES}
        for row, path in sorted(present.items()):
            rows_in_file = pq.ParquetFile(path).metadata.num_rows
            schema = schema_problems(path)
            results["table2_schema"].append({"row": row, "problems": "; ".join(schema) or "none"})
            samples, counts = fragment_count_problems(path, spec.fragment_size, spec.target_overlap)
            results["fragments_per_cell"].append(
                {
                    "row": row,
                    "samples": samples,
                    "fragments": rows_in_file,
                    "problems": "; ".join(counts) or "none",
                }
            )
            results["finite_embeddings"].append(
                {"row": row, "fragments": rows_in_file, "non-finite": non_finite_rows(path)}
            )
            report = geoparquet.verify_file(path)
            results["unique_ids"].append(
                {
                    "row": row,
                    "fragments": report.rows,
                    "mismatched": len(report.mismatched_ids),
                    "problems": "; ".join(report.problems) or "none",
                }
            )
            outside, margin = outside_cell_fragments(path)
            results["inside_grid_cell"].append(
                {"row": row, "fragments": rows_in_file, "outside": outside, "margin (m)": round(margin, 1)}
            )

        failed = {
            "table2_schema": lambda r: r["problems"] != "none",
            "fragments_per_cell": lambda r: r["problems"] != "none",
            "finite_embeddings": lambda r: r["non-finite"] > 0,
            "unique_ids": lambda r: r["mismatched"] > 0 or r["problems"] != "none",
            "inside_grid_cell": lambda r: r["outside"] > 0,
        }
        for name in CHECK_NAMES:
            bad_rows = [r["row"] for r in results[name] if failed[name](r)]
            yield dg.AssetCheckResult(
                check_name=name,
                asset_key=asset_key,
                # no file checked is not a pass: a check that cannot fail proves nothing
                passed=bool(results[name]) and not bad_rows and not missing,
                metadata={
                    "rows checked": len(results[name]),
                    "failing rows": ", ".join(bad_rows) or "none",
                    "missing files": ", ".join(missing) or "none",
                    "per row": dg.MetadataValue.md(presentation.markdown_table(results[name], limit=50)),
                },
            )

    return _checks


embedding_checks = [build_embedding_checks(model) for model in load_settings().models]
