"""Work on embedding partitions: global PCA and maps, similarity search, reduced-precision
exports, time series, downstream evaluation and SQL access. Pure library code (no Dagster).

Every function takes partition paths (``<root>/embeddings/<model>/row=<ROW>/embeddings.parquet``)
and streams them in record batches; see ``files.model_paths`` to list a model's partitions.
Submodules are imported on use so that ``import majortom_assets.vectors`` stays cheap (faiss,
sklearn and duckdb load only for the features that need them).
"""

from majortom_assets.vectors.files import UnknownModelError, known_models, model_paths

__all__ = ["UnknownModelError", "known_models", "model_paths"]
