"""`majortom timeseries --window A/B [--compare C/D]`: window aggregates and window-to-window change.

The options are added to the existing ``timeseries`` command (cli/vectors.py); without
``--window`` that command keeps its per-cell, date-to-date behaviour. Library:
`majortom_assets.vectors.windows`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from majortom_assets.cli.common import float_arg, print_frame, selected_paths


def window_arg(text: str):
    from majortom_assets.vectors.windows import TimeWindow

    try:
        return TimeWindow.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_window_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("time windows (instead of --cell: every cell of the selected rows)")
    g.add_argument("--window", type=window_arg, metavar="START/END",
                   help="aggregate over this window of days, e.g. 2021-06-01/2021-08-31 (both included)")
    g.add_argument("--compare", type=window_arg, metavar="START/END",
                   help="with --window: change score of each cell/fragment between the two windows")
    g.add_argument("--level", default="cell", choices=["cell", "fragment"],
                   help="unit of aggregation: a cell's acquisitions or each fragment's (default cell)")
    g.add_argument("--statistic", default="mean", choices=["mean", "median"], help="window centre")
    g.add_argument("--threshold", type=float_arg, default=None,
                   help="change_score above which `changed` is true (default 4; noise scores ~1)")
    g.add_argument("--top", type=int, default=20, help="rows printed (the --out file holds all)")
    g.add_argument("--out", type=Path, help="write the full result as Parquet")


def wants_windows(args) -> bool:
    if args.compare is not None and args.window is None:
        raise ValueError("--compare needs --window (the first window)")
    if args.window is None and args.cell is None:
        raise ValueError("give --cell (a cell's date-to-date change) or --window START/END (all cells)")
    if args.window is not None and args.cell is not None:
        raise ValueError("--cell and --window are exclusive; filter a window's result with --rows")
    return args.window is not None


def run_windows(args) -> int:
    from majortom_assets.vectors import windows

    paths = selected_paths(args)
    if args.compare is not None:
        threshold = args.threshold if args.threshold is not None else windows.DEFAULT_THRESHOLD
        frame = windows.compare_windows(paths, args.window, args.compare, level=args.level,
                                        statistic=args.statistic, threshold=threshold)
        summary = (f"{args.window.label} vs {args.compare.label}: {len(frame)} {args.level}s in both windows, "
                   f"{int(frame['changed'].sum()) if len(frame) else 0} changed (score > {threshold:g})")
        shown = frame.drop(columns=["window_a", "window_b"])
    else:
        frame = windows.window_stats(paths, args.window, level=args.level, statistic=args.statistic)
        summary = f"{args.window.label}: {len(frame)} {args.level}s with acquisitions ({args.statistic})"
        shown = frame.drop(columns=["window", "embedding"], errors="ignore")
    if args.out is not None:
        _write(frame, args.out)
        summary += f" -> {args.out}"
    if _random_weights(paths):
        from majortom_assets.geoparquet import RANDOM_WEIGHTS_WARNING

        summary = f"WARNING: {RANDOM_WEIGHTS_WARNING}\n{summary}"
    if args.format == "json":
        out = json.loads(shown.to_json(orient="records", date_format="iso"))
        print(json.dumps({"summary": summary, "rows": out}, indent=1))
    else:
        print(summary)
        print_frame(shown.head(args.top), "table")
    return 0


def _random_weights(paths) -> bool:
    from majortom_assets.geoparquet import read_info

    return any(read_info(p).random_weights for p in paths)


def _write(frame: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from majortom_assets.geoparquet import atomic_output

    table = pa.Table.from_pandas(frame, preserve_index=False)
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
