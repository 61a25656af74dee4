"""`majortom embed`: a Core collection into Table 2 GeoParquet files, one per grid row.

    majortom embed --collection data/collections/Core-S2L1C --model ssl4eo-s2 --weights pretrained \\
        --out data/embeddings --rows 136U 137U

writes OUT/<model>/row=<ROW>/embeddings.parquet (atomically). `--tiny` swaps in a small random model
of the same architecture (tests and demos; its embedding dimension is smaller, see
majortom_assets.models).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from majortom_assets.cli.common import describe, fail, split_list
from majortom_assets.remote import redact_text

MAX_LISTED_FAILURES = 20


def engine_flag(field: str) -> str:
    """The command-line flag of an `EngineConfig` field: batch_size -> --batch-size."""
    return "--" + field.replace("_", "-")


def add_engine_flags(p: argparse.ArgumentParser) -> tuple[str, ...]:
    """One flag per `engine.EngineConfig` field, with its type, choices, default and description.

    The flags are generated, not declared, so the engine config stays the one place that says what
    can be set and what is valid: a new field becomes a flag by itself. Defaults are left to
    `EngineConfig` (a flag not given is not passed), and its validation produces the error
    (`engine_config_from_args`). Returns the names of the fields that got a flag.
    """
    from majortom_assets.compute import EngineConfig

    group = p.add_argument_group("inference", "how the model runs (engine.EngineConfig)")
    for name, info in EngineConfig.model_fields.items():
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": f"{info.description or name} (default: {info.default})"}
        annotation = info.annotation
        if get_origin(annotation) is Literal:
            kwargs["choices"] = [str(v) for v in get_args(annotation)]
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif annotation in (int, float):
            kwargs["type"] = annotation
        group.add_argument(engine_flag(name), **kwargs)
    return tuple(EngineConfig.model_fields)


def engine_config_from_args(args: argparse.Namespace):
    """The `EngineConfig` of the flags given; ValueError in one line naming each bad flag."""
    from majortom_assets.compute import EngineConfig

    given = {name: getattr(args, name) for name in EngineConfig.model_fields if hasattr(args, name)}
    return EngineConfig.from_values(given, label=engine_flag)


def register(subparsers: argparse._SubParsersAction) -> None:
    from majortom_assets.models import MODEL_SPECS

    p = subparsers.add_parser(
        "embed", help="embed a Core collection into Major TOM embedding GeoParquet files",
        description="Embed the samples of a Core collection, one GeoParquet file per grid row.",
    )
    p.add_argument("--collection", required=True, help="Core collection: local folder, fsspec URL or hf://datasets/...")
    p.add_argument("--model", required=True, choices=sorted(MODEL_SPECS))
    p.add_argument("--weights", default="pretrained",
                   help="'pretrained' (torchgeo / HF cache), 'random' (seeded, flagged in the file) or a "
                        "weights file / HF model folder (default: pretrained)")
    p.add_argument("--out", required=True, type=Path, help="output root; files go to OUT/<model>/row=<ROW>/")
    p.add_argument("--rows", nargs="+", help="grid rows to embed, e.g. 136U 12D (default: all)")
    p.add_argument("--limit", type=int, help="embed at most N samples")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (default: 0)")
    p.add_argument("--tiny", action="store_true",
                   help="use a tiny random model of the same architecture (tests/demos; smaller embedding dim)")
    p.add_argument("--reference-compatible", action="store_true",
                   help="reproduce the public reference's DINOv2 preprocessing (comparison only)")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    add_engine_flags(p)
    p.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from majortom_assets import grid
    from majortom_assets.core import CoreCollection, MetadataFilter
    from majortom_assets.engine import EmbedStats, embed_to_file
    from majortom_assets.file_check import check_file, failed
    from majortom_assets.models import WeightsUnavailableError, load_embedder

    try:
        config = engine_config_from_args(args)
        device = config.resolve_device()
        config.resolve_precision(device)
        flt = MetadataFilter(rows=split_list(args.rows), limit=args.limit)
    except (ValidationError, ValueError) as exc:
        return fail(describe(exc))
    try:
        collection = CoreCollection(str(args.collection))
        selection = collection.select(flt)
    except (FileNotFoundError, ValueError, TimeoutError) as exc:
        return fail(redact_text(exc))
    metadata = selection.frame
    _print_dropped(selection)
    if metadata.empty:
        print("no samples match the selection; nothing to embed", file=sys.stderr)
        return 1
    problem = _unwritable(args.out, args.model)
    if problem:
        return fail(problem)
    try:
        embedder = load_embedder(args.model, args.weights, tiny=args.tiny, seed=args.seed,
                                 reference_compatible=args.reference_compatible)
    except (WeightsUnavailableError, ValueError, TypeError, FileNotFoundError) as exc:
        return fail(str(exc))
    if embedder.weights.random:
        print(f"WARNING: {args.model} uses RANDOM weights ({embedder.weights.name}); the embeddings carry no "
              "meaning and the files are flagged random_weights=true", file=sys.stderr)

    total = EmbedStats(device=str(device))
    started = time.perf_counter()
    rows = sorted(metadata["grid_row_u"].unique())
    kept: list[str] = []
    bad_checks: list[str] = []
    with tqdm(total=len(metadata), unit="cell", disable=args.no_progress, file=sys.stderr) as bar:
        def on_result(item) -> None:
            bar.update(1)

        for row in rows:
            name = grid.row_name(int(row))
            out = args.out / args.model / f"row={name}" / "embeddings.parquet"
            bar.set_postfix_str(f"row {name}")
            try:
                stats = embed_to_file(collection, metadata[metadata["grid_row_u"] == row], embedder, config, out,
                                      collection.url, on_result=on_result)
            except OSError as exc:   # disk full, folder removed or made read-only mid-run
                return fail(f"cannot write {out}: {exc.strerror or exc}; rows written before it are complete")
            total.samples += stats.samples
            total.fragments += stats.fragments
            total.failures.extend(stats.failures)
            total.batch_size, total.precision = stats.batch_size, stats.precision
            if stats.kept_existing:
                kept.append(f"row {name}: every one of its {len(stats.failures)} sample(s) failed; the existing "
                            f"{out} was left untouched")
            else:
                # the same per-file checks as the Dagster asset checks (file_check.check_file)
                bad_checks.extend(f"row {name}: {r.line()}" for r in failed(check_file(out)))
    total.finish(started)
    _print_summary(total, len(rows), args.out / args.model)
    for line in kept:
        print(line)
    for line in bad_checks:
        print(f"file check failed: {line}", file=sys.stderr)
    if bad_checks:
        return 1
    return 0 if total.samples or not total.failures else 1


def _unwritable(out: Path, model: str) -> str | None:
    """Why OUT/<model> cannot take row files, in one line; None when it can (checked before any work)."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder; give a folder for the row files"
    target = out / model
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"--out {out} is not writable ({exc.strerror or exc}); choose a folder you can write to"
    return None


