"""Point look-ups over a 1M-fragment store: time and the share of bytes read.

    .venv/bin/python -m benchmarks.bench_extract --out /tmp/majortom_bench_extract   # ~3 GB on disk

The store is laid out exactly as the engine writes it (``engine.embed_to_file``): Table 2
GeoParquet per grid row, rows sorted by grid column and time, row groups of
``engine.EMBEDDING_ROW_GROUP_ROWS``. Cells are consecutive cells of ``--rows`` grid rows starting
at row 200U (mid-latitudes), each with 25 fragments (1068 px images, 224 px fragments) at
``--dates`` dates; footprints are the true UTM fragment footprints (`geoparquet.sample_table`).
Vectors are random (their values do not matter for a look-up; random floats do not compress, so
the file sizes are honest).

Queries (10 000 points each), each through `vectors.iocount.ByteCounter`:
  * clustered:  points uniform in a 50 km x 50 km field area inside the store;
  * scattered:  points uniform over the whole store's extent;
  * clustered + one date (``start``/``end``).
Prints a JSON summary (also OUT/summary.json). ``--keep`` keeps the store for reruns.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from majortom_assets import geoparquet
from majortom_assets.engine import EMBEDDING_ROW_GROUP_ROWS
from majortom_assets.fragment import fragment_layout
from majortom_assets.grid import cell_name, get_grid, row_name
from majortom_assets.vectors import extract
from majortom_assets.vectors.iocount import ByteCounter
from majortom_assets.vectors.testdata import _transform_for

FIRST_ROW = 200


def make_store(root: Path, rows: int, cells_per_row: int, dates: int, dim: int, seed: int) -> list[Path]:
    layout = fragment_layout(1068, 1068, 224)
    grid = get_grid()
    rng = np.random.default_rng(seed)
    stamps = [pd.Timestamp("2021-06-01", tz="UTC") + pd.Timedelta(days=45 * d) for d in range(dates)]
    info = geoparquet.EmbeddingFileInfo(model="bench", weights="random", random_weights=True, embedding_dim=dim,
                                        fragment_size=224, target_overlap=0.1, source_collection="synthetic")
    paths = []
    for r in range(FIRST_ROW, FIRST_ROW + rows):
        cols = grid.cells_in_row(r)
        start = int(np.searchsorted(cols, 0))
        picked = cols[start:start + cells_per_row]

        def tables(r=r, picked=picked):
            for c in picked:       # sorted by column, then time: the engine's order
                cell = str(cell_name(r, int(c)))
                crs, transform = _transform_for(cell, 1068)
                for d, ts in enumerate(stamps):
                    emb = rng.standard_normal((layout.count, dim), dtype=np.float32)
                    yield geoparquet.sample_table(emb, grid_cell=cell, product_id=f"B_{cell}_{d}", timestamp=ts,
                                                  crs=crs, transform=transform, boxes=layout.boxes,
                                                  check_finite=False)

        path = root / "embeddings" / "bench" / f"row={row_name(r)}" / "embeddings.parquet"
        paths.append(geoparquet.write_embeddings(path, tables(), info, row_group_size=EMBEDDING_ROW_GROUP_ROWS))
    return paths


def _extent(paths: list[Path]) -> tuple[float, float, float, float]:
    import pyarrow.parquet as pq

    lat = np.concatenate([pq.read_table(p, columns=["centre_lat"]).column(0).to_numpy() for p in paths])
    lon = np.concatenate([pq.read_table(p, columns=["centre_lon"]).column(0).to_numpy() for p in paths])
    return float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())


def run_query(name: str, paths: list[Path], lat: np.ndarray, lon: np.ndarray, **window) -> dict:
    places = extract.Places.points(lat, lon)
    counter = ByteCounter()
    t0 = time.perf_counter()
    result = extract.extract(paths, places, counter=counter, **window)
    seconds = time.perf_counter() - t0
    total_bytes = sum(p.stat().st_size for p in paths)
    groups = sum(p.row_groups for p in result.plans)
    return {
        "query": name, "points": len(lat), "seconds": round(seconds, 3),
        "matches": result.table.num_rows, "points_matched": result.places_matched,
        "bytes_read": counter.bytes_read, "store_bytes": total_bytes,
        "fraction_of_store": round(counter.bytes_read / total_bytes, 5),
        "files_opened": len(counter.sizes), "files_skipped": sum(p.skipped for p in result.plans),
        "row_groups_store": groups,
        "row_groups_metadata_read": sum(p.candidate_groups for p in result.plans),
        "row_groups_embeddings_read": sum(p.embedding_groups for p in result.plans),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/majortom_bench_extract"))
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--cells-per-row", type=int, default=1000)
    ap.add_argument("--dates", type=int, default=2)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--points", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the store")
    args = ap.parse_args()

    store = args.out / "store"
    t0 = time.perf_counter()
    existing = sorted((store / "embeddings" / "bench").glob("row=*/embeddings.parquet"))
    if args.keep and len(existing) == args.rows:
        paths, build_s = existing, None
    else:
        shutil.rmtree(store, ignore_errors=True)
        paths = make_store(store, args.rows, args.cells_per_row, args.dates, args.dim, args.seed)
        build_s = round(time.perf_counter() - t0, 1)
    import pyarrow.parquet as pq

    fragments = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    w, s, e, n = _extent(paths)
    rng = np.random.default_rng(args.seed + 1)
    # a 50 km square field area in the middle of the store
    clat, clon = (s + n) / 2, (w + e) / 2
    half_lat = 25 / 111.32
    half_lon = 25 / (111.32 * np.cos(np.radians(clat)))
    cl_lat = rng.uniform(clat - half_lat, clat + half_lat, args.points)
    cl_lon = rng.uniform(clon - half_lon, clon + half_lon, args.points)
    sc_lat = rng.uniform(s, n, args.points)
    sc_lon = rng.uniform(w, e, args.points)
    results = [
        run_query("clustered (50 km field area)", paths, cl_lat, cl_lon),
        run_query("clustered, one date (--start/--end)", paths, cl_lat, cl_lon,
                  start="2021-06-01", end="2021-06-01T23:59:59"),
        run_query("scattered (whole store)", paths, sc_lat, sc_lon),
    ]
    summary = {
        "fragments": fragments, "dim": args.dim, "files": len(paths),
        "store_gb": round(sum(p.stat().st_size for p in paths) / 1e9, 3),
        "row_group_rows": EMBEDDING_ROW_GROUP_ROWS, "store_build_seconds": build_s,
        "extent_wsen": [round(v, 3) for v in (w, s, e, n)], "queries": results,
    }
    text = json.dumps(summary, indent=1)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(text)
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
