"""Up-front metadata validation (core.validate_metadata) on a Core-sized table.

Run: .venv/bin/python -m benchmarks.bench_metadata [--rows 2250000] [--bad 0.001] [--dupes 0.01] [--repeat 3]

Builds a metadata table shaped like Core-S2L2A's (about 2.25 M samples; real grid cells, Core's
'20230415T181919' timestamps, STANDARD.md §1 columns) in memory -- no disk use -- with a fraction
of bad rows (non-cells, row/col disagreeing with the name, malformed timestamps) and repeated
samples, then times `validate_metadata` over it. Vectorised means the cost per row stays at
microseconds and grows linearly; only the rejected rows are visited one by one. It also times a
10x smaller table to show the scaling. Memory: about 1.5 GB for 2.25 M rows (pandas object
columns). Each figure is the best of ``--repeat`` runs (wall clock, one process).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from benchmarks.timing import best_of
from majortom_assets import grid
from majortom_assets.core import validate_metadata


def make_metadata(n: int, bad: float, dupes: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows, cols = grid.get_grid().all_cells()
    pick = rng.choice(len(rows), size=n, replace=len(rows) < n)
    r, c = rows[pick], cols[pick]
    seconds = rng.integers(0, 5 * 365 * 86400, n)
    stamps = (np.datetime64("2019-01-01T00:00:00") + seconds.astype("timedelta64[s]")).astype(str)
    stamps = np.strings.replace(np.strings.replace(stamps, "-", ""), ":", "")
    frame = pd.DataFrame({
        "grid_cell": grid.cell_name(r, c).astype(object),
        "grid_row_u": r.astype(np.int32),
        "grid_col_r": c.astype(np.int32),
        "product_id": np.strings.add("S2A_MSIL2A_", np.arange(n).astype(str)).astype(object),
        "timestamp": stamps.astype(object),
        "cloud_cover": rng.uniform(0, 100, n),
        "nodata": rng.uniform(0, 1, n),
        "centre_lat": rng.uniform(-80, 80, n),
        "centre_lon": rng.uniform(-180, 180, n),
        "crs": np.full(n, "EPSG:32633", dtype=object),
        "parquet_url": np.strings.add("images/part_", (np.arange(n) // 500).astype(str)).astype(object),
        "parquet_row": (np.arange(n) % 500).astype(np.int64),
    })
    k = int(n * bad)
    if k:
        third = max(1, k // 3)
        idx = rng.choice(n, size=3 * third, replace=False)
        frame.loc[idx[:third], "grid_cell"] = "999Z_1R"
        frame.loc[idx[third:2 * third], "grid_row_u"] += 1
        frame.loc[idx[2 * third:], "timestamp"] = "2023-13-45 whenever"
    d = int(n * dupes)
    if d:
        frame = pd.concat([frame, frame.iloc[rng.choice(n, size=d, replace=False)]], ignore_index=True)
    return frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_250_000)
    parser.add_argument("--bad", type=float, default=0.001, help="fraction of bad rows (default 0.1%%)")
    parser.add_argument("--dupes", type=float, default=0.01, help="fraction of repeated samples (default 1%%)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print("| rows | bad rows rejected | duplicates dropped | validate_metadata (wall) | CPU | CPU per row |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (args.rows // 10, args.rows):
        frame = make_metadata(n, args.bad, args.dupes)
        seconds, cpu, selection = best_of(args.repeat, lambda frame=frame: validate_metadata(frame))
        print(f"| {len(frame):,} | {selection.rejected:,} | {selection.duplicates:,} | {seconds:.2f} s | "
              f"{cpu:.2f} s | {cpu / len(frame) * 1e6:.2f} µs |")
        del frame, selection


if __name__ == "__main__":
    main()
