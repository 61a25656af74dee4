"""`majortom` subcommands for vector work: index, search, export, pca-map, evaluate, timeseries, sql.

Every command works on a storage root (``--root``, default ``$MAJORTOM_HOME`` or ``./data``) laid
out as in docs/architecture.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from majortom_assets.cli.common import (
    add_root,
    add_root_model,
    cell_arg,
    date_arg,
    float_arg,
    handles_errors,
    positive_int,
    print_frame,
    rows_list,
    selected_paths,
)
from majortom_assets.layout import StorageLayout
from majortom_assets.standard import EXPORT_PRECISIONS
from majortom_assets.vectors import files


# ---------------------------------------------------------------------------------- commands
@handles_errors
def run_index(args) -> int:
    from majortom_assets.vectors import incremental
    from majortom_assets.vectors.search import IndexConfig, build_index

    out = args.out or StorageLayout.at(args.root).index_dir(args.model)
    kind = args.kind or ("incremental" if args.retrain or incremental.is_incremental(out) else "auto")
    if kind == "incremental":
        return _run_incremental_index(args, out)
    if args.retrain:
        raise ValueError(f"--retrain applies to the incremental index, not --kind {kind}")
    args.kind = kind
    cfg = IndexConfig(kind=args.kind, nlist=args.nlist, nprobe=args.nprobe or 16)
    manifest = build_index(selected_paths(args), out, config=cfg, model=args.model, progress=not args.no_progress)
    print(f"{manifest['kind']} index of {manifest['count']} vectors (dim {manifest['dim']}) -> {out} "
          f"(train {manifest['train_seconds']} s, add {manifest['add_seconds']} s)")
    return 0


def _run_incremental_index(args, out: Path) -> int:
    """Update (or build) the incremental index: only new/changed row files are read."""
    from majortom_assets.vectors import incremental
    from majortom_assets.vectors.search import META_COLUMNS

    updates = {k: v for k, v in (("nlist", args.nlist), ("nprobe", args.nprobe)) if v is not None}
    config = None
    if updates:
        base = incremental.IncrementalIndex(out).config if incremental.is_incremental(out) else None
        config = (base or incremental.IncrementalConfig()).model_copy(update=updates)
    report = incremental.update(selected_paths(args), out, config=config, model=args.model,
                                retrain="always" if args.retrain else "auto", meta_columns=META_COLUMNS,
                                progress=not args.no_progress)
    how = f"rebuilt ({'; '.join(report['reasons'])})" if report["retrained"] else "updated"
    print(f"incremental index of {report['count']} vectors (dim {report['dim']}, {report['factory']}) -> {out}: "
          f"{how}; rows read {len(report['rows_read'])}, unchanged {len(report['rows_kept'])}, "
          f"removed {len(report['rows_removed'])} ({report['seconds']} s)")
    for why in report["needs_retrain"]:
        print(f"  needs retraining: {why}", file=sys.stderr)
    return 0


@handles_errors
def run_search(args) -> int:
    from majortom_assets.vectors.search import SearchFilter, SearchIndex

    if args.model not in files.known_models(args.root) and args.index is None:
        files.model_paths(args.root, args.model)  # raises, listing the known models
    index_dir = args.index or StorageLayout.at(args.root).index_dir(args.model)
    if not index_dir.exists():
        raise FileNotFoundError(f"no index at {index_dir}; build it with "
                                f"`majortom index --root {args.root} --model {args.model}`")
    with SearchIndex.load(index_dir) as index:   # freed in order, not by exit-time GC
        flt = SearchFilter(bbox=tuple(args.bbox) if args.bbox else None, start=args.start, end=args.end,
                           rows=rows_list(args.rows))
        vector = qv = None
        if args.vector_file is not None:
            vector = _load_vector(args.vector_file)
        from majortom_assets.cli import query as query_cli

        if query_cli.wants_query_model(args):
            vector, qv = query_cli.query_vectors(args, index)
        result = index.query(vector, cell=args.cell, unique_id=args.unique_id,
                             latlon=tuple(args.latlon) if args.latlon else None, k=args.k, filters=flt,
                             cell_mode=args.cell_mode, exclude_query=args.exclude_query, nprobe=args.nprobe,
                             rerank=args.rerank)
        cols = ["rank", "similarity", "distance", "grid_cell", "timestamp", "centre_lat", "centre_lon",
                "unique_id"] + (["geometry", "pixel_bbox", "product_id"] if args.format == "json" else [])
        if qv is not None and len(qv.labels) > 1:     # one query per image fragment
            result["query_fragment"] = [qv.labels[q] for q in result["query"]]
            cols = ["query_fragment", *cols]
        print_frame(result[cols], args.format)
    return 0


def _load_vector(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"vector file {path} does not exist")
    if path.suffix == ".npy":
        vec = np.load(path, allow_pickle=False)
    else:
        try:
            vec = np.loadtxt(path, dtype=np.float32, delimiter=None if path.suffix != ".csv" else ",")
        except ValueError as exc:
            raise ValueError(f"vector file {path}: {exc}") from None
    vec = np.asarray(vec, dtype=np.float32).reshape(-1) if np.ndim(vec) <= 1 or 1 in np.shape(vec) else vec
    if vec.ndim != 1:
        raise ValueError(f"vector file {path} must hold one vector, got shape {vec.shape}")
    return vec


@handles_errors
def run_export(args) -> int:
    from majortom_assets.vectors.quantize import export, verify_export

    out = args.out or StorageLayout.at(args.root).export_dir(args.model, args.precision)
    manifest = export(selected_paths(args), out, args.precision, model=args.model, progress=not args.no_progress)
    print(f"{manifest['count']} × {manifest['dim']} {manifest['precision']} -> {out} "
          f"({manifest['bytes'] / 1e6:.1f} MB)")
    if args.verify:
        check = verify_export(out)
        print(f"verify: {'ok' if check.ok else 'FAILED'}; rows {check.rows}, max |error| {check.max_abs_error:.3g}")
        for problem in check.problems:
            print(f"  {problem}", file=sys.stderr)
        return 0 if check.ok else 1
    return 0


@handles_errors
def run_pca_map(args) -> int:
    from majortom_assets.vectors.pca import StreamingPCA, pca_rgb_map

    paths = selected_paths(args)
    out = args.out or StorageLayout.at(args.root).map_dir(args.model)
    pca = StreamingPCA(3).fit_files(paths, central_only=args.fit == "central", progress=not args.no_progress)
    pca.save(out / "pca_model.npz")
    meta = pca_rgb_map(paths, pca, out / "pca.png", out / "pca.parquet", out / "pca.tif" if args.tif else None,
                       width=args.width, height=args.height, marker_px=args.marker,
                       progress=not args.no_progress)
    ratio = ", ".join(f"{v:.3f}" for v in meta["explained_variance_ratio"])
    print(f"{meta['cells']} cells -> {meta['png']} (explained variance ratio {ratio})")
    return 0


@handles_errors
def run_evaluate(args) -> int:
    from majortom_assets.vectors.evaluate import EvalConfig, evaluate

    labels = _read_labels(args.labels)
    models = args.models or files.known_models(args.root)
    if not models:
        raise ValueError(f"no models with embeddings under {args.root / 'embeddings'}")
    rows = rows_list(args.rows)
    paths = {m: files.model_paths(args.root, m, rows) for m in models}
    cfg = EvalConfig(folds=args.folds, k=args.k, label_column=args.label_column, fragments=args.fragments)
    report = evaluate(paths, labels, config=cfg)
    # the same folder the Dagster evaluation asset writes: reports/<model>/, or reports/comparison/
    written = report.write(args.out or StorageLayout.at(args.root).evaluation_dir(list(models)))
    print(report.to_markdown())
    print(f"written: {written['markdown']}, {written['json']}")
    return 0


def _read_labels(path: Path) -> pd.DataFrame:
    if path.is_dir():   # a Core collection folder: its labels.parquet
        from majortom_assets.core import CoreCollection

        return CoreCollection(str(path)).labels()
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    raise ValueError(f"labels file {path}: expected .parquet or .csv")


@handles_errors
def run_timeseries(args) -> int:
    from majortom_assets.cli import windows as window_cli
    from majortom_assets.vectors.timeseries import change_scores, series_for

    if window_cli.wants_windows(args):
        return window_cli.run_windows(args)
    series = series_for(selected_paths(args), args.cell, args.pixel_bbox)
    per_fragment, per_cell = change_scores(series)
    if args.format == "json":
        print(json.dumps({
            "grid_cell": args.cell,
            "series": [{"pixel_bbox": list(s.pixel_bbox), "dates": [str(t) for t in s.timestamps]} for s in series],
            "per_cell": json.loads(per_cell.to_json(orient="records", date_format="iso")),
            "per_fragment": json.loads(per_fragment.to_json(orient="records", date_format="iso")),
        }, indent=1))
    else:
        print(f"{args.cell}: {len(series)} fragment series, {max((len(s) for s in series), default=0)} dates")
        print_frame(per_cell if not args.per_fragment else per_fragment, "table")
    return 0


@handles_errors
def run_sql(args) -> int:
    from majortom_assets.vectors.sql import MODELS_VIEW, connect, lock_down, read_only_query

    con = connect(args.root)
    try:
        lock_down(con, args.root)
        frame = read_only_query(con, args.query or f"SELECT * FROM {MODELS_VIEW} ORDER BY model")
        if not args.query:
            print(frame.to_string(index=False))
        elif args.format == "csv":
            frame.to_csv(sys.stdout, index=False)
        else:
            print_frame(frame, args.format)
    finally:
        con.close()
    return 0


# ---------------------------------------------------------------------------------- register
def _add_query_arguments(q, p: argparse.ArgumentParser) -> None:
    from majortom_assets.cli.query import add_query_arguments

    add_query_arguments(q, p)


def _add_window_arguments(p: argparse.ArgumentParser) -> None:
    from majortom_assets.cli.windows import add_window_arguments

    add_window_arguments(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="build a similarity-search index of one model's embeddings")
    add_root_model(p)
    p.add_argument("--out", type=Path, help="index directory (default: ROOT/indexes/MODEL)")
    p.add_argument("--kind", default=None,
                   choices=["auto", "flat", "ivffp16", "ivfsq8", "ivfpq", "hnsw", "incremental"],
                   help="auto = exact flat up to 100k vectors, else IVF + float16 codes (ivffp16); incremental = "
                        "IVF-PQ + exact re-ranking, updated per changed row (default when OUT already holds one)")
    p.add_argument("--nlist", type=positive_int, help="IVF lists (default ~sqrt(N); incremental ~4·sqrt(N))")
    p.add_argument("--nprobe", type=positive_int, help="default lists probed per query (16; incremental 32)")
    p.add_argument("--retrain", action="store_true",
                   help="incremental: retrain the codebooks on a fresh sample and re-add every row")
    p.set_defaults(func=run_index)

    p = subparsers.add_parser("search", help="find the fragments most similar to a cell, fragment, place or vector")
    add_root_model(p)
    p.add_argument("--index", type=Path, help="index directory (default: ROOT/indexes/MODEL)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--cell", type=cell_arg, help="grid cell, e.g. 136U_496R")
    q.add_argument("--unique-id", help="fragment unique_id")
    q.add_argument("--latlon", nargs=2, type=float_arg, metavar=("LAT", "LON"), help="a place; mapped to its cell")
    q.add_argument("--vector-file", type=Path, help=".npy, .csv or whitespace-separated text with one vector")
    _add_query_arguments(q, p)
    p.add_argument("-k", type=positive_int, default=10, help="results to return (default 10)")
    p.add_argument("--bbox", nargs=4, type=float_arg, metavar=("W", "S", "E", "N"),
                   help="only fragments whose centre lies in this lon/lat box (W > E crosses 180°)")
    p.add_argument("--start", type=date_arg, help="only fragments acquired on/after this date")
    p.add_argument("--end", type=date_arg, help="only fragments acquired on/before this date")
    p.add_argument("--cell-mode", default="central", choices=["central", "mean"],
                   help="cell/latlon query vector: central fragment or mean of all fragments")
    p.add_argument("--exclude-query", action="store_true", help="leave out the query's own fragment/cell")
    p.add_argument("--nprobe", type=positive_int, help="IVF lists to probe (default from the index)")
    p.add_argument("--rerank", type=positive_int,
                   help="compressed-code candidates re-ranked with exact vectors (default from the index)")
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.set_defaults(func=run_search)

    p = subparsers.add_parser("export", help="write a flat, memory-mappable (optionally quantised) copy")
    add_root_model(p)
    p.add_argument("--precision", default="float16", choices=EXPORT_PRECISIONS)
    p.add_argument("--out", type=Path, help="export directory (default: ROOT/exports/MODEL/PRECISION)")
    p.add_argument("--verify", action="store_true", help="re-read the GeoParquet and check the round trip")
    p.set_defaults(func=run_export)

    p = subparsers.add_parser("pca-map", help="global 3-component PCA of central fragments as an RGB world map")
    add_root_model(p)
    p.add_argument("--out", type=Path, help="output directory (default: ROOT/maps/MODEL)")
    p.add_argument("--fit", default="central", choices=["central", "all"], help="fragments the PCA is fitted on")
    p.add_argument("--tif", action="store_true", help="also write an EPSG:4326 GeoTIFF")
    p.add_argument("--width", type=positive_int, default=2048)
    p.add_argument("--height", type=positive_int, default=1024)
    p.add_argument("--marker", type=positive_int, default=3, help="marker side in pixels")
    p.set_defaults(func=run_pca_map)

    p = subparsers.add_parser("evaluate", help="k-NN and linear-probe accuracy of each model on cell labels")
    add_root_model(p, model_required=False)
    p.add_argument("--models", nargs="+", help="models to compare (default: all under ROOT)")
    p.add_argument("--labels", type=Path, required=True,
                   help="parquet/csv with grid_cell (or lat, lon) and a label column, or a Core collection "
                        "folder holding labels.parquet")
    p.add_argument("--label-column", default="class_id")
    p.add_argument("--folds", type=positive_int, default=5)
    p.add_argument("-k", type=positive_int, default=5, help="k-NN neighbours (default 5)")
    p.add_argument("--fragments", default="all", choices=["all", "central"])
    p.add_argument("--out", type=Path,
                   help="report directory (default: ROOT/reports/MODEL for one model, ROOT/reports/comparison "
                        "for several)")
    p.set_defaults(func=run_evaluate)

    p = subparsers.add_parser("timeseries", help="embedding time series and change scores of one cell, or "
                              "of every cell between two time windows (--window, --compare)")
    add_root_model(p)
    p.add_argument("--cell", type=cell_arg, help="one cell's date-to-date change (or use --window)")
    p.add_argument("--pixel-bbox", nargs=4, type=int, metavar=("R0", "C0", "R1", "C1"),
                   help="one fragment (default: all fragments of the cell)")
    p.add_argument("--per-fragment", action="store_true", help="table: per-fragment scores instead of cell means")
    p.add_argument("--format", default="table", choices=["table", "json"])
    _add_window_arguments(p)
    p.set_defaults(func=run_timeseries)

    p = subparsers.add_parser("sql", help="run read-only DuckDB SQL over the embeddings (one view per model)")
    add_root(p)
    p.add_argument("query", nargs="?", help="SQL to run; without it, list the model views")
    p.add_argument("--format", default="table", choices=["table", "json", "csv"])
    p.set_defaults(func=run_sql)
