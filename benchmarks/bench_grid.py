"""Speed of the vectorised Major TOM grid and of fragment gathering.

Run: .venv/bin/python -m benchmarks.bench_grid [--points 1000000] [--repeat 3]

Each figure is the best of ``--repeat`` runs (wall clock, one process).
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.timing import best_of
from majortom_assets.fragment import fragment_layout, fragment_views, gather_fragments
from majortom_assets.grid import Grid, cell_name, parse_cell_names
from majortom_assets.standard import CORE_IMAGE_SIZE


def report(label: str, seconds: float, count: int, unit: str) -> dict:
    print(f"| {label:<52} | {seconds * 1e3:10.2f} ms | {count / seconds:14,.0f} {unit}/s |")
    return {"label": label, "seconds": seconds, "count": count, "rate": count / seconds, "unit": unit}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    n, rep = args.points, args.repeat
    results = []
    print("| step | time | rate |\n|---|---:|---:|")

    t, _cpu, grid = best_of(rep, lambda: Grid(10.0))
    results.append(report("Grid(10 km) construction (1,893 rows)", t, len(grid.rows()), "rows"))
    t, _cpu, (rows, cols) = best_of(rep, grid.all_cells)
    results.append(report(f"all_cells(): {rows.size:,} cells", t, rows.size, "cells"))
    t, _cpu, _ = best_of(rep, lambda: cell_name(rows, cols))
    results.append(report("cell_name() for every cell", t, rows.size, "names"))
    t_all, _cpu, _ = best_of(rep, lambda: cell_name(*Grid(10.0).all_cells()))
    results.append(report("whole 10 km grid: build + all_cells + names", t_all, rows.size, "cells"))
    t, _cpu, _ = best_of(rep, lambda: grid.cell_corner(rows, cols))
    results.append(report("cell_corner() for every cell", t, rows.size, "cells"))
    t, _cpu, _ = best_of(rep, lambda: grid.utm_epsg(rows, cols))
    results.append(report("utm_epsg() for every cell", t, rows.size, "cells"))

    rng = np.random.default_rng(0)
    lat = rng.uniform(-84.9, 85.0, n)
    lon = rng.uniform(-180.0, 180.0, n)
    t, _cpu, (r, c) = best_of(rep, lambda: grid.latlon_to_cell(lat, lon))
    results.append(report(f"latlon_to_cell(): {n:,} random points", t, n, "points"))
    t, _cpu, point_names = best_of(rep, lambda: cell_name(r, c))
    results.append(report(f"cell_name(): {n:,} cells", t, n, "names"))
    t, _cpu, _ = best_of(rep, lambda: parse_cell_names(point_names))
    results.append(report(f"parse_cell_names(): {n:,} names", t, n, "names"))
    m = min(n, 200_000)
    t, _cpu, _ = best_of(rep, lambda: grid.cell_polygon(r[:m], c[:m]))
    results.append(report(f"cell_polygon(): {m:,} boxes", t, m, "boxes"))

    image = rng.integers(0, 10_000, size=(13, CORE_IMAGE_SIZE, CORE_IMAGE_SIZE), dtype=np.uint16)
    for size in (224, 384):
        layout = fragment_layout(CORE_IMAGE_SIZE, CORE_IMAGE_SIZE, size)
        out = np.empty((layout.count, 13, size, size), dtype=np.uint16)
        out32 = np.empty((layout.count, 13, size, size), dtype=np.float32)
        reps = max(rep, 10)
        t, _cpu, _ = best_of(reps, lambda layout=layout: fragment_views(image, layout))
        results.append(report(f"fragment_views(): 13x1068^2 -> {layout.count} x {size}px", t, 1, "cells"))
        t, _cpu, _ = best_of(reps, lambda layout=layout, out=out: gather_fragments(image, layout, out=out))
        results.append(
            report(f"gather_fragments(): 13x1068^2 -> {layout.count} x {size}px uint16", t, 1, "cells")
        )
        t, _cpu, _ = best_of(reps, lambda layout=layout, out=out32: gather_fragments(image, layout, out=out))
        results.append(report("gather_fragments(): same, into float32 out", t, 1, "cells"))
    t, _cpu, _ = best_of(max(rep, 10), image.copy)
    results.append(report("reference point: image.copy() of 13x1068^2 uint16", t, 1, "cells"))
    return results


if __name__ == "__main__":
    main()
