"""Decode cost per Core sample: one-row-group read + GeoTIFF decode + nearest upsampling.

Writes a small synthetic S2L1C collection (size 1068) per GeoTIFF compression, then times, per
cell, ``read_raw`` (the ranged row-group read), ``decode_bands`` (13 bands and RGB, 1 and 2
threads) and the whole ``read_sample``. Reports the median wall time and the median CPU time of
the process (all threads), because a shared machine inflates wall times.

    .venv/bin/python -m benchmarks.bench_decode [--cells 4] [--repeats 5] [--compress deflate none]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from majortom_assets import synthetic
from majortom_assets.core import CoreCollection, decode_bands
from majortom_assets.standard import CORE_IMAGE_SIZE, RGB_BANDS, S2L1C_BANDS

RGB = RGB_BANDS


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()   # warm: pools, GDAL drivers, page cache
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def bench(compress: str, cells: int, repeats: int, workdir: Path) -> list[tuple[str, float, float]]:
    cell_names = synthetic.cells_for_rows(["506U"], cells)
    out = synthetic.generate_collection(workdir / compress, "S2L1C", cells=cell_names, size=CORE_IMAGE_SIZE,
                                        compress=compress, samples_per_shard=cells)
    coll = CoreCollection(str(out))
    meta = coll.metadata()
    rows = [r for _, r in meta.iterrows()]
    columns = ["product_id", "grid_cell", *S2L1C_BANDS]
    raws = [coll.read_raw(r["parquet_url"], r["parquet_row"], columns) for r in rows]
    per_cell = len(rows)

    def each(fn):
        return lambda: [fn(r, raw) for r, raw in zip(rows, raws)]

    cases = {
        "read_raw (13 bands, one row group)": each(lambda r, raw: coll.read_raw(r["parquet_url"],
                                                                                r["parquet_row"], columns)),
    }
    for workers in (1, 2):
        plural = "" if workers == 1 else "s"
        cases[f"decode 13 bands, {workers} thread{plural}"] = each(
            lambda r, raw, w=workers: decode_bands(raw, S2L1C_BANDS, CORE_IMAGE_SIZE, product_id=r["product_id"],
                                                   grid_cell=r["grid_cell"], max_workers=w))
        cases[f"decode RGB, {workers} thread{plural}"] = each(
            lambda r, raw, w=workers: decode_bands(raw, RGB, CORE_IMAGE_SIZE, product_id=r["product_id"],
                                                   grid_cell=r["grid_cell"], max_workers=w))
        cases[f"read_sample 13 bands, {workers} thread{plural}"] = each(
            lambda r, raw, w=workers: coll.read_sample(r, S2L1C_BANDS, max_workers=w))
    results = []
    for name, fn in cases.items():
        wall, cpu = _time(fn, repeats)
        results.append((name, wall / per_cell, cpu / per_cell))
    sizes = [sum(len(raw[b]) for b in S2L1C_BANDS) for raw in raws]
    results.append((f"(band bytes per cell: {statistics.mean(sizes) / 1e6:.2f} MB)", float("nan"), float("nan")))
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compress", nargs="+", default=["deflate", "none"],
                        choices=list(synthetic.GEOTIFF_COMPRESSION))
    args = parser.parse_args(argv)
    print(f"cpus={os.cpu_count()} load_avg_1min={os.getloadavg()[0]:.2f} cells={args.cells} "
          f"repeats={args.repeats}")
    print("| GeoTIFF compression | step (per 13-band S2L1C cell, size 1068) | wall ms (median) | CPU ms (median) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for compress in args.compress:
            for name, wall, cpu in bench(compress, args.cells, args.repeats, Path(tmp)):
                if math.isnan(wall):   # an informational row
                    print(f"| {compress} | {name} | | |")
                else:
                    print(f"| {compress} | {name} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} |")


if __name__ == "__main__":
    main()
