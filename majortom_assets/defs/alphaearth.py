"""AlphaEarth annual embeddings beside our models: ``embeddings/alphaearth`` by grid row (group ``external``).

Off unless ``MAJORTOM_ALPHAEARTH_TILES`` names an AEF tile index (or a folder of AEF COGs);
``MAJORTOM_ALPHAEARTH_YEAR`` picks the annual layer (default 2021). A row's cells are those whose
footprint meets a tile of the index, so a row outside AEF's coverage writes nothing and says so.
The files are Table 2 under model name ``alphaearth``; its similarity index and float16 export
come from the same factories as every model's.
"""


import os

import dagster as dg
import numpy as np

from majortom_assets import alphaearth, grid
from majortom_assets.defs import keys, presentation
from majortom_assets.defs.partitions import GRID_ROWS
from majortom_assets.defs.resources import StorageResource

TILES_ENV = "MAJORTOM_ALPHAEARTH_TILES"
YEAR_ENV = "MAJORTOM_ALPHAEARTH_YEAR"
GROUP = "external"


def year() -> int:
    text = os.environ.get(YEAR_ENV, "2021").strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{YEAR_ENV}={text!r} is not a year") from None


def cells_covered(row: str, tiles) -> list[str]:
    """Cells of grid row ``row`` whose lon/lat bounds meet any tile footprint (vectorised per tile)."""
    g = grid.get_grid()
    r = grid.parse_row_name(row)
    cols = g.cells_in_row(r)
    west, south, east, north = (np.asarray(a, float) for a in g.cell_bounds(np.full(len(cols), r), cols))
    hit = np.zeros(len(cols), bool)
    for t in tiles:
        tw, ts, te, tn = t.bounds
        if ts > north[0] or tn < south[0]:
            continue
        hit |= (west <= te) & (east >= tw)
    return [str(grid.cell_name(r, int(c))) for c in cols[hit]]


def build_alphaearth_asset(index: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=keys.embeddings_key(alphaearth.MODEL_NAME), group_name=GROUP, kinds={"geotiff", "geoparquet"},
        partitions_def=GRID_ROWS,
        description="AlphaEarth Foundations annual embeddings (64-d, int8-dequantised), pooled per Algorithm 1 "
                    "fragment (mean of valid pixels, renormalised): one Table 2 file per grid row.",
        metadata={"model": alphaearth.MODEL_NAME, "tile index": index, "year": year()},
    )
    def _alphaearth(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        tiles = alphaearth.read_tile_index(index)
        the_year = year()
        total = skipped = 0
        for row in context.partition_keys:
            cells = cells_covered(row, [t for t in tiles if t.year in (None, the_year)])
            if not cells:
                context.log.info(f"row {row}: no AEF tile of {the_year} covers it; nothing written")
                continue
            summary = alphaearth.write_rows(storage.layout.root, index, cells, the_year, tiles=tiles)
            for s in summary.values():
                total += s["fragments"]
                skipped += len(s["skipped"])
                if s["skipped"]:
                    context.log.warning(f"row {row}: {len(s['skipped'])} fragments/cells skipped, first: "
                                        f"{s['skipped'][0].grid_cell}: {s['skipped'][0].reason}")
        paths = [storage.layout.embeddings_file(alphaearth.MODEL_NAME, r) for r in context.partition_keys]
        written = [p for p in paths if p.exists()]
        return dg.MaterializeResult(metadata={
            "year": the_year, "tiles": len(tiles), "fragments": total, "skipped": skipped,
            "rows": ", ".join(context.partition_keys),
            **(presentation.file_metadata(written[0]) if written else {}),
        })

    return _alphaearth


_INDEX = os.environ.get(TILES_ENV, "").strip()
alphaearth_assets = []
if _INDEX:
    from majortom_assets.defs.vectors import build_export_asset, build_index_asset

    alphaearth_assets = [build_alphaearth_asset(_INDEX), build_index_asset(alphaearth.MODEL_NAME),
                         build_export_asset(alphaearth.MODEL_NAME, "float16")]
