"""`majortom released`: the published Major TOM embedding sets as inputs.

    majortom released check PATH_OR_URL      which standard checks the set fails (its quirks)
    majortom released view PATH_OR_URL       write/refresh its normalised Table 2 view

Every product command takes ``--released PATH_OR_URL`` instead of ``--root`` (cli/common.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from majortom_assets.cli.common import handles_errors, positive_int, rows_list


@handles_errors
def run_check(args) -> int:
    from majortom_assets import released

    source = released.open_source(args.source, model=args.model)
    report = released.check_source(source, sample_rows=None if args.all_rows else args.sample_rows,
                                   max_files=None if args.all_rows else args.sample_files)
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.to_markdown(), end="")
    if args.strict and report.failed:
        return 1
    return 0


@handles_errors
def run_view(args) -> int:
    from majortom_assets import released

    source = released.open_source(args.source, model=args.model)
    view = released.ReleasedView(source, args.out or released.default_view_root(args.source))
    written = view.refresh(rows_list(args.rows))
    report = view.quirks()
    failed = ", ".join(c.name for c in report.failed) if report else "?"
    print(f"{source.dataset or source.url} ({source.model}): {len(written)} row partitions written, "
          f"view at {view.root}; fails: {failed or 'none'}")
    print(f"use it with --root {view.root} (or --released {args.source})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("released", help="released Major TOM embedding sets: quirks report, normalised view")
    sub = p.add_subparsers(dest="released_command", required=True, metavar="ACTION")

    c = sub.add_parser("check", help="report which standard checks a released set fails")
    c.add_argument("source", metavar="PATH_OR_URL", help="parquet file or folder, local or hf://datasets/Major-TOM/<set>")
    c.add_argument("--model", help="model name, needed when the path names none of the four published sets")
    c.add_argument("--sample-rows", type=positive_int, default=4096, help="rows inspected per file (default 4096)")
    c.add_argument("--sample-files", type=positive_int, default=8,
                   help="files whose rows are inspected, spread over the set (default 8; footers: all)")
    c.add_argument("--all-rows", action="store_true", help="inspect every row of every file")
    c.add_argument("--format", default="markdown", choices=["markdown", "json"])
    c.add_argument("--strict", action="store_true", help="exit with status 1 when any check fails")
    c.set_defaults(func=run_check, command="released check")

    v = sub.add_parser("view", help="write the set's normalised Table 2 partitions (a storage root)")
    v.add_argument("source", metavar="PATH_OR_URL")
    v.add_argument("--model", help="model name, needed when the path names none of the four published sets")
    v.add_argument("--rows", nargs="+", help="only these grid rows (default: all)")
    v.add_argument("--out", type=Path, help="view root (default: $MAJORTOM_HOME/released/<set>-<hash>)")
    v.set_defaults(func=run_view, command="released view")
