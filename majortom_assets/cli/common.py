"""What every `majortom` subcommand shares: argument types, the storage-root option, error handling
and table/JSON printing. Bad values are rejected by argparse with the offending text; library
errors (unknown model, cell not in the index, ...) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import ValidationError

from majortom_assets.vectors import files

EXIT_USAGE = 2


def split_list(values: Sequence[str] | None) -> list[str] | None:
    """`--rows 136U 137U` and `--rows 136U,137U` both work."""
    if not values:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def describe(exc: Exception) -> str:
    """One line per problem, without pydantic's URLs."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or exc.title}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
    return str(exc)


def fail(message: str) -> int:
    print(f"majortom: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# ------------------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def row_arg(text: str) -> str:
    from majortom_assets.grid import parse_row_name, row_name

    try:
        return str(row_name(parse_row_name(text)))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad grid row {text!r}: {exc}") from None


def cell_arg(text: str) -> str:
    from majortom_assets.grid import cell_name, parse_cell_name

    try:
        return str(cell_name(*parse_cell_name(text)))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad grid cell {text!r}: {exc}") from None


def float_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def date_arg(text: str) -> pd.Timestamp:
    try:
        return pd.Timestamp(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected an ISO date such as 2021-06-30, got {text!r}") from None


def rows_list(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [row_arg(v.strip()) for value in values for v in value.split(",") if v.strip()]


# ---------------------------------------------------------------------------------- plumbing
def handles_errors(func):
    """Library errors become one readable line and exit status 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            resolve_released(args)
            return int(func(args) or 0)
        except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"majortom {args.command}: error: {msg}", file=sys.stderr)
            return EXIT_USAGE

    return wrapper


def add_root(p: argparse.ArgumentParser) -> None:
    """``--root DIR`` or, instead, ``--released PATH_OR_URL`` (a published set, normalised on read)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--root", type=Path, default=files.default_root(),
                       help="storage root holding embeddings/<model>/row=<ROW>/ (default: $MAJORTOM_HOME or ./data)")
    where.add_argument("--released", metavar="PATH_OR_URL",
                       help="a released Major TOM embedding set instead of a storage root: a parquet file or "
                            "folder, local or hf://datasets/Major-TOM/<set>; read through a normalised view "
                            "under $MAJORTOM_HOME/released/ (outputs go there too)")


def resolve_released(args: argparse.Namespace) -> None:
    """The one place ``--released`` becomes a storage root: the set's normalised view.

    Only the grid rows a command needs are normalised (``--rows``, or the row of ``--cell``); the
    set's quirks are summarised on stderr. Commands then run on ``args.root`` as on our own files.
    """
    url = getattr(args, "released", None)
    if not url:
        return
    from majortom_assets import released
    from majortom_assets.grid import parse_cell_name, row_name

    rows = rows_list(getattr(args, "rows", None))
    if rows is None and getattr(args, "cell", None) and getattr(args, "command", "") == "timeseries":
        rows = [str(row_name(parse_cell_name(args.cell)[0]))]
    view = released.open_view(url, model=getattr(args, "model", None), rows=rows)
    args.root = Path(view)
    if getattr(args, "model", None) is None and hasattr(args, "model"):
        args.model = view.source.model
    report = view.quirks()
    if report is not None and report.failed:
        names = ", ".join(c.name for c in report.failed)
        print(f"majortom: note: released set {report.dataset or report.source} fails {len(report.failed)} "
              f"standard checks ({names}); normalised on read, ids kept as published "
              f"(`majortom released check {url}` for details)", file=sys.stderr)


def add_root_model(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    add_root(p)
    if model_required:
        p.add_argument("--model", required=True, help="model name, e.g. dinov2-rgb")
    p.add_argument("--rows", nargs="+", help="restrict to these grid rows (e.g. 136U 12D or 136U,12D)")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")


def selected_paths(args) -> list[Path]:
    return files.model_paths(args.root, args.model, rows_list(args.rows))


def print_frame(frame: pd.DataFrame, fmt: str) -> None:
    if fmt == "json":
        out = frame.copy()
        if "geometry" in out:
            import shapely

            out["geometry"] = shapely.to_wkt(shapely.from_wkb(out["geometry"].to_numpy()), rounding_precision=6)
        for col in out.columns:
            if pd.api.types.is_datetime64_any_dtype(out[col]):
                out[col] = out[col].map(lambda t: t.isoformat())
        print(out.to_json(orient="records", indent=1, default_handler=str))
    else:
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 500):
            print(frame.to_string(index=False))


