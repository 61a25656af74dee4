"""Asset keys, groups and resource keys in one place, so factories and automation agree on them.

Asset key parts use `_` only (Dagster keys and op names), so model `ssl4eo-s2` becomes
`ssl4eo_s2` and source `S2L1C` becomes `s2l1c`.
"""

from __future__ import annotations

import dagster as dg

from majortom_assets.models.spec import MODEL_SPECS, ModelSpec
from majortom_assets.standard import ASSET_EXPORT_PRECISIONS, SOURCES

FRAGMENT_SIZES: tuple[int, ...] = tuple(sorted({spec.fragment_size for spec in MODEL_SPECS.values()}))
EXPORT_PRECISIONS = ASSET_EXPORT_PRECISIONS   # the exports materialised per model


def model_slug(model: str) -> str:
    return model.replace("-", "_").replace(".", "_")


def source_slug(source: str) -> str:
    return source.lower()


def core_metadata_key(source: str) -> dg.AssetKey:
    return dg.AssetKey(["core", source_slug(source), "metadata"])


def core_shards_key(source: str) -> dg.AssetKey:
    return dg.AssetKey(["core", source_slug(source), "shards"])


def fragments_key(size: int) -> dg.AssetKey:
    return dg.AssetKey(["fragments", f"grid_{int(size)}px"])


def embeddings_key(model: str) -> dg.AssetKey:
    return dg.AssetKey(["embeddings", model_slug(model)])


def pca_map_key(model: str) -> dg.AssetKey:
    return dg.AssetKey(["maps", model_slug(model), "pca"])


def index_key(model: str) -> dg.AssetKey:
    return dg.AssetKey(["vectors", model_slug(model), "index"])


def export_key(model: str, precision: str) -> dg.AssetKey:
    return dg.AssetKey(["vectors", model_slug(model), precision])


def evaluation_key(model: str) -> dg.AssetKey:
    return dg.AssetKey(["vectors", model_slug(model), "evaluation"])


def change_key(model: str) -> dg.AssetKey:
    return dg.AssetKey(["vectors", model_slug(model), "change"])


def window_change_key(model: str) -> dg.AssetKey:
    return dg.AssetKey(["timeseries", model_slug(model), "window_change"])


SQL_CATALOG_KEY = dg.AssetKey(["vectors", "sql_catalog"])


def embedder_resource_key(model: str) -> str:
    """One resource per model, so a step loads only the model it embeds with."""
    return f"embedder_{model_slug(model)}"


def sources_for_size(size: int, models: tuple[str, ...]) -> tuple[str, ...]:
    """Collections whose samples are cut into `size` px fragments by some enabled model."""
    return tuple(
        s for s in SOURCES if any(_spec(m).source == s and _spec(m).fragment_size == size for m in models)
    )


def sources_for_models(models: tuple[str, ...]) -> tuple[str, ...]:
    """Collections some enabled model reads, in `SOURCES` order."""
    return tuple(s for s in SOURCES if any(_spec(m).source == s for m in models))


def sizes_for_models(models: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(sorted({_spec(m).fragment_size for m in models}))


def row_chain_keys(source: str, models: tuple[str, ...]) -> list[dg.AssetKey]:
    """Row-partitioned assets fed by one collection: its shards, fragment grids, embeddings."""
    keys = [core_shards_key(source)]
    used = [m for m in models if _spec(m).source == source]
    keys += [fragments_key(size) for size in sorted({_spec(m).fragment_size for m in used})]
    keys += [embeddings_key(m) for m in used]
    return keys


def _spec(model: str) -> ModelSpec:
    return MODEL_SPECS[model]
