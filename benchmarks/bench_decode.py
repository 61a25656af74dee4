"""Decode cost per Core sample: one-row-group read + GeoTIFF decode + nearest upsampling.

Writes a small synthetic S2L1C collection (size 1068) per GeoTIFF compression, then times, per
cell, ``read_raw`` (the ranged row-group read), ``decode_bands`` (13 bands and RGB, 1 and 2
threads) and the whole ``read_sample``. Reports the median wall time and the median CPU time of
the process (all threads), because a shared machine inflates wall times.

    .venv/bin/python -m benchmarks.bench_decode [--cells 4] [--repeats 5] [--compress deflate none]
    .venv/bin/python -m benchmarks.bench_decode --scaling [--cells 6] [--repeats 3]

``--scaling`` measures the engine's whole prepare stage (read row group, decode 13 bands +
upsample, invalid-value check, fragment gather into a uint16 buffer: what a CUDA run does on the
host) per cell: CPU time of each stage with imagecodecs (libdeflate) and with the zlib fallback
(the GPU machine without imagecodecs), the time it holds the GIL (a probe thread timing how long
it waits for the GIL), the throughput with 1 and 2 threads and 1 and 2 processes, and the
projected cells/s per core count (docs/benchmarks.md, "Decode scaling").
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from majortom_assets import geotiff, synthetic
from majortom_assets.core import CoreCollection, _zero_copy_values, decode_bands
from majortom_assets.fragment import fragment_layout, gather_fragments
from majortom_assets.models import find_invalid_values, get_spec
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


# ---- --scaling ------------------------------------------------------------------------------
SPEC = "ssl4eo-s2"
CORE = 1068


@contextmanager
def without_imagecodecs(active: bool):
    """The decoder as on a machine without imagecodecs (zlib inflate, numpy predictor)."""
    saved = geotiff._imagecodecs
    if active:
        geotiff._imagecodecs = None
    try:
        yield
    finally:
        geotiff._imagecodecs = saved


_WORKER: dict = {}


def _worker_init(url: str, zlib_only: bool) -> None:
    _WORKER["collection"] = CoreCollection(url)
    if zlib_only:
        geotiff._imagecodecs = None


def prepare(collection: CoreCollection, row: dict, out: np.ndarray | None = None) -> np.ndarray:
    """The engine's prepare stage for a CUDA run: read, decode, check, gather uint16 fragments."""
    from majortom_assets.engine import read_for_fragments

    read = read_for_fragments(collection, get_spec(SPEC), CORE, row)
    if not isinstance(read, tuple):
        raise RuntimeError(read.reason)  # noqa: TRY004 -- a sample failure, not a wrong type
    sample, layout = read
    return gather_fragments(sample.pixels, layout, out=out)


def _prepare_in_process(row: dict) -> float:
    started = time.thread_time()
    prepare(_WORKER["collection"], row)
    return time.thread_time() - started


def stage_cpu(collection: CoreCollection, rows: list[dict], repeats: int) -> dict[str, float]:
    """CPU ms per cell of each prepare stage, one thread (thread_time: load-independent)."""
    spec = get_spec(SPEC)
    layout = fragment_layout(CORE, CORE, spec.fragment_size, spec.target_overlap)
    columns = ["product_id", "grid_cell", *spec.bands]
    out = np.empty((layout.count, len(spec.bands), spec.fragment_size, spec.fragment_size), np.uint16)
    totals = dict.fromkeys(["read row group", "decode 13 bands + upsample", "invalid-value check",
                            "gather uint16 fragments"], 0.0)
    for _ in range(repeats):
        for row in rows:
            t0 = time.thread_time()
            raw = _zero_copy_values(collection._read_row_group(row["parquet_url"], row["parquet_row"], columns,
                                                               row["product_id"], row["grid_cell"]))
            t1 = time.thread_time()
            pixels, _, _ = decode_bands(raw, spec.bands, CORE, product_id=row["product_id"],
                                        grid_cell=row["grid_cell"], max_workers=1)
            t2 = time.thread_time()
            find_invalid_values(pixels, spec.normalisation, spec.bands)
            t3 = time.thread_time()
            gather_fragments(pixels, layout, out=out)
            t4 = time.thread_time()
            for name, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                totals[name] += dt
    n = repeats * len(rows)
    return {name: 1e3 * v / n for name, v in totals.items()}


def _probe_wait(work: Callable[[], None]) -> tuple[float, float]:
    """(seconds the probe waited for the GIL, wall seconds) while `work` runs in this thread.

    A probe thread calls ``time.sleep(0)`` (release + re-acquire the GIL) in a loop and adds up
    how long each re-acquisition took. The switch interval is lowered to 0.5 ms so a holder is
    asked to let go quickly.
    """
    stop = threading.Event()
    waited = [0.0]

    def probe() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0)
            waited[0] += time.perf_counter() - t

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    thread = threading.Thread(target=probe, daemon=True)
    try:
        thread.start()
        started = time.perf_counter()
        work()
        wall = time.perf_counter() - started
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    return waited[0], wall


