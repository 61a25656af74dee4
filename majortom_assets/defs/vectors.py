"""Vector products per model: similarity index, reduced-precision exports, evaluation report.

Each is unpartitioned and reads every row file of the model's embeddings through `vectors/`.
"""

import dagster as dg
import pandas as pd

from majortom_assets.defs import keys, presentation
from majortom_assets.defs.resources import CollectionsResource, StorageResource, load_settings
from majortom_assets.deployment import io_step_tags
from majortom_assets.models.spec import MODEL_SPECS

#: None lets vectors.search pick by size (exact flat search for small data, IVF-PQ / HNSW beyond).
INDEX_KIND = None


def embedding_files(storage: StorageResource, model: str):
    """Every row file of the model's embeddings, or a Failure naming the asset to run first."""
    files = storage.layout.embedding_files(model)
    if not files:
        raise dg.Failure(
            f"no {model} embedding files under {storage.layout.embeddings_dir(model)}; "
            f"materialise {keys.embeddings_key(model).to_user_string()} first",
            allow_retries=False,
        )
    return files


def any_random_weights(files) -> bool:
    """Whether any file came from untrained weights: a product built on them must say so."""
    from majortom_assets.geoparquet import read_info

    return any(read_info(f).random_weights for f in files)


def embeddings_product(model: str, key: dg.AssetKey, *, group: str, kinds: set[str], description: str):
    """The asset decorator of an unpartitioned product of all the model's embeddings (an IO step)."""
    return dg.asset(
        key=key,
        group_name=group,
        kinds=kinds,
        description=description,
        deps=[keys.embeddings_key(model)],
        op_tags=io_step_tags(),
    )


def build_index_asset(model: str) -> dg.AssetsDefinition:
    @embeddings_product(
        model, keys.index_key(model), group="vectors", kinds={"faiss"},
        description=f"Similarity index over every {model} fragment embedding (query by vector, cell, unique_id or point).",
    )
    def _index(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from majortom_assets.vectors import search

        files = embedding_files(storage, model)
        out_dir = storage.layout.index_dir(model)
        manifest = search.build_index(files, out_dir, kind=INDEX_KIND, model=model)
        index = search.SearchIndex.load(out_dir)  # proves the persisted index opens
        return dg.MaterializeResult(
            metadata={
                "kind": manifest["kind"],
                "metric": manifest["metric"],
                "vectors": len(index),
                "dim": int(manifest["dim"]),
                "rows (files)": len(files),
                "build seconds": round(manifest["train_seconds"] + manifest["add_seconds"], 3),
                **presentation.file_metadata(out_dir),
            }
        )

    return _index


def build_export_asset(model: str, precision: str) -> dg.AssetsDefinition:
    @embeddings_product(
        model, keys.export_key(model, precision), group="vectors", kinds={"numpy"},
        description=f"{model} embeddings as memory-mappable {precision} (with the per-row metadata to join back).",
    )
    def _export(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from majortom_assets.vectors import quantize

        files = embedding_files(storage, model)
        out_dir = storage.layout.export_dir(model, precision)
        manifest = quantize.export(files, out_dir, precision=precision, model=model)
        flat = quantize.FlatEmbeddings.open(out_dir)  # proves the export memory-maps
        return dg.MaterializeResult(
            metadata={
                "precision": precision,
                "vectors": len(flat),
                "dim": int(manifest["dim"]),
                "matrix bytes": int(manifest["bytes"]),
                "rows (files)": len(files),
                **presentation.file_metadata(out_dir),
            }
        )

    return _export


def build_evaluation_asset(model: str) -> dg.AssetsDefinition:
    spec = MODEL_SPECS[model]

    @embeddings_product(
        model, keys.evaluation_key(model), group="vectors", kinds={"sklearn"},
        description=f"Linear-probe evaluation of {model} embeddings against the collection's land-cover labels.",
    )
    def _evaluation(
        context: dg.AssetExecutionContext, storage: StorageResource, collections: CollectionsResource
    ) -> dg.MaterializeResult:
        from majortom_assets.vectors import evaluate

        files = embedding_files(storage, model)
        collection = collections.open(spec.source)
        labels_path = f"{collection.root.rstrip('/')}/labels.parquet"
        if not collection.fs.exists(labels_path):
            raise dg.Failure(
                f"{collections.url(spec.source)} has no labels.parquet (grid_cell, class_id, class_name); "
                "the evaluation needs land-cover labels per cell",
                allow_retries=False,
            )
        with collection.fs.open(labels_path, "rb") as fh:
            labels = pd.read_parquet(fh)
        try:
            report = evaluate.evaluate({model: files}, labels)
        except ValueError as exc:  # too few labelled cells or classes for the folds
            raise dg.Failure(f"{model} evaluation: {exc}", allow_retries=False) from None
        out_dir = storage.layout.report_dir(model)
        written = report.write(out_dir)
        markdown = report.to_markdown()
        if any_random_weights(files):
            from majortom_assets.geoparquet import RANDOM_WEIGHTS_WARNING

            markdown = f"**{RANDOM_WEIGHTS_WARNING}**\n\n{markdown}"
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(markdown),
                "summary": dg.MetadataValue.json(report.to_dict()["models"]),
                "json": dg.MetadataValue.path(written["json"]),
                "markdown": dg.MetadataValue.path(written["markdown"]),
                "labelled cells": int(labels["grid_cell"].nunique()),
            }
        )

    return _evaluation


_MODELS = load_settings().models
vector_assets = [
    asset
    for model in _MODELS
    for asset in (
        build_index_asset(model),
        *(build_export_asset(model, precision) for precision in keys.EXPORT_PRECISIONS),
        build_evaluation_asset(model),
    )
]
