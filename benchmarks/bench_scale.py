"""Archive-shaped scale benchmark: every global product through Dagster, full build vs one new row.

    .venv/bin/python -m benchmarks.bench_scale --vectors 1000000 --dim 768 --root /tmp/majortom_scale

1. Writes synthetic Table 2 GeoParquet row files (the project's own writer, real fragment
   footprints) with the archive's row-size distribution: every grid row between 65°S and 84°N
   (about 1,650 of the 10 km grid's 1,893 rows, as Core-S2L2A holds ~1,700) gets samples in
   proportion to its number of grid cells (∝ cos latitude, ~4,000 at the equator) times a land
   fraction per latitude band, scaled so the rows hold `--vectors` fragment embeddings in all.
   A 1,068 px sample gives 25 fragments of 224 px; a tenth of the cells have a second date (so the
   change product has work), 5 % of those changed. Vectors are class centre + cell offset + noise.
2. Holds back the largest row, then materialises every global product of the model through the
   Dagster CLI (`dagster asset materialize -m majortom_assets.definitions --select KEY`, fresh
   DAGSTER_HOME, in-process executor), one subprocess per step: wall time and peak RSS (wait4).
3. Writes the held-back row and materialises every product again: the time to add one row, and
   its ratio to the full build.

Prints and writes OUT/summary.json (OUT = --root/bench). The data is deleted at the end unless
--keep; the disk it needs is about vectors × dim × 4 bytes (+ exports: half and a quarter again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

FRAGMENTS_PER_SAMPLE = 25  # 1,068 px sample, 224 px fragments (Algorithm 1)
IMAGE_SIZE, FRAGMENT_SIZE = 1068, 224
SECOND_DATE_EVERY = 10     # every 10th cell has a second acquisition
N_CLASSES = 8
MODEL_FOR_DIM = {768: "dinov2-rgb", 1152: "siglip-rgb", 2048: "ssl4eo-s2"}
#: Fraction of land per 10° latitude band, south to north (-90..-80 first): Earth's rough profile.
LAND_FRACTION = [1.0, 0.7, 0.1, 0.01, 0.03, 0.11, 0.23, 0.22, 0.24,
                 0.23, 0.26, 0.38, 0.43, 0.52, 0.55, 0.70, 0.45, 0.25]
LAT_RANGE = (-65.0, 84.0)  # Sentinel-2 coverage: no samples in the far south


def row_sizes(vectors: int) -> dict[int, int]:
    """Samples per grid row (signed row int) for `vectors` fragment embeddings in all."""
    from majortom_assets.grid import get_grid

    grid = get_grid()
    rows = grid.rows()
    mid = (grid.row_bottom_lat(rows) + grid.row_top_lat(rows)) / 2.0
    land = np.asarray(LAND_FRACTION)[np.clip(((mid + 90.0) // 10).astype(int), 0, 17)]
    weight = np.array([len(grid.cells_in_row(int(r))) for r in rows]) * land
    weight[(mid < LAT_RANGE[0]) | (mid > LAT_RANGE[1])] = 0.0
    per_sample = FRAGMENTS_PER_SAMPLE * (1.0 + 1.0 / SECOND_DATE_EVERY)
    cells = np.maximum(np.rint(weight / weight.sum() * vectors / per_sample), 1).astype(int)
    cells[weight == 0] = 0
    ncells = np.array([len(grid.cells_in_row(int(r))) for r in rows])
    cells = np.minimum(cells, ncells)
    return {int(r): int(c) for r, c in zip(rows, cells) if c > 0}


def _write_row(args: tuple) -> tuple[str, int, float, list]:
    """One row file: `cells` cells spread evenly along the row, 25 fragments, 1-2 dates each."""
    from majortom_assets import geoparquet
    from majortom_assets.fragment import fragment_layout
    from majortom_assets.grid import cell_name, get_grid, row_name
    from majortom_assets.vectors import testdata

    root, model, row, cells, dim, seed = args
    t0 = time.perf_counter()
    structure = np.random.default_rng(seed)
    centres = testdata.class_centres(N_CLASSES, dim, structure).astype(np.float32)
    rng = np.random.default_rng([seed, row + 10_000])
    cols = get_grid().cells_in_row(row)
    picked = cols[np.linspace(0, len(cols) - 1, cells).round().astype(int)] if cells > 1 else cols[:1]
    layout = fragment_layout(IMAGE_SIZE, IMAGE_SIZE, FRAGMENT_SIZE)
    classes = rng.integers(0, N_CLASSES, len(picked))
    dates = [pd.Timestamp("2021-06-01", tz="UTC"), pd.Timestamp("2022-06-01", tz="UTC")]
    tables, labels = [], []
    for i, col in enumerate(picked):
        name = str(cell_name(row, int(col)))
        base = centres[classes[i]] + 0.3 * rng.standard_normal(dim, dtype=np.float32)
        emb = base + 0.1 * rng.standard_normal((layout.count, dim), dtype=np.float32)
        crs, transform = testdata._transform_for(name, IMAGE_SIZE)
        n_dates = 2 if i % SECOND_DATE_EVERY == 0 else 1
        for t in range(n_dates):
            if t:
                emb = emb + 0.02 * rng.standard_normal(emb.shape, dtype=np.float32)
                if i % (SECOND_DATE_EVERY * 20) == 0:  # 5 % of the cells with two dates changed
                    emb = emb + rng.standard_normal(dim, dtype=np.float32)
            tables.append(geoparquet.sample_table(
                emb, grid_cell=name, product_id=f"SCALE_{name}_{t}", timestamp=dates[t], crs=crs,
                transform=transform, boxes=layout.boxes))
        labels.append((name, int(classes[i]), f"class {classes[i]}"))
    info = geoparquet.EmbeddingFileInfo(
        model=model, weights="synthetic", random_weights=True, embedding_dim=dim,
        fragment_size=FRAGMENT_SIZE, target_overlap=0.1, source_collection="synthetic (bench_scale)")
    rname = str(row_name(row))
    path = Path(root) / "embeddings" / model / f"row={rname}" / "embeddings.parquet"
    geoparquet.write_embeddings(path, tables, info)
    return rname, sum(t.num_rows for t in tables), time.perf_counter() - t0, labels


def _expand_row(args: tuple) -> tuple[str, int, float, list]:
    """A row file with `dates` acquisitions per cell, derived from a smaller run's row file.

    Geometry, footprints and pixel boxes are copied from the source's first date (no projection
    work); each further date gets the first date's embeddings plus fresh noise, its own timestamp,
    product id and unique_id (the Table 2 hash). The row-size distribution stays the source's,
    every row `dates` / (source dates per cell) times larger.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from majortom_assets import geoparquet

    src, dst, _model, dates, seed = args
    t0 = time.perf_counter()
    source = pq.read_table(src)
    first = source.filter(pc.ends_with(source.column("product_id"), "_0"))
    emb0 = geoparquet.embedding_matrix(first.column("embedding"))
    dim = emb0.shape[1]
    rng = np.random.default_rng([seed, zlib.crc32(Path(src).parent.name.encode())])
    cells = first.column("grid_cell").to_numpy(zero_copy_only=False).astype(str)
    tables = []
    for t in range(dates):
        emb = emb0 if t == 0 else emb0 + 0.02 * rng.standard_normal(emb0.shape, dtype=np.float32)
        stamp = np.full(len(cells), np.datetime64("2021-06-01T00:00:00", "us") + np.timedelta64(30 * t, "D"))
        products = np.char.add(np.char.add("SCALE_", cells), f"_{t}").astype(object)
        ids = geoparquet.unique_ids(first.column("geometry").to_numpy(zero_copy_only=False), stamp, products, emb)
        table = first
        for name, values in (
            ("embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)),
            ("timestamp", pa.array(stamp).cast(pa.timestamp("us", tz="UTC"))),
            ("product_id", pa.array(products, pa.string())), ("unique_id", pa.array(ids, pa.string()))):
            table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), values)
        tables.append(table.cast(geoparquet.embedding_schema(dim)))
    info = geoparquet.read_info(src)
    geoparquet.write_embeddings(Path(dst), tables, info)
    return Path(dst).parent.name, sum(t.num_rows for t in tables), time.perf_counter() - t0, []


