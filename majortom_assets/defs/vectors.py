"""Vector products per model: similarity index, reduced-precision exports, evaluation report,
change scores between dates; and one SQL catalog (DuckDB views) over every model.

Each is unpartitioned and reads every row file of the model's embeddings through `vectors/`,
except the index, which is incremental: it reads only new or changed row files.
"""

import hashlib

import dagster as dg
import pandas as pd

from majortom_assets.defs import keys, presentation
from majortom_assets.defs.resources import CollectionsResource, StorageResource, load_settings
from majortom_assets.deployment import io_step_tags
from majortom_assets.models.spec import MODEL_SPECS


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
        # Incremental: the trained codebooks are kept and only new or changed row files are read
        # (a drift check or 16x growth triggers a full retrain); see vectors/incremental.py.
        from majortom_assets.vectors import incremental, search

        files = embedding_files(storage, model)
        out_dir = storage.layout.index_dir(model)
        report = incremental.update(files, out_dir, model=model, meta_columns=search.META_COLUMNS)
        index = search.SearchIndex.load(out_dir)  # proves the persisted index opens
        problems = incremental.IncrementalIndex(out_dir).verify()
        if problems:
            raise dg.Failure(f"{out_dir}: index inconsistent after the update: {'; '.join(problems)}",
                             allow_retries=False)
        for why in report["needs_retrain"]:
            context.log.warning(f"{model} index: {why}")
        return dg.MaterializeResult(
            metadata={
                "kind": report["kind"],
                "codes": report["factory"],
                "metric": index.manifest["metric"],
                "vectors": len(index),
                "dim": int(report["dim"]),
                "rows (files)": len(files),
                "rows read": len(report["rows_read"]),
                "rows unchanged": len(report["rows_kept"]),
                "rows removed": len(report["rows_removed"]),
                "retrained": report["retrained"],
                "retrain reasons": "; ".join(report["reasons"]) or "none",
                "update seconds": report["seconds"],
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
        # per-row files under one manifest: only rows whose embedding file changed are re-encoded
        manifest = quantize.update_export(files, out_dir, precision=precision, model=model)
        flat = quantize.FlatEmbeddings.open(out_dir)  # proves the export memory-maps
        update = manifest["update"]
        return dg.MaterializeResult(
            metadata={
                "precision": precision,
                "vectors": len(flat),
                "dim": int(manifest["dim"]),
                "dtype": manifest["dtype"],
                "decoding": manifest["decoding"],
                "matrix bytes": int(manifest["bytes"]),
                "rows (files)": len(files),
                "rows read": int(update["rows read"]),
                "rows encoded": int(update["rows encoded"]),
                "rows unchanged": int(update["rows unchanged"]),
                **({"int8 scale refit": bool(update["scale refit"])} if precision == "int8" else {}),
                **presentation.file_metadata(out_dir),
            }
        )

    return _export


def build_evaluation_asset(model: str) -> dg.AssetsDefinition:
    spec = MODEL_SPECS[model]

    @embeddings_product(
        model, keys.evaluation_key(model), group="vectors", kinds={"sklearn"},
        description=f"k-NN and linear-probe evaluation of {model} embeddings against the collection's land-cover "
        f"labels, on a fixed sample of at most {4_000:,} labelled cells (fragments cached per row).",
    )
    def _evaluation(
        context: dg.AssetExecutionContext, storage: StorageResource, collections: CollectionsResource
    ) -> dg.MaterializeResult:
        from majortom_assets.vectors import evaluate

        files = embedding_files(storage, model)
        try:
            labels = collections.open(spec.source).labels()
        except FileNotFoundError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        out_dir = storage.layout.evaluation_dir([model])
        cfg = evaluate.EvalConfig()
        try:
            by_cell = evaluate.labels_by_cell(labels, cfg.label_column)
            # bounded by a fixed sample of labelled cells; their fragments are cached per row, so a
            # new row is the only embedding file read (the CV itself costs O(sample))
            sample = evaluate.sample_cells(by_cell.index, evaluate.MAX_CELLS)
            identity = hashlib.sha256("\n".join(f"{c}={by_cell[c]}" for c in sample).encode()).hexdigest()[:16]
            x, cells, update = evaluate.update_features(files, sample, out_dir / "features", cfg.fragments,
                                                        identity=identity)
            scores = evaluate.score_features(model, x, cells, by_cell, cfg)
        except ValueError as exc:  # too few labelled cells or classes for the folds
            raise dg.Failure(f"{model} evaluation: {exc}", allow_retries=False) from None
        report = evaluate.EvalReport(cfg.model_dump(), [scores])
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
                "cells scored (sample)": len(sample),
                "rows read": int(update["rows read"]),
                "rows unchanged": int(update["rows unchanged"]),
            }
        )

    return _evaluation


#: How many of the most-changed cells the change asset lists in the UI.
TOP_CHANGED = 10