def gil_held(collection: CoreCollection, rows: list[dict], repeats: int) -> tuple[float, float, float]:
    """(GIL-held ms per cell, probe wait share while preparing, probe wait share on a GIL-free baseline).

    On a loaded machine the probe also waits for a CPU, not only for the GIL; a baseline run of
    the same length doing GIL-free work (zlib inflating outside the GIL) measures that share, and
    only the excess is counted as GIL time.
    """
    n = repeats * len(rows)
    waited, wall = _probe_wait(lambda: [prepare(collection, row) for _ in range(repeats) for row in rows])
    blob = zlib.compress(np.random.default_rng(0).integers(0, 4000, 2**20, dtype=np.uint16).tobytes(), 1)

    def gil_free() -> None:
        until = time.perf_counter() + wall
        while time.perf_counter() < until:
            zlib.decompress(blob)

    base_waited, base_wall = _probe_wait(gil_free)
    share, base_share = waited / wall, base_waited / base_wall
    held = max(0.0, share - base_share) / max(1e-9, 1.0 - base_share) * wall
    return 1e3 * held / n, share, base_share


def throughput(url: str, rows: list[dict], workers: int, kind: str, zlib_only: bool) -> tuple[float, float]:
    """(cells/s wall, CPU ms per cell) of the prepare stage with `workers` threads or processes."""
    if kind == "threads":
        collection = CoreCollection(url)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda r: prepare(collection, r), rows[:workers]))   # warm
            cpu, started = time.process_time(), time.perf_counter()
            list(pool.map(lambda r: prepare(collection, r), rows))
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        return len(rows) / wall, 1e3 * cpu / len(rows)
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(url, zlib_only)) as pool:
        list(pool.map(_prepare_in_process, rows[:workers]))   # start + warm every worker
        started = time.perf_counter()
        cpus = list(pool.map(_prepare_in_process, rows))
        wall = time.perf_counter() - started
    return len(rows) / wall, 1e3 * sum(cpus) / len(rows)


def scaling(cells: int, repeats: int, workdir: Path) -> None:
    out = synthetic.generate_collection(workdir / "scaling", "S2L1C", cells=synthetic.cells_for_rows(["506U"], cells),
                                        size=CORE, compress="deflate", samples_per_shard=cells)
    collection = CoreCollection(str(out))
    rows = collection.metadata().to_dict("records")
    many = rows * max(2, 24 // len(rows))
    decoders = [("imagecodecs (libdeflate)", False)] if geotiff.imagecodecs_available() else []
    decoders.append(("zlib, no imagecodecs (GPU machine)", True))
    print(f"\nprepare stage per 13-band S2L1C cell ({CORE} px, DEFLATE + predictor 2, uint16 gather "
          f"of 25 fragments): {len(rows)} unique cells, {repeats} repeats")
    print("\n| decoder | stage | CPU ms per cell |\n|---|---|---|")
    summary = {}
    for label, zlib_only in decoders:
        with without_imagecodecs(zlib_only):
            stages = stage_cpu(collection, rows, repeats)
            held_ms, share, base_share = gil_held(collection, rows, repeats)
        for name, ms in stages.items():
            print(f"| {label} | {name} | {ms:.1f} |")
        total = sum(stages.values())
        print(f"| {label} | **total prepare** | **{total:.1f}** |")
        print(f"| {label} | GIL held (probe: waits {100 * share:.0f} % of wall while preparing, "
              f"{100 * base_share:.0f} % on a GIL-free baseline) | {held_ms:.1f} |")
        summary[label] = (total, held_ms, zlib_only)
    print("\n| decoder | workers | cells/s (wall) | CPU ms per cell |\n|---|---|---|---|")
    for label, (_, _, zlib_only) in summary.items():
        for kind in ("threads", "processes"):
            for workers in (1, 2):
                with without_imagecodecs(zlib_only):
                    rate, cpu = throughput(str(out), many, workers, kind, zlib_only)
                print(f"| {label} | {workers} {kind} | {rate:.1f} | {cpu:.1f} |")
    print("\nprojected prepare throughput, cells/s: processes = max(1, cores - 1) x 1000 / CPU ms "
          "(one core left to the main process); threads = min(cores x 1000 / CPU ms, 1000 / GIL ms)")
    print("\n| decoder | " + " | ".join(f"{k} cores" for k in (1, 2, 4, 8, 16)) + " |\n|---|" + "---|" * 5)
    for label, (total, held, _) in summary.items():
        procs = [max(1, k - 1) * 1e3 / total for k in (1, 2, 4, 8, 16)]
        threads = [min(k * 1e3 / total, 1e3 / held) for k in (1, 2, 4, 8, 16)]
        print(f"| {label}, processes | " + " | ".join(f"{v:.0f}" for v in procs) + " |")
        print(f"| {label}, threads | " + " | ".join(f"{v:.0f}" for v in threads) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compress", nargs="+", default=["deflate", "none"],
                        choices=list(synthetic.GEOTIFF_COMPRESSION))
    parser.add_argument("--scaling", action="store_true",
                        help="prepare-stage CPU per stage, GIL time, threads vs processes, projection")
    args = parser.parse_args(argv)
    if args.scaling:
        print(f"cpus={os.cpu_count()} load_avg_1min={os.getloadavg()[0]:.2f}")
        with tempfile.TemporaryDirectory() as tmp:
            scaling(args.cells, args.repeats, Path(tmp))
        return
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
