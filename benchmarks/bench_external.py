"""Speed of the external inputs: normalising a released-shaped file, and pooling AlphaEarth tiles.

Run: .venv/bin/python -m benchmarks.bench_external [--cells 40] [--dim 2048] [--aef-cells 4] [--repeat 2]

* released: one file in the reference embedder's shape (variable-length list<float>, transposed
  footprints, crs null), ``cells`` x 25 fragments of ``dim`` values; timed: the quirks report
  (4096 rows inspected), `iter_normalised` over the whole file (fixed-size view + corrected
  footprints + CRS84 geometry), and writing the Table 2 view (`ReleasedView.refresh`);
* AlphaEarth: one 64-band int8 tile per cell (half with a positive y step); timed: reading each
  cell's 1068 x 1068 px window and pooling its 25 fragments.

Everything is written to a temporary folder (about ``cells`` x 0.25 MB x dim/1024 for the
released file, 80 MB per AEF tile) that is removed afterwards. Each figure is the best of
``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchmarks.timing import best_of
from majortom_assets import alphaearth, released, synthetic
from majortom_assets import released_fixtures as rf


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=40)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--aef-cells", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_external_"))
    results = []

    def report(label, times, count, unit, extra=""):
        wall, cpu = times
        print(f"| {label:<46} | {wall:8.2f} s | {count / wall:10,.1f} {unit}/s | {cpu:8.2f} s | "
              f"{count / max(cpu, 1e-9):10,.1f} {unit}/s | {extra}")
        results.append({"label": label, "wall": wall, "cpu": cpu, "rate": count / wall, "unit": unit})

    try:
        cells = synthetic.cells_for_rows(["136U", "12D", "500U"], max(1, args.cells // 3))[: args.cells]
        path = rf.write_reference_file(tmp / "Core-S2L1C-SSL4EO" / "part_00000.parquet", cells, args.dim,
                                       row_group_size=2048)
        mb = path.stat().st_size / 1e6
        source = released.open_source(path)
        rows = len(cells) * 25
        print(f"released-shaped file: {rows} fragments x {args.dim}, {mb:.1f} MB on disk")
        print("| step | wall | wall rate | CPU | CPU rate | |")
        *t, _ = best_of(args.repeat, lambda: released.check_source(source))
        report("quirks report (4096 rows inspected)", t, min(rows, 4096), "rows")
        *t, n = best_of(args.repeat, lambda: sum(b.num_rows for b in released.iter_normalised(source, str(path))))
        report("normalise (iter_normalised, whole file)", t, n, "rows", f"{mb / t[1]:.1f} MB/s of file (CPU)")

        def view():
            target = tmp / "view"
            shutil.rmtree(target, ignore_errors=True)
            return released.ReleasedView(source, target).refresh(quirks=False)

        *t, written = best_of(args.repeat, view)
        report(f"Table 2 view ({len(written)} row files)", t, rows, "rows")

        aef_cells = cells[: args.aef_cells]
        index = rf.write_aef_tiles(tmp / "aef", aef_cells, 2021)
        tiles = alphaearth.read_tile_index(index)

        def pool():
            return [alphaearth.cell_table(alphaearth.read_cell(c, tiles, 2021), 2021) for c in aef_cells]

        *t, _ = best_of(args.repeat, pool)
        report("AEF read + pool (25 fragments per cell)", t, len(aef_cells), "cells")
        image = alphaearth.read_cell(aef_cells[0], tiles, 2021)
        *t, _ = best_of(args.repeat, lambda: alphaearth.cell_table(image, 2021))
        report("AEF pool only (in memory)", t, 1, "cells")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
