"""Shared setup of the tests that run Dagster on a small synthetic instance (no tests here).

The in-process tests, the CLI / webserver tests and the browser test build the same asset chain
with the same small settings; keeping it here means they all exercise one graph.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from majortom_assets.defs.checks import build_embedding_checks
from majortom_assets.defs.embeddings import build_embeddings_asset
from majortom_assets.defs.fragments import build_fragments_asset
from majortom_assets.defs.maps import build_pca_map_asset
from majortom_assets.defs.resources import MajorTomSettings, build_resources
from majortom_assets.defs.shards import build_core_metadata_asset, build_core_shards_asset

BATCH_SIZE = 8
FRAGMENT_SIZE = 224


def local_env(home: Path, dagster_home: Path, model: str, image_size: int) -> dict[str, str]:
    """The environment a subprocess code location (CLI, webserver) reads the same settings from."""
    return {
        **os.environ,
        "MAJORTOM_HOME": str(home),
        "DAGSTER_HOME": str(dagster_home),
        "MAJORTOM_ENV": "local",
        "MAJORTOM_MODELS": model,
        "MAJORTOM_IMAGE_SIZE": str(image_size),
        "MAJORTOM_BATCH_SIZE": str(BATCH_SIZE),
        "MAJORTOM_EXECUTOR": "in_process",
    }


def local_resources(home: Path, model: str, image_size: int) -> dict:
    """In-process resources with the settings `local_env` gives a subprocess."""
    return build_resources(MajorTomSettings(home=home, models=(model,),
                                            compute={"image_size": image_size, "batch_size": BATCH_SIZE}))


def pipeline_assets(source: str, model: str, *, products: bool = True) -> list:
    """Core metadata -> row shards -> fragments -> embeddings; `products` adds the embedding
    checks and the PCA map (leave them out where every asset after the first is row-partitioned)."""
    assets = [
        build_core_metadata_asset(source),
        build_core_shards_asset(source),
        build_fragments_asset(FRAGMENT_SIZE, (source,)),
        build_embeddings_asset(model),
    ]
    if products:
        assets += [build_embedding_checks(model), build_pca_map_asset(model)]
    return assets


def materialize(assets, resources, instance, selection, partition: str | None = None) -> dg.ExecuteInProcessResult:
    """One in-process run; failures are returned, not raised, so tests can inspect them."""
    return dg.materialize(
        assets,
        instance=instance,
        resources=resources,
        selection=selection,
        partition_key=partition,
        raise_on_error=False,
    )