def _most_changed(top: list[dict]) -> pd.DataFrame:
    """The UI table: highest change first, dates as days (the scores compare whole acquisitions)."""
    return pd.DataFrame({
        "grid_cell": [t["grid_cell"] for t in top],
        "dates": [f"{pd.Timestamp(t['t0']):%Y-%m-%d} → {pd.Timestamp(t['t1']):%Y-%m-%d}" for t in top],
        "score": [round(t["cosine_distance"], 4) for t in top],
        "fragments": [t["fragments"] for t in top],
    })


def build_change_asset(model: str) -> dg.AssetsDefinition:
    @embeddings_product(
        model, keys.change_key(model), group="vectors", kinds={"parquet"},
        description=f"Change scores of {model} embeddings: cosine distance between consecutive dates of "
        "each fragment (same cell, same pixel box) and their mean per cell, one folder per grid row.",
    )
    def _change(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from majortom_assets.vectors import timeseries

        files = embedding_files(storage, model)
        out_dir = storage.layout.change_dir(model)
        # Rows hold disjoint cells, so each row's scores are complete on their own: only rows whose
        # embedding file changed are re-read, the totals add up from the per-row summaries.
        result = timeseries.update_change(files, out_dir)
        totals = timeseries.change_totals(result["summaries"], TOP_CHANGED)
        update = result["update"]
        random_weights = bool(result["random_weights"])
        table = presentation.markdown_table(_most_changed(totals["top"]), limit=TOP_CHANGED)
        if not totals["pairs"]:
            table = "_no cell has two dates yet: change needs at least two acquisitions of a cell_"
        if random_weights:
            from majortom_assets.geoparquet import RANDOM_WEIGHTS_WARNING

            table = f"**{RANDOM_WEIGHTS_WARNING}**\n\n{table}"
        return dg.MaterializeResult(
            metadata={
                "most changed cells": dg.MetadataValue.md(table),
                "cells": int(totals["cells"]),
                "cells with >=2 dates": int(totals["cells_with_pairs"]),
                "date pairs (cell)": int(totals["pairs"]),
                "fragment series (>=2 dates)": int(totals["series"]),
                "mean change": float(totals["mean"]),
                "max change": float(totals["max"]),
                "rows (files)": len(files),
                "rows read": int(update["rows read"]),
                "rows unchanged": int(update["rows unchanged"]),
                "random weights": random_weights,
                "read with": dg.MetadataValue.md(
                    f"`pyarrow.parquet.read_table('{out_dir / timeseries.CELLS_DIR}')` or DuckDB "
                    f"`read_parquet('{out_dir / timeseries.CELLS_DIR}/*/*.parquet', hive_partitioning = true)`"),
                **presentation.file_metadata(out_dir),
            }
        )

    return _change


def build_sql_catalog_asset(models: tuple[str, ...]) -> dg.AssetsDefinition:
    """One catalog for all models, not one per model: cross-model queries (same cell or unique_id in
    two models) need every view in one connection, a DuckDB file has a single writer, and the views
    copy no data, so rebuilding the whole file whenever any model changes costs milliseconds."""

    @dg.asset(
        key=keys.SQL_CATALOG_KEY,
        group_name="vectors",
        kinds={"duckdb"},
        description="DuckDB database with one view per model over its embedding partitions (hive `row` "
        "column, spatial GEOMETRY, FLOAT[dim] embeddings), a `<view>_wkb` twin with WKB geometry for "
        "clients without spatial, and the cosine macros; paths relative to the storage root. Open it "
        "with `majortom_assets.vectors.sql.open_database(path)`.",
        deps=[keys.embeddings_key(m) for m in models],
        op_tags=io_step_tags(),
    )
    def _sql_catalog(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from majortom_assets.vectors import sql

        try:
            catalog = sql.write_database(storage.layout, models)
        except FileNotFoundError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        views = catalog.views
        random_weights = any(any_random_weights(storage.layout.embedding_files(m)) for m in views["model"])
        return dg.MaterializeResult(
            metadata={
                "views": dg.MetadataValue.md(presentation.markdown_table(views, limit=len(views))),
                **{f"rows: {m}": int(n) for m, n in zip(views["model"], views["rows"])},
                "models without embeddings": ", ".join(catalog.missing) or "none",
                "example query": dg.MetadataValue.md(f"```sql\n{catalog.example_query}\n```"),
                "example result": dg.MetadataValue.md(presentation.markdown_table(catalog.example, limit=5)),
                "random weights": random_weights,
                **presentation.file_metadata(catalog.path),
            }
        )

    return _sql_catalog


_MODELS = load_settings().models
vector_assets = [
    *(
        asset
        for model in _MODELS
        for asset in (
            build_index_asset(model),
            *(build_export_asset(model, precision) for precision in keys.EXPORT_PRECISIONS),
            build_evaluation_asset(model),
            build_change_asset(model),
        )
    ),
    build_sql_catalog_asset(tuple(_MODELS)),
]
