"""Global PCA map per model: one unpartitioned asset over every grid row's embeddings.

It depends on all row partitions of the model's embeddings and keeps the map up to date row by
row (`vectors.pca_update`): a materialisation reads only rows whose embedding file is new or was
rewritten since the last one, so adding a row costs O(row) while the PCA basis has not drifted.
Besides the PNG it writes a 0.05°/pixel Cloud-Optimised GeoTIFF with overviews for GDAL/QGIS. The UI cannot
show the 2048 px map whole (Dagster draws the image at natural size in a ~1200 px dialog), so the
materialisation embeds a 960 × 480 preview (base64 data URI, also saved as `pca_preview.png`),
with a zoomed inset when the cells are clustered, and links the full-resolution PNG by path. The
key numbers are separate plain entries so the UI lists and plots them.
"""

from pathlib import Path

import dagster as dg

from majortom_assets.defs import keys, presentation
from majortom_assets.defs.resources import StorageResource, load_settings
from majortom_assets.defs.vectors import embedding_files, embeddings_product
from majortom_assets.models.spec import MODEL_SPECS


def build_pca_map_asset(model: str) -> dg.AssetsDefinition:
    spec = MODEL_SPECS[model]

    @embeddings_product(
        model, keys.pca_map_key(model), group="maps", kinds={"png", "geoparquet", "geotiff"},
        description=(
            f"World map of {model} embeddings: first three principal components of each cell's central "
            f"{spec.fragment_size} px fragment as RGB (PNG), with the values as GeoParquet and GeoTIFF."
        ),
    )
    def _pca_map(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from majortom_assets.geoparquet import RANDOM_WEIGHTS_WARNING
        from majortom_assets.vectors import pca_update  # heavy; only steps that map import it

        files = embedding_files(storage, model)
        out_dir = storage.layout.map_dir(model)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Incremental: only rows whose embedding file is new or rewritten are read (pca_update).
        result = pca_update.update_pca_map(files, out_dir)
        png, values, tif = Path(result["png"]), Path(result["parquet"]), Path(result["tif"])
        preview_png = out_dir / "pca_preview.png"
        ratio = [float(v) for v in result["explained_variance_ratio"]]
        random_weights = bool(result["random weights"])
        caption = f"{result['preview caption']}. Full resolution ({result['width']}×{result['height']}): `{png}`"
        width, height = result["tif size"]
        metadata = {
            "map": presentation.png_markdown(preview_png, f"{model} PCA map", caption),
            "png": dg.MetadataValue.path(str(png)),
            "preview (PNG)": dg.MetadataValue.path(str(preview_png)),
            "values (GeoParquet)": dg.MetadataValue.path(str(values)),
            "values (GeoTIFF)": dg.MetadataValue.path(str(tif)),
            "GeoTIFF": f"Cloud-Optimised, {width}×{height} px at {result['deg per pixel']}°/px, EPSG:4326, overviews",
            "rows (files)": len(files),
            "rows read": int(result["rows read"]),
            "rows projected": int(result["rows projected"]),
            "rows unchanged": int(result["rows unchanged"]),
            "basis refit": bool(result["basis refit"]),
            "refit reason": result["refit reason"],
            "basis digest": result["basis digest"],
            "cells": int(result["cells"]),
            "fit on": "central fragments",
            "fragments fitted": int(result["n_samples"]),
            "explained variance ratio": dg.MetadataValue.json([round(v, 4) for v in ratio]),
            **{f"explained variance ratio PC{i + 1}": round(v, 6) for i, v in enumerate(ratio)},
            "explained variance ratio (PC1-3)": round(sum(ratio), 6),
            "random weights": random_weights,
        }
        if result["basis drift (deg)"] is not None:
            metadata["basis drift (deg)"] = float(result["basis drift (deg)"])
        if random_weights:
            metadata["WARNING"] = dg.MetadataValue.text(RANDOM_WEIGHTS_WARNING)
        return dg.MaterializeResult(metadata={**metadata, **presentation.file_metadata(out_dir)})

    return _pca_map


pca_map_assets = [build_pca_map_asset(model) for model in load_settings().models]