def _print_dropped(selection) -> None:
    """Metadata rows left out before any work (bad values, duplicates), per row, with reasons."""
    if selection.dropped.empty:
        return
    print(selection.summary())
    failures = selection.failures()
    for failure in failures[:MAX_LISTED_FAILURES]:
        print(f"  {failure.grid_cell or '(no cell)'} {failure.product_id or '(no product)'}: {failure.reason}")
    if len(failures) > MAX_LISTED_FAILURES:
        print(f"  ... and {len(failures) - MAX_LISTED_FAILURES} more")


def _print_summary(stats, n_rows: int, out_dir: Path) -> None:
    print(f"embedded {stats.samples} cells ({stats.fragments} fragments) into {n_rows} row file(s) under "
          f"{out_dir} in {stats.seconds:.1f} s: {stats.cells_per_s:.2f} cells/s on {stats.device} "
          f"({stats.precision}, batch {stats.batch_size})")
    if stats.failures:
        print(f"skipped {len(stats.failures)} sample(s):")
        for failure in stats.failures[:MAX_LISTED_FAILURES]:
            print(f"  {failure.grid_cell} {failure.product_id}: {failure.reason}")
        if len(stats.failures) > MAX_LISTED_FAILURES:
            print(f"  ... and {len(stats.failures) - MAX_LISTED_FAILURES} more")
