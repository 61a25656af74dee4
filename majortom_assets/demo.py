"""The README's main job: a synthetic Core collection through the whole asset graph.

    python -m majortom_assets.demo            # or: make demo

On a fresh machine it writes synthetic Core-S2L1C, Core-S2L2A and Core-S1RTC collections (a few
grid rows, including cells next to +-180 degrees) under `$MAJORTOM_HOME` (default ./data),
and materialises core shards -> fragment grids ->
embeddings of the four models -> PCA maps -> vector assets (indexes, exports, evaluations, change
scores between the two dates of each S2L2A cell, a DuckDB SQL catalog), with every asset check,
into the Dagster instance at `$DAGSTER_HOME` (default ./.dagster_home). `make ui` then shows the
history.

Models run with RANDOM weights in their `tiny` configurations by default (no downloads; minutes
on two CPU cores). Files and materialisations say so (`random_weights`, `tiny_model`).
"""

import argparse
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from majortom_assets.standard import CORE_IMAGE_SIZE, SOURCES

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGSTER_YAML = REPO_ROOT / "dagster.yaml"
#: Rows the demo samples extra cells from (Africa/Indian Ocean, Europe, Scandinavia).
DEMO_ROWS = ("12D", "136U", "400U")
#: The evaluation's 5-fold grouped cross-validation needs 5 labelled cells of every class.
CELLS_PER_CLASS = 5
#: Acquisitions per cell. Two for S2L2A so the change assets of dinov2-rgb and siglip-rgb have
#: series (+13 s on 2 cores); a second S1RTC date cost another ~29 s (ssl4eo-s1), so it stays one.
DEMO_TIMESTAMPS = {"S2L1C": 1, "S2L2A": 2, "S1RTC": 1}


