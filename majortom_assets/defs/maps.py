"""Global PCA map per model: one unpartitioned asset over every grid row's embeddings.

It depends on all row partitions of the model's embeddings and streams their files through
`vectors.pca` (the library fits incrementally and never loads all rows at once). The UI cannot
show the 2048 px map whole (Dagster draws the image at natural size in a ~1200 px dialog), so the
materialisation embeds a 960 × 480 preview (base64 data URI, also saved as `pca_preview.png`),
with a zoomed inset when the cells are clustered, and links the full-resolution PNG by path. The
key numbers are separate plain entries so the UI lists and plots them.
"""

import dagster as dg

from majortom_assets.defs import keys, presentation
from majortom_assets.defs.resources import StorageResource, load_settings
from majortom_assets.defs.vectors import any_random_weights, embedding_files, embeddings_product
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
        from majortom_assets.vectors import pca  # heavy; only steps that map import it
        from majortom_assets.vectors.pca_map import write_preview

        files = embedding_files(storage, model)
        out_dir = storage.layout.map_dir(model)
        out_dir.mkdir(parents=True, exist_ok=True)
        central_only = True  # the paper's Figure 4: one fragment per cell, the central one
        fitted = pca.StreamingPCA(n_components=3).fit_files(files, central_only=central_only)
        png, values, tif = out_dir / "pca.png", out_dir / "pca.parquet", out_dir / "pca.tif"
        result = pca.pca_rgb_map(files, fitted, png, values, tif)
        preview_png = out_dir / "pca_preview.png"
        preview = write_preview(values, preview_png)
        fitted.save(out_dir / "pca_model.npz")
        ratio = [float(v) for v in result["explained_variance_ratio"]]
        random_weights = any_random_weights(files)
        caption = f"{preview.caption()}. Full resolution ({result['width']}×{result['height']}): `{png}`"
        metadata = {
            "map": presentation.png_markdown(preview_png, f"{model} PCA map", caption),
            "png": dg.MetadataValue.path(str(png)),
            "preview (PNG)": dg.MetadataValue.path(str(preview_png)),
            "values (GeoParquet)": dg.MetadataValue.path(str(values)),
            "values (GeoTIFF)": dg.MetadataValue.path(str(tif)),
            "rows (files)": len(files),
            "cells": int(result["cells"]),
            "fit on": "central fragments" if central_only else "all fragments",
            "fragments fitted": int(result["n_samples"]),
            "explained variance ratio": dg.MetadataValue.json([round(v, 4) for v in ratio]),
            **{f"explained variance ratio PC{i + 1}": round(v, 6) for i, v in enumerate(ratio)},
            "explained variance ratio (PC1-3)": round(sum(ratio), 6),
            "random weights": random_weights,
        }
        if random_weights:
            metadata["WARNING"] = dg.MetadataValue.text(RANDOM_WEIGHTS_WARNING)
        return dg.MaterializeResult(metadata={**metadata, **presentation.file_metadata(out_dir)})

    return _pca_map


pca_map_assets = [build_pca_map_asset(model) for model in load_settings().models]
