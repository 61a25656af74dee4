"""Vector products per model: similarity index, reduced-precision exports, evaluation report,
change scores between dates; and one SQL catalog (DuckDB views) over every model.

Each is unpartitioned and reads every row file of the model's embeddings through `vectors/`,
except the index, which is incremental: it reads only new or changed row files.
"""

from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa

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


#: How many of the most-changed cells the change asset lists in the UI.
TOP_CHANGED = 10

_FRAGMENT_CHANGE_SCHEMA = pa.schema([
    ("grid_cell", pa.string()), ("pixel_bbox", pa.list_(pa.int32())),
    ("t0", pa.timestamp("ns", tz="UTC")), ("t1", pa.timestamp("ns", tz="UTC")),
    ("product_t0", pa.string()), ("product_t1", pa.string()), ("cosine_distance", pa.float64()),
])
_CELL_CHANGE_SCHEMA = pa.schema([
    ("grid_cell", pa.string()), ("t0", pa.timestamp("ns", tz="UTC")), ("t1", pa.timestamp("ns", tz="UTC")),
    ("cosine_distance", pa.float64()), ("fragments", pa.int64()),
])


def _most_changed(per_cell: pd.DataFrame, limit: int = TOP_CHANGED) -> pd.DataFrame:
    """The UI table: highest change first, dates as days (the scores compare whole acquisitions)."""
    top = per_cell.sort_values(["cosine_distance", "grid_cell"], ascending=[False, True]).head(limit)
    return pd.DataFrame({
        "grid_cell": top["grid_cell"].to_numpy(),
        "dates": [f"{a:%Y-%m-%d} → {b:%Y-%m-%d}" for a, b in zip(top["t0"], top["t1"])],
        "score": top["cosine_distance"].round(4).to_numpy(),
        "fragments": top["fragments"].to_numpy(),
    })


def build_change_asset(model: str) -> dg.AssetsDefinition:
    @embeddings_product(
        model, keys.change_key(model), group="vectors", kinds={"parquet"},
        description=f"Change scores of {model} embeddings: cosine distance between consecutive dates of "
        "each fragment (same cell, same pixel box) and their mean per cell.",
    )
    def _change(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from majortom_assets.geoparquet import atomic_output
        from majortom_assets.vectors import timeseries

        files = embedding_files(storage, model)
        cell_path, fragment_path = storage.layout.change_file(model), storage.layout.fragment_change_file(model)
        cell_frames, cells, series = [], 0, 0
        # Row partitions hold disjoint cells, so each partition's series are complete on their own:
        # memory stays one partition's embeddings, and counts add up across partitions.
        with atomic_output(cell_path) as cell_tmp, atomic_output(fragment_path) as fragment_tmp:
            with pq.ParquetWriter(fragment_tmp, _FRAGMENT_CHANGE_SCHEMA) as writer:
                for path in files:
                    cells += len(pc.unique(pq.read_table(path, columns=["grid_cell"]).column("grid_cell")))
                    per_fragment, per_cell = timeseries.partition_change_scores(path)
                    if per_fragment.empty:
                        continue
                    boxes = per_fragment["pixel_bbox"].map(tuple)
                    series += len(set(zip(per_fragment["grid_cell"], boxes)))
                    writer.write_table(pa.Table.from_pandas(
                        per_fragment[_FRAGMENT_CHANGE_SCHEMA.names], schema=_FRAGMENT_CHANGE_SCHEMA,
                        preserve_index=False))
                    cell_frames.append(per_cell)
            per_cell = (pd.concat(cell_frames, ignore_index=True) if cell_frames
                        else _CELL_CHANGE_SCHEMA.empty_table().to_pandas())
            pq.write_table(pa.Table.from_pandas(per_cell[_CELL_CHANGE_SCHEMA.names], schema=_CELL_CHANGE_SCHEMA,
                                                preserve_index=False), cell_tmp)
        scores = per_cell["cosine_distance"].to_numpy(dtype=float)
        random_weights = any_random_weights(files)
        table = presentation.markdown_table(_most_changed(per_cell), limit=TOP_CHANGED)
        if not len(per_cell):
            table = "_no cell has two dates yet: change needs at least two acquisitions of a cell_"
        if random_weights:
            from majortom_assets.geoparquet import RANDOM_WEIGHTS_WARNING

            table = f"**{RANDOM_WEIGHTS_WARNING}**\n\n{table}"
        return dg.MaterializeResult(
            metadata={
                "most changed cells": dg.MetadataValue.md(table),
                "cells": cells,
                "cells with >=2 dates": int(per_cell["grid_cell"].nunique()),
                "date pairs (cell)": len(per_cell),
                "fragment series (>=2 dates)": series,
                "mean change": float(scores.mean()) if len(scores) else float("nan"),
                "max change": float(scores.max()) if len(scores) else float("nan"),
                "rows (files)": len(files),
                "random weights": random_weights,
                **presentation.file_metadata(cell_path),
                **presentation.file_metadata(fragment_path, label="fragments path"),
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
        "column, spatial GEOMETRY, FLOAT[dim] embeddings) and the cosine macros. Open it with "
        "`majortom_assets.vectors.sql.open_database(path)` or `LOAD spatial` first.",
        deps=[keys.embeddings_key(m) for m in models],
        op_tags=io_step_tags(),
    )
    def _sql_catalog(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from majortom_assets.geoparquet import atomic_output
        from majortom_assets.vectors import sql

        present = [m for m in models if storage.layout.embedding_files(m)]
        if not present:
            raise dg.Failure(
                f"no embedding files under {storage.layout.root / 'embeddings'} for {', '.join(models)}; "
                "materialise an embeddings asset first",
                allow_retries=False,
            )
        path = storage.layout.sql_database()
        with atomic_output(path) as tmp:
            con = sql.connect(storage.layout.root, database=str(tmp), models=present)
            con.execute("CHECKPOINT")
            con.close()
            Path(f"{tmp}.wal").unlink(missing_ok=True)
        con = sql.open_database(path)  # proves the persisted views resolve after reopening
        try:
            views = con.sql(f"SELECT model, view, dim, partitions FROM {sql.MODELS_VIEW} ORDER BY model").df()
            views["rows"] = [con.sql(f'SELECT count(*) FROM "{v}"').fetchone()[0] for v in views["view"]]
            view = views["view"].iloc[0]
            uid = con.sql(f'SELECT unique_id FROM "{view}" ORDER BY unique_id LIMIT 1').fetchone()[0]
            query = (f"SELECT unique_id, grid_cell, timestamp, round(similarity, 4) AS similarity\n"
                     f"FROM {view}_similar('{uid}', 5)\nORDER BY similarity DESC, unique_id")
            example = con.sql(query).df()
        finally:
            con.close()
        random_weights = any(any_random_weights(storage.layout.embedding_files(m)) for m in present)
        return dg.MaterializeResult(
            metadata={
                "views": dg.MetadataValue.md(presentation.markdown_table(views, limit=len(views))),
                **{f"rows: {m}": int(n) for m, n in zip(views["model"], views["rows"])},
                "models without embeddings": ", ".join(m for m in models if m not in present) or "none",
                "example query": dg.MetadataValue.md(f"```sql\n{query}\n```"),
                "example result": dg.MetadataValue.md(presentation.markdown_table(example, limit=5)),
                "random weights": random_weights,
                **presentation.file_metadata(path),
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
