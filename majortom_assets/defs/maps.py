"""Global PCA map per model: one unpartitioned asset over every grid row's embeddings.

It depends on all row partitions of the model's embeddings and streams their files through
`vectors.pca` (the library fits incrementally and never loads all rows at once). The map PNG is
embedded in the materialisation (base64 data URI) so the UI shows it without file access.
"""

import dagster as dg

from majortom_assets.defs import keys, presentation
from majortom_assets.defs.resources import StorageResource, load_settings
from majortom_assets.deployment import io_step_tags
from majortom_assets.models.spec import MODEL_SPECS


def build_pca_map_asset(model: str) -> dg.AssetsDefinition:
    spec = MODEL_SPECS[model]

    @dg.asset(
        key=keys.pca_map_key(model),
        group_name="maps",
        kinds={"png", "geoparquet", "geotiff"},
        description=(
            f"World map of {model} embeddings: first three principal components of each cell's central "
            f"{spec.fragment_size} px fragment as RGB (PNG), with the values as GeoParquet and GeoTIFF."
        ),
        deps=[keys.embeddings_key(model)],
        op_tags=io_step_tags(),
    )
    def _pca_map(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from majortom_assets.vectors import pca  # heavy; only steps that map import it

        files = storage.layout.embedding_files(model)
        if not files:
            raise dg.Failure(
                f"no {model} embedding files under {storage.layout.embeddings_dir(model)}; "
                f"materialise {keys.embeddings_key(model).to_user_string()} first",
                allow_retries=False,
            )
        out_dir = storage.layout.map_dir(model)
        out_dir.mkdir(parents=True, exist_ok=True)
        fitted = pca.StreamingPCA(n_components=3).fit_files(files, central_only=True)
        png, values, tif = out_dir / "pca.png", out_dir / "pca.parquet", out_dir / "pca.tif"
        result = pca.pca_rgb_map(files, fitted, png, values, tif)
        fitted.save(out_dir / "pca_model.npz")
        return dg.MaterializeResult(
            metadata={
                "map": presentation.png_markdown(png, f"{model} PCA map"),
                "png": dg.MetadataValue.path(str(png)),
                "values (GeoParquet)": dg.MetadataValue.path(str(values)),
                "values (GeoTIFF)": dg.MetadataValue.path(str(tif)),
                "rows (files)": len(files),
                "cells": int(result["cells"]),
                "fragments fitted": int(result["n_samples"]),
                "explained variance ratio": dg.MetadataValue.json(
                    [round(v, 4) for v in result["explained_variance_ratio"]]
                ),
                **presentation.file_metadata(out_dir),
            }
        )

    return _pca_map


pca_map_assets = [build_pca_map_asset(model) for model in load_settings().models]
