"""`majortom alphaearth`: AlphaEarth annual embeddings pooled onto Major TOM fragments (Table 2).

    majortom alphaearth --tiles INDEX --cells 136U_496R ... --year 2021 --out ROOT
    majortom alphaearth --tiles INDEX --collection DIR_OR_URL --year 2021 --out ROOT

Files go to ``ROOT/embeddings/alphaearth/row=<ROW>/embeddings.parquet`` beside the other models;
fragments with only no-data pixels are skipped and listed in ``ROOT/failures/alphaearth/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from majortom_assets.cli.common import cell_arg, handles_errors, positive_int, rows_list


def _cells(args) -> list[str]:
    cells = list(args.cells or [])
    if args.collection:
        from majortom_assets.core import CoreCollection, MetadataFilter

        meta = CoreCollection(args.collection).metadata(MetadataFilter(rows=rows_list(args.rows)))
        cells += sorted(set(meta["grid_cell"].astype(str)))
    if not cells:
        raise ValueError("no cells: give --cells or --collection")
    return list(dict.fromkeys(cell_arg(c) for c in cells))


@handles_errors
def run_alphaearth(args) -> int:
    from majortom_assets import alphaearth

    if args.year < 2017 or args.year > 2100:
        raise ValueError(f"--year {args.year}: AlphaEarth annual layers start in 2017")
    summary = alphaearth.write_rows(args.out, args.tiles, _cells(args), args.year, args.fragment_size)
    for row, s in summary.items():
        skipped = s["skipped"]
        print(f"row {row}: {s['fragments']} fragments from {s['cells']}/{s['cells_requested']} cells"
              f" -> {s['file'] or '(no file)'}; {len(skipped)} skipped")
        for f in skipped[: args.show_skipped]:
            where = f"{f.grid_cell} {list(f.pixel_bbox)}" if f.pixel_bbox else f.grid_cell
            print(f"  skipped {where}: {f.reason}")
    return 0 if any(s["fragments"] for s in summary.values()) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("alphaearth", help="pool AlphaEarth annual embeddings onto Major TOM fragments")
    p.add_argument("--tiles", required=True,
                   help="AEF tile index (GeoParquet/parquet/CSV with path, year, crs, footprint) or a folder of COGs")
    p.add_argument("--cells", nargs="+", help="grid cells, e.g. 136U_496R")
    p.add_argument("--collection", help="take the cells from this Core collection's metadata")
    p.add_argument("--rows", nargs="+", help="with --collection: only these grid rows")
    p.add_argument("--year", type=int, required=True, help="annual layer, e.g. 2021")
    p.add_argument("--fragment-size", type=positive_int, default=224, help="fragment side in px (default 224)")
    p.add_argument("--out", type=Path, required=True, help="storage root (files go to OUT/embeddings/alphaearth/)")
    p.add_argument("--show-skipped", type=int, default=5, help="skipped fragments listed per row (default 5)")
    p.set_defaults(func=run_alphaearth)