def prepare_dagster_home(dagster_home: Path) -> Path:
    """Create DAGSTER_HOME with the project's dagster.yaml (kept if the user already has one)."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    target = dagster_home / "dagster.yaml"
    if not target.exists():
        if not DAGSTER_YAML.exists():
            raise FileNotFoundError(
                f"{DAGSTER_YAML} is missing; run the demo from a checkout of the repository"
            )
        shutil.copyfile(DAGSTER_YAML, target)
    return dagster_home


def demo_cells(per_class: int = CELLS_PER_CLASS, seed: int = 0) -> list[str]:
    """The awkward default cells (+-180, Svalbard, Norway 32V, south) plus enough cells of a few
    rows that every land-cover class has `per_class` cells, so the evaluation asset can run."""
    from majortom_assets import synthetic

    cells = list(synthetic.default_cells())
    counts = [0] * len(synthetic.LAND_COVER_CLASSES)
    for cell in cells:
        counts[synthetic.cell_class(cell, seed)] += 1
    for cell in synthetic.cells_for_rows(DEMO_ROWS, cells_per_row=60):
        label = synthetic.cell_class(cell, seed)
        if cell not in cells and counts[label] < per_class:
            cells.append(cell)
            counts[label] += 1
    return cells


def create_collections(
    home: Path,
    cells: Sequence[str] | None = None,
    size: int = CORE_IMAGE_SIZE,
    timestamps: int | Mapping[str, int] | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """Synthetic collections at the paths the LOCAL resources expect; existing ones are reused.

    `timestamps` is one count for every collection or a count per source (default
    `DEMO_TIMESTAMPS`)."""
    from majortom_assets import synthetic

    cells = list(cells) if cells else demo_cells(seed=seed)
    per_source = DEMO_TIMESTAMPS if timestamps is None else timestamps
    out = {}
    for source in SOURCES:
        folder = home / "collections" / f"Core-{source}"
        count = per_source if isinstance(per_source, int) else per_source.get(source, 1)
        if not (folder / "metadata.parquet").exists():
            synthetic.generate_collection(
                folder, source, cells=cells, size=size, timestamps=count, seed=seed
            )
        out[source] = folder
    return out


def configure_external(home: Path, cells: Sequence[str], aef_cells: int = 2) -> dict[str, str]:
    """`--external`: small local stand-ins of a released set (DINOv2, in the reference embedder's
    shape) over the demo cells and AlphaEarth tiles for a few of them, configured through the
    environment variables defs/released.py and defs/alphaearth.py read. Existing ones are reused."""
    from majortom_assets import released_fixtures

    folder = home / "external" / "Core-S2RGB-DINOv2"
    if not folder.exists():
        rows = sorted({c.split("_")[0] for c in cells})
        released_fixtures.write_reference_set(folder, rows, 2, 768, files=2)
    index = home / "external" / "alphaearth" / "index.parquet"
    if not index.exists():
        released_fixtures.write_aef_tiles(index.parent, list(cells)[-aef_cells:], 2021)
    env = {"MAJORTOM_RELEASED_S2RGB_DINOV2": str(folder), "MAJORTOM_ALPHAEARTH_TILES": str(index),
           "MAJORTOM_ALPHAEARTH_YEAR": "2021"}
    os.environ.update(env)
    return env


def materialize_all(instance, definitions=None, raise_on_error: bool = True) -> list:
    """Run: the metadata selections, then the row-partitioned assets (one run per band of rows
    that hold samples, see `partitions.row_bands`; every grid row is a partition already, nothing
    is registered), then the global maps and vector assets. Returns the run results."""
    import dagster as dg

    from majortom_assets.defs import keys
    from majortom_assets.defs.partitions import row_bands, row_sample_counts
    from majortom_assets.defs.resources import build_resources, load_settings

    if definitions is None:
        from majortom_assets.definitions import defs as lazy_defs

        definitions = lazy_defs()
    settings = load_settings()
    resources = build_resources(settings)
    collections = resources["collections"]
    bands = row_bands(
        {
            row
            for s in keys.sources_for_models(settings.models)
            for row in row_sample_counts(collections.open(s).metadata())
        }
    )
    everything = [*definitions.assets, *(definitions.asset_checks or [])]

    graph = definitions.resolve_asset_graph()
    partitioned = [k for k in graph.get_all_asset_keys() if graph.get(k).partitions_def is not None]
    # external sources (released sets) are observed, not materialised
    unpartitioned = [k for k in graph.get_all_asset_keys()
                     if graph.get(k).partitions_def is None and graph.get(k).is_materializable]
    metadata_keys = [k for k in unpartitioned if k.path[0] == "core"]
    global_keys = [k for k in unpartitioned if k.path[0] != "core"]

    results = []
    for selection, tags in (
        (metadata_keys, {}),
        *(
            (
                partitioned,
                {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
            )
            for first, last in bands
        ),
        (global_keys, {}),
    ):
        if not selection:
            continue
        results.append(
            dg.materialize(
                everything,
                instance=instance,
                resources=resources,
                selection=selection,
                tags={**tags, "majortom/trigger": "demo"},
                raise_on_error=raise_on_error,
            )
        )
    return results


def summary(home: Path, dagster_home: Path, seconds: float) -> str:
    from majortom_assets.defs.resources import load_settings

    settings = load_settings()
    lines = [
        "",
        f"majortom demo finished in {seconds:.1f} s",
        f"  storage root (MAJORTOM_HOME): {home}",
        f"  Dagster instance (DAGSTER_HOME): {dagster_home}",
        f"  models: {', '.join(settings.models)}  (weights={settings.weights}, tiny={settings.tiny}"
        + (": RANDOM WEIGHTS, vectors carry no meaning)" if settings.weights == "random" else ")"),
    ]
    for label, pattern in (
        ("embeddings", "embeddings/*/row=*/embeddings.parquet"),
        ("PCA maps", "maps/*/pca.png"),
        ("indexes", "indexes/*"),
        ("exports", "exports/*/*"),
        ("reports", "reports/*/*.md"),
        ("change scores", "reports/*/change/cells/row=*/cells.parquet"),
        ("SQL catalog", "sql/*.duckdb"),
    ):
        found = sorted(home.glob(pattern))
        lines.append(f"  {label}: {len(found)} under {home / pattern.split('/')[0]}")
        lines += [f"    {p.relative_to(home)}" for p in found[:8]]
    if (home / "sql" / "majortom.duckdb").exists():
        lines.append(
            "  query it: python -c \"from majortom_assets.vectors.sql import open_database; "
            f"con = open_database('{home / 'sql' / 'majortom.duckdb'}'); print(con.sql('FROM majortom_models'))\""
        )
    lines += [
        "",
        "Open the Dagster UI on this history:",
        f"  make ui     (= DAGSTER_HOME={dagster_home} dagster dev -w workspace.yaml, http://127.0.0.1:3000)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m majortom_assets.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("MAJORTOM_HOME", "data")))
    parser.add_argument(
        "--dagster-home", type=Path, default=Path(os.environ.get("DAGSTER_HOME", ".dagster_home"))
    )
    parser.add_argument("--cells", nargs="+", help="grid cells (default: demo_cells())")
    parser.add_argument("--size", type=int, default=CORE_IMAGE_SIZE,
                        help=f"image side in 10 m pixels (Core: {CORE_IMAGE_SIZE})")
    parser.add_argument("--external", action="store_true",
                        help="also add a released set (local stand-in) and AlphaEarth tiles to the graph")
    args = parser.parse_args(argv)

    home, dagster_home = args.home.expanduser().resolve(), args.dagster_home.expanduser().resolve()
    # Set before the definitions load: resources read them, and `make ui` must see the same places.
    os.environ["MAJORTOM_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(prepare_dagster_home(dagster_home))
    os.environ.setdefault("MAJORTOM_ENV", "local")
    if args.size != CORE_IMAGE_SIZE:
        os.environ["MAJORTOM_IMAGE_SIZE"] = str(args.size)

    import dagster as dg

    started = time.perf_counter()
    print(f"writing synthetic Core collections under {home / 'collections'} ...", flush=True)
    create_collections(home, args.cells, size=args.size)
    if args.external:
        print("writing released-set and AlphaEarth stand-ins under "
              f"{home / 'external'} ...", flush=True)
        configure_external(home, args.cells or demo_cells())
    print(
        f"collections ready after {time.perf_counter() - started:.1f} s; materialising the asset graph ...",
        flush=True,
    )
    with dg.DagsterInstance.get() as instance:
        results = materialize_all(instance, raise_on_error=False)
    failed = [r for r in results if not r.success]
    print(summary(home, dagster_home, time.perf_counter() - started))
    if failed:
        print(f"\n{len(failed)} run(s) failed; open the UI (make ui) for the step logs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
