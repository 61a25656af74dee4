"""`majortom extract`: the embeddings at points or over areas, as GeoParquet, reading only what is needed.

    majortom extract --root DIR --model NAME --points FIELDS.csv --out RESULT.parquet [--start --end]
    majortom extract --root DIR --model NAME --geometry AREAS.geojson --out RESULT.parquet
    majortom extract --files hf://datasets/.../part_00001.parquet --points P.geojson --out R.parquet

Library: `majortom_assets.vectors.extract` (what is read and why); bytes are counted through
`majortom_assets.vectors.iocount` and reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from majortom_assets.cli.common import add_root_model, date_arg, handles_errors, selected_paths


def _sources(args) -> list:
    if args.files:
        return list(args.files)
    if not args.model and not getattr(args, "released", None):
        raise ValueError("give --model (with --root) or --files")
    return selected_paths(args)


@handles_errors
def run_extract(args) -> int:
    from majortom_assets.geoparquet import RANDOM_WEIGHTS_WARNING
    from majortom_assets.vectors import extract

    places = extract.read_points(args.points) if args.points is not None else extract.read_areas(args.geometry)
    end = args.end
    if end is not None and end == end.normalize():   # a bare day means the whole day
        import pandas as pd

        end = end + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
    result = extract.extract(_sources(args), places, start=args.start, end=end)
    extract.write_result(result, args.out)
    c = result.counter
    summary = {
        "places": len(places), "places_matched": result.places_matched, "rows": result.table.num_rows,
        "files": len(result.plans), "files_skipped": sum(p.skipped for p in result.plans),
        "row_groups": sum(p.row_groups for p in result.plans),
        "row_groups_read": sum(p.candidate_groups for p in result.plans),
        "row_groups_with_embeddings_read": sum(p.embedding_groups for p in result.plans),
        "bytes_read": c.bytes_read, "bytes_of_opened_files": c.bytes_total, "out": str(args.out),
        "random_weights": result.random_weights,
    }
    if args.format == "json":
        print(json.dumps(summary, indent=1))
        return 0
    if result.random_weights:
        print(f"WARNING: {RANDOM_WEIGHTS_WARNING}")
    what = "points" if places.kind == "points" else "areas"
    print(f"{summary['places_matched']} of {len(places)} {what} matched {summary['rows']} fragment rows "
          f"-> {args.out}")
    print(f"read {c.bytes_read / 1e6:.2f} MB of {c.bytes_total / 1e6:.2f} MB opened "
          f"({100 * c.fraction:.2f} %); row groups: {summary['row_groups_read']} of {summary['row_groups']} "
          f"(embeddings of {summary['row_groups_with_embeddings_read']}); files: {len(result.plans)} "
          f"({summary['files_skipped']} skipped unopened)")
    unmatched = len(places) - result.places_matched
    if unmatched:
        print(f"{unmatched} {what} fall in no fragment of these files (outside the archive or the time range)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("extract", help="embeddings at points (CSV/GeoJSON/GeoParquet) or over areas, "
                              "as GeoParquet; reads only the row groups needed")
    add_root_model(p, model_required=False)
    p.add_argument("--model", help="model name, e.g. dinov2-rgb (with --root)")
    p.add_argument("--files", nargs="+", metavar="PATH_OR_URL",
                   help="embedding files instead of ROOT/embeddings/MODEL: local paths or fsspec URLs "
                        "(hf://, http(s)://, s3://)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--points", type=Path, help="CSV with lat/lon columns, GeoJSON or GeoParquet of points")
    q.add_argument("--geometry", type=Path, help="GeoJSON / GeoParquet of areas: every fragment intersecting them")
    p.add_argument("--start", type=date_arg, help="only acquisitions on/after this date")
    p.add_argument("--end", type=date_arg, help="only acquisitions on/before this date (a day: the whole day)")
    p.add_argument("--out", type=Path, required=True, help="result GeoParquet file")
    p.add_argument("--format", default="table", choices=["table", "json"], help="summary format")
    p.set_defaults(func=run_extract)
