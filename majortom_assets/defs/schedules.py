"""Nightly catch-up: request every grid row that holds selected samples but misses a row asset.

Which rows hold samples comes from each collection's metadata selection (only its `grid_row_u`
column is read); rows without samples are not requested (they hold nothing to build). A source
whose selection was never materialised gets one metadata run instead; its rows follow next night.
"""

import dagster as dg
import pyarrow.parquet as pq

from majortom_assets.defs import keys
from majortom_assets.defs.partitions import ROW_NAMES, row_sample_counts
from majortom_assets.defs.resources import StorageResource, load_settings
from majortom_assets.deployment import gpu_run_tags

#: Rows requested per tick at most, so one tick never floods the run queue.
MAX_ROWS_PER_TICK = 100


def row_asset_keys(models: tuple[str, ...]) -> list[dg.AssetKey]:
    seen: dict[dg.AssetKey, None] = {}
    for source in keys.sources_for_models(models):
        for key in keys.row_chain_keys(source, models):
            seen[key] = None
    return list(seen)


def selected_rows(storage: StorageResource, source: str) -> set[str] | None:
    """Rows with samples in the source's metadata selection; None if there is no selection yet."""
    path = storage.layout.selection_file(source)
    if not path.exists():
        return None
    return set(row_sample_counts(pq.read_table(path, columns=["grid_row_u"]).to_pandas()))


def missing_row_requests(
    instance: dg.DagsterInstance,
    storage: StorageResource,
    models: tuple[str, ...],
    limit: int = MAX_ROWS_PER_TICK,
) -> list[dg.RunRequest]:
    """One run per row with the row's missing assets; one metadata run per source without a selection."""
    requests = []
    missing: dict[str, dict[dg.AssetKey, None]] = {}
    done: dict[dg.AssetKey, set[str]] = {}
    for source in keys.sources_for_models(models):
        rows = selected_rows(storage, source)
        if rows is None:
            requests.append(dg.RunRequest(asset_selection=[keys.core_metadata_key(source)]))
            continue
        for key in keys.row_chain_keys(source, models):
            if key not in done:
                done[key] = set(instance.get_materialized_partitions(key))
            for row in rows - done[key]:
                missing.setdefault(row, {})[key] = None
    embedding_keys = {keys.embeddings_key(m) for m in models}
    for row in (r for r in ROW_NAMES if r in missing):  # south to north
        if len(requests) >= limit:
            break
        selection = list(missing[row])
        requests.append(
            dg.RunRequest(
                partition_key=row,
                asset_selection=selection,
                tags=gpu_run_tags() if embedding_keys & set(selection) else {},
            )
        )
    return requests


_MODELS = load_settings().models


@dg.schedule(
    name="missing_rows_nightly",
    cron_schedule="0 2 * * *",
    target=dg.AssetSelection.assets(
        *row_asset_keys(_MODELS), *(keys.core_metadata_key(s) for s in keys.sources_for_models(_MODELS))
    ),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description=(
        "Backfills grid rows that hold selected samples but miss their shards, fragment grids or "
        "embeddings (one run per row)."
    ),
)
def missing_rows_nightly(context: dg.ScheduleEvaluationContext, storage: StorageResource):
    # No run key: a row still missing at the next tick (its run failed) is requested again.
    requests = missing_row_requests(context.instance, storage, _MODELS)
    if not requests:
        return dg.SkipReason("every grid row with selected samples is materialised for every enabled model")
    return requests
