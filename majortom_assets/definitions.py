"""Dagster entry point: every module under `defs/` is loaded, then global settings applied once.

Used by `dagster dev -w workspace.yaml`, `dagster asset materialize -m majortom_assets.definitions`
and `dg check defs` / `dg list defs` (pyproject `[tool.dg.project]`).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from majortom_assets.deployment import executor_from_env


@dg.definitions
def defs() -> dg.Definitions:
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)
    # The executor (in-process, multiprocess with a GPU step cap, Celery, Kubernetes) comes from
    # MAJORTOM_EXECUTOR; the GPU concurrency pool's limit lives in dagster.yaml.
    return dg.Definitions.merge(loaded, dg.Definitions(executor=executor_from_env()))
