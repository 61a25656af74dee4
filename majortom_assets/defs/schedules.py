"""Nightly catch-up: request every grid row whose row-partitioned assets are still missing."""

import dagster as dg

from majortom_assets.defs import keys
from majortom_assets.defs.partitions import GRID_ROWS
from majortom_assets.defs.resources import load_settings
from majortom_assets.deployment import gpu_run_tags

#: Rows requested per tick at most, so one tick never floods the run queue.
MAX_ROWS_PER_TICK = 100


def row_asset_keys(models: tuple[str, ...]) -> list[dg.AssetKey]:
    seen: dict[dg.AssetKey, None] = {}
    for source in keys.sources_for_models(models):
        for key in keys.row_chain_keys(source, models):
            seen[key] = None
    return list(seen)


def missing_row_requests(
    instance: dg.DagsterInstance, models: tuple[str, ...], limit: int = MAX_ROWS_PER_TICK
) -> list[dg.RunRequest]:
    """One run per row with the row's missing assets (plus never-built metadata selections)."""
    row_keys = row_asset_keys(models)
    done = {key: instance.get_materialized_partitions(key) for key in row_keys}
    metadata_keys = [keys.core_metadata_key(s) for s in keys.sources_for_models(models)]
    unbuilt_metadata = [k for k in metadata_keys if instance.get_latest_materialization_event(k) is None]
    embedding_keys = {keys.embeddings_key(m) for m in models}
    requests = []
    for row in instance.get_dynamic_partitions(GRID_ROWS.name):
        missing = [key for key in row_keys if row not in done[key]]
        if not missing:
            continue
        requests.append(
            dg.RunRequest(
                partition_key=row,
                asset_selection=unbuilt_metadata + missing,
                tags=gpu_run_tags() if embedding_keys & set(missing) else {},
            )
        )
        if len(requests) >= limit:
            break
    return requests


_MODELS = load_settings().models


@dg.schedule(
    name="missing_rows_nightly",
    cron_schedule="0 2 * * *",
    target=dg.AssetSelection.assets(
        *row_asset_keys(_MODELS), *(keys.core_metadata_key(s) for s in keys.sources_for_models(_MODELS))
    ),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Backfills grid rows whose shards, fragment grids or embeddings are missing (one run per row).",
)
def missing_rows_nightly(context: dg.ScheduleEvaluationContext):
    # No run key: a row still missing at the next tick (its run failed) is requested again.
    requests = missing_row_requests(context.instance, _MODELS)
    if not requests:
        return dg.SkipReason("every registered grid row is materialised for every enabled model")
    return requests
