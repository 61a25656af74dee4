"""Notice new samples in a collection's metadata.parquet and request the rows they fall in.

Cursor (JSON): per source, the metadata file's stamp (size + modification time or ETag, cheap to
read even on the hub) and the sample count of every grid row seen. The file is read only when its
stamp changes; rows whose count changed are re-requested, rows never seen are added to the
`grid_rows` dynamic partitions first. On the very first tick (no cursor) the sensor registers
every row but requests only rows whose shards were never materialised, so switching it on over
an existing deployment does not recompute everything.
"""

import hashlib
import json

import dagster as dg

from majortom_assets.defs import keys
from majortom_assets.defs.partitions import GRID_ROWS, new_row_keys, row_sample_counts
from majortom_assets.defs.resources import CollectionsResource, load_settings
from majortom_assets.deployment import gpu_run_tags


def file_stamp(collection) -> str:
    info = collection.fs.info(collection.metadata_path)
    parts = [
        str(info.get(k))
        for k in ("size", "mtime", "last_modified", "ETag", "etag", "last_commit")
        if info.get(k)
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def evaluate_new_samples(
    instance: dg.DagsterInstance,
    collections: CollectionsResource,
    cursor: str | None,
    models: tuple[str, ...],
) -> dg.SensorResult:
    state: dict = json.loads(cursor) if cursor else {}
    first_tick = not state
    registered = set(instance.get_dynamic_partitions(GRID_ROWS.name))
    new_rows: list[str] = []
    requests: list[dg.RunRequest] = []
    embedding_keys = {keys.embeddings_key(m) for m in models}
    for source in keys.sources_for_models(models):
        collection = collections.open(source)
        try:
            stamp = file_stamp(collection)
        except (FileNotFoundError, OSError):
            continue  # a collection not there yet is not an error for a sensor
        previous = state.get(source, {})
        if previous.get("stamp") == stamp:
            continue
        counts = row_sample_counts(collection.metadata())
        fresh = new_row_keys(registered | set(new_rows), counts)
        new_rows += fresh
        chain = keys.row_chain_keys(source, models)
        built = instance.get_materialized_partitions(keys.core_shards_key(source)) if first_tick else set()
        for row, count in counts.items():
            if previous.get("rows", {}).get(row) == count and not first_tick:
                continue
            if first_tick and row in built:
                continue
            requests.append(
                dg.RunRequest(
                    run_key=f"{source}:{row}:{count}:{stamp}",
                    partition_key=row,
                    asset_selection=[keys.core_metadata_key(source), *chain],
                    tags={
                        **(gpu_run_tags() if embedding_keys & set(chain) else {}),
                        "majortom/trigger": "new-samples",
                    },
                )
            )
        state[source] = {"stamp": stamp, "rows": counts}
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[GRID_ROWS.build_add_request(new_rows)] if new_rows else [],
        cursor=json.dumps(state, sort_keys=True),
    )


_MODELS = load_settings().models


@dg.sensor(
    name="new_core_samples",
    target=dg.AssetSelection.assets(
        *{
            k
            for s in keys.sources_for_models(_MODELS)
            for k in [keys.core_metadata_key(s), *keys.row_chain_keys(s, _MODELS)]
        }
    ),
    minimum_interval_seconds=600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Adds grid rows with new Core samples as partitions and requests their shards, fragments and embeddings.",
)
def new_core_samples(
    context: dg.SensorEvaluationContext, collections: CollectionsResource
) -> dg.SensorResult:
    return evaluate_new_samples(context.instance, collections, context.cursor, _MODELS)
