"""The `majortom` command line: one module per group of subcommands, each with `register(subparsers)`.

    embed       majortom_assets.cli.embed     Core collection -> Table 2 GeoParquet files
    index ...   majortom_assets.cli.vectors   index, search, export, pca-map, evaluate, timeseries, sql
    released    majortom_assets.cli.released  quirks report and normalised view of a published set
    alphaearth  majortom_assets.cli.alphaearth AlphaEarth annual embeddings -> Table 2 files
    extract     majortom_assets.cli.extract   embeddings at points / over areas -> GeoParquet

Shared argument types and error handling live in `majortom_assets.cli.common`. The command line
knows nothing of Dagster: it calls the same library functions the assets call.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from majortom_assets.cli import alphaearth, embed, extract, released, vectors

COMMAND_MODULES = (embed, vectors, extract, released, alphaearth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="majortom", description="Major TOM embedding expansions.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