def expand(source: Path, root: Path, model: str, rows: list[str], dates: int, workers: int) -> dict:
    """Every row of `source` (a kept smaller run) rewritten under `root` with `dates` dates per cell."""
    t0 = time.perf_counter()
    jobs = []
    for name in rows:
        src = next(p for p in (source / "embeddings" / model / f"row={name}" / "embeddings.parquet",
                               source / "held" / "embeddings" / model / f"row={name}" / "embeddings.parquet")
                   if p.is_file())
        jobs.append((str(src), str(root / "embeddings" / model / f"row={name}" / "embeddings.parquet"),
                     model, dates, 0))
    vectors = 0
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _, n, _, _ in pool.map(_expand_row, jobs, chunksize=4):
            vectors += n
    return {"rows": len(jobs), "vectors": vectors, "seconds": round(time.perf_counter() - t0, 1),
            "expanded_from": str(source), "dates_per_cell": dates}


def generate(root: Path, model: str, sizes: dict[int, int], dim: int, workers: int, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    vectors, labels = 0, []
    jobs = [(str(root), model, row, cells, dim, seed) for row, cells in sizes.items()]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _, n, _, lab in pool.map(_write_row, jobs, chunksize=4):
            vectors += n
            labels += lab
    return {"rows": len(jobs), "vectors": vectors, "seconds": round(time.perf_counter() - t0, 1), "labels": labels}


def write_labels(root: Path, labels: list) -> None:
    """The evaluation asset reads land-cover labels from the collection folder."""
    coll = root / "collections" / "Core-S2L2A"
    coll.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(labels, columns=["grid_cell", "class_id", "class_name"]).to_parquet(coll / "labels.parquet")


def product_keys(model: str) -> list[str]:
    """Every global (unpartitioned) product of one model, as the code location defines them."""
    from majortom_assets.defs import keys

    out = [keys.pca_map_key(model), keys.index_key(model),
           *(keys.export_key(model, p) for p in keys.EXPORT_PRECISIONS),
           keys.change_key(model), keys.evaluation_key(model), keys.SQL_CATALOG_KEY]
    return [k.to_user_string() for k in out]


def product_outputs(root: Path, model: str, key: str) -> list[Path]:
    """What a product wrote (removed before its full build, so 'full' really reads every row)."""
    from majortom_assets.layout import StorageLayout

    layout = StorageLayout.at(root)
    kind = key.rsplit("/", 1)[-1]
    return {
        "pca": [layout.map_dir(model)], "index": [layout.index_dir(model)],
        "float16": [layout.export_dir(model, "float16")], "int8": [layout.export_dir(model, "int8")],
        "change": [layout.change_dir(model)], "evaluation": [layout.report_dir(model) / "features"],
        "sql_catalog": [layout.sql_database()],
    }.get(kind, [])


def run_step(key: str, env: dict, log: Path, timeout: float) -> dict:
    """`dagster asset materialize` in a child process: wall seconds, peak RSS (MB), success."""
    dagster = Path(sys.executable).parent / "dagster"
    cmd = [str(dagster), "asset", "materialize", "-m", "majortom_assets.definitions", "--select", key]
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        fh.write(f"\n### {key}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    return {"step": key, "seconds": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "ok": code == 0, "timed_out": wall >= timeout}


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--root", type=Path, default=Path("/tmp/majortom_scale"))
    ap.add_argument("--model", help="model name (default: the registered model of --dim)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip", action="append", default=[], help="product key to leave out (repeatable)")
    ap.add_argument("--step-timeout", type=float, default=3600.0)
    ap.add_argument("--keep", action="store_true", help="keep the data (default: delete it at the end)")
    ap.add_argument("--expand-from", type=Path, help="a kept run's --root: derive this run's rows from its "
                    "rows with --dates acquisitions per cell (no footprint work); --vectors is then ignored")
    ap.add_argument("--dates", type=int, default=5, help="dates per cell with --expand-from")
    ap.add_argument("--interleave", action="store_true", help="add the held row right after each product's "
                    "full build (and take it out again), so every finished product has both numbers")
    ap.add_argument("--reuse", action="store_true", help="keep the row files of an earlier run at --root")
    ap.add_argument("--only", action="append", default=[], help="product key to run (repeatable; default all)")
    args = ap.parse_args(argv)
    model = args.model or MODEL_FOR_DIM.get(args.dim)
    if model is None:
        ap.error(f"no registered model has dimension {args.dim}; pass --model")
    root = args.root.resolve()
    out = root / "bench"
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"command": " ".join(sys.argv), "vectors_requested": args.vectors, "dim": args.dim,
                     "model": model, "cpus": os.cpu_count()}

    def save() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    sizes = row_sizes(args.vectors)
    if args.expand_from:
        from majortom_assets.grid import parse_row_name

        src = args.expand_from.resolve()
        names = [p.parent.name.removeprefix("row=") for p in
                 [*(src / "embeddings" / model).glob("row=*/embeddings.parquet"),
                  *(src / "held" / "embeddings" / model).glob("row=*/embeddings.parquet")]]
        prior = json.loads((src / "bench" / "summary.json").read_text())
        sizes = {int(parse_row_name(n)): 0 for n in names}
        held_name = (prior["rows"].get("held_back_row") or {}).get("row") or max(
            names, key=lambda n: (src / "held" / "embeddings" / model / f"row={n}").exists())
        held = int(parse_row_name(held_name))
        summary["expanded_rows"] = prior["rows"]
    else:
        held = max(sizes, key=lambda r: (sizes[r], r))
    counts = np.array(list(sizes.values()))
    summary["rows"] = {"populated": len(sizes), "samples_max": int(counts.max()), "samples_median": float(np.median(counts)),
                       "samples_min": int(counts.min()), "held_back_row": None}
    rest = {r: c for r, c in sizes.items() if r != held}
    if args.expand_from:
        from majortom_assets.grid import row_name

        gen = expand(args.expand_from.resolve(), root, model, [str(row_name(r)) for r in rest], args.dates, args.workers)
        labels = pd.read_parquet(args.expand_from.resolve() / "collections" / "Core-S2L2A" / "labels.parquet")
        labels = list(labels.itertuples(index=False, name=None))
    elif args.reuse and (root / "held").is_dir() and len(list((root / "embeddings" / model).glob("row=*"))) == len(rest):
        labels = list(pd.read_parquet(root / "collections" / "Core-S2L2A" / "labels.parquet").itertuples(
            index=False, name=None))
        gen = {"rows": len(rest), "vectors": sum(pq_rows(p) for p in (root / "embeddings" / model).glob(
            "row=*/embeddings.parquet")), "seconds": None, "reused": True}
    else:
        gen = generate(root, model, rest, args.dim, args.workers)
        labels = gen.pop("labels")
    summary["generate"] = gen
    save()
    print(json.dumps(summary, indent=1), flush=True)

    env = {**os.environ, "MAJORTOM_HOME": str(root), "DAGSTER_HOME": str(out / "dagster_home"),
           "MAJORTOM_MODELS": model, "MAJORTOM_EXECUTOR": "in_process", "MAJORTOM_ENV": "local",
           "MAJORTOM_COLLECTION_S2L2A": str(root / "collections" / "Core-S2L2A")}
    (out / "dagster_home").mkdir(exist_ok=True)
    steps = [k for k in (args.only or product_keys(model)) if k not in args.skip]
    log = out / "dagster.log"
    if gen.get("reused"):
        held_labels = []
    elif args.expand_from:
        from majortom_assets.grid import row_name

        name = str(row_name(held))
        _expand_row((str(next(args.expand_from.resolve().glob(f"**/row={name}/embeddings.parquet"))),
                     str(root / "held" / "embeddings" / model / f"row={name}" / "embeddings.parquet"), model, args.dates, 0))
        held_labels = []
    else:
        _, _, _, held_labels = _write_row((str(root / "held"), model, held, sizes[held], args.dim, 0))
    write_labels(root, labels + held_labels)
    from majortom_assets.grid import row_name

    name = str(row_name(held))
    held_dir = root / "held" / "embeddings" / model / f"row={name}"
    live_dir = root / "embeddings" / model / f"row={name}"
    import pyarrow.parquet as pq

    summary["rows"]["held_back_row"] = {"row": name, "samples": sizes[held] or None,
                                        "vectors": pq.read_metadata(held_dir / "embeddings.parquet").num_rows}
    summary["full"], summary["add_row"] = [], []

    def add_step(key: str) -> None:
        step = run_step(key, env, log, args.step_timeout)
        full = next(s for s in summary["full"] if s["step"] == key)
        step["ratio_to_full"] = round(step["seconds"] / full["seconds"], 4) if full["seconds"] else math.nan
        summary["add_row"].append(step)
        save()
        print(json.dumps(step), flush=True)

    for key in steps:
        for path in product_outputs(root, model, key):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        summary["full"].append(run_step(key, env, log, args.step_timeout))
        save()
        print(json.dumps(summary["full"][-1]), flush=True)
        if args.interleave:  # this product's add-row step now; the held row leaves again after it
            shutil.move(str(held_dir), str(live_dir))
            add_step(key)
            shutil.move(str(live_dir), str(held_dir))
    summary["disk_bytes_after_full"] = du(root)
    if not args.interleave:  # add the held-back row (the largest), then every product again
        shutil.move(str(held_dir), str(live_dir))
        for key in steps:
            add_step(key)
    summary["total_vectors"] = gen["vectors"] + summary["rows"]["held_back_row"]["vectors"]
    save()
    if not args.keep:
        for sub in ("embeddings", "exports", "indexes", "maps", "reports", "sql", "held", "collections"):
            shutil.rmtree(root / sub, ignore_errors=True)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
