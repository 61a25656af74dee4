"""Notice new samples in a collection's metadata.parquet and request the rows they fall in.

Cursor (JSON): per source, the metadata file's stamp (size + modification time or ETag, cheap to
read even on the hub), the sample count of every grid row in the user's selection, and rows
waiting for a metadata refresh. The file is read only when its stamp changes. Then, per source:

1. ONE run refreshes the `core/<source>/metadata` selection, with the filter of its last
   materialisation (a user who selected a bbox or dates keeps that selection);
2. once that refresh has materialised (a later tick), the rows whose selected sample count changed
   are requested, without the metadata: one run per band of changed rows (`change_bands`: a band
   skips no up-to-date row that holds samples and bridges at most a few empty ones), so each run
   loads each model once.

Rows are static partitions (every grid row exists), so nothing is registered. On the very first
tick (no cursor) only rows whose shards were never materialised are requested, so switching the
sensor on over an existing deployment does not recompute everything.
"""

import hashlib
import json

import dagster as dg

from majortom_assets.core import MetadataFilter
from majortom_assets.defs import keys
from majortom_assets.defs.partitions import change_bands, row_sample_counts
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


def last_selection(instance: dg.DagsterInstance, source: str) -> tuple[dict, int | None]:
    """The filter of the metadata asset's latest materialisation (`{}` = everything) and its
    event's storage id (None when it was never materialised)."""
    found = instance.fetch_materializations(keys.core_metadata_key(source), limit=1).records
    if not found or found[0].asset_materialization is None:
        return {}, None
    entry = found[0].asset_materialization.metadata.get("filter")
    value = getattr(entry, "value", None)
    return (dict(value) if isinstance(value, dict) else {}), found[0].storage_id


def refresh_request(source: str, selection: dict, stamp: str) -> dg.RunRequest:
    """One run that re-reads the collection's metadata with the user's filter."""
    key = keys.core_metadata_key(source)
    return dg.RunRequest(
        run_key=f"{source}:metadata:{stamp}",
        asset_selection=[key],
        run_config={"ops": {key.to_python_identifier(): {"config": selection}}},
        tags={"majortom/trigger": "new-samples"},
    )


def band_request(source: str, band: tuple[str, str], stamp: str, models: tuple[str, ...]) -> dg.RunRequest:
    """One run over a band of changed rows (`partitions.change_bands`): each model loads once."""
    chain = keys.row_chain_keys(source, models)
    embedding_keys = {keys.embeddings_key(m) for m in models}
    first, last = band
    return dg.RunRequest(
        run_key=f"{source}:{first}...{last}:{stamp}",
        asset_selection=chain,
        tags={
            "dagster/asset_partition_range_start": first,
            "dagster/asset_partition_range_end": last,
            **(gpu_run_tags() if embedding_keys & set(chain) else {}),
            "majortom/trigger": "new-samples",
        },
    )


def evaluate_new_samples(
    instance: dg.DagsterInstance,
    collections: CollectionsResource,
    cursor: str | None,
    models: tuple[str, ...],
) -> dg.SensorResult:
    state: dict = json.loads(cursor) if cursor else {}
    first_tick = not state
    requests: list[dg.RunRequest] = []
    for source in keys.sources_for_models(models):
        entry = dict(state.get(source, {}))
        selection, selection_id = last_selection(instance, source)
        pending: dict[str, int] = entry.get("pending", {})
        if pending and selection_id is not None and selection_id != entry.get("selection_id"):
            # the refresh (or a user's own) materialised a newer selection: now request the rows
            holding = set(entry.get("rows", {}))
            requests += [
                band_request(source, band, entry["stamp"], models) for band in change_bands(pending, holding)
            ]
            pending = {}
            entry["selection_id"] = selection_id
        collection = collections.open(source)
        try:
            stamp = file_stamp(collection)
        except (FileNotFoundError, OSError):
            stamp = None  # a collection not there yet is not an error for a sensor
        if stamp is not None and entry.get("stamp") != stamp:
            counts = row_sample_counts(collection.metadata(MetadataFilter(**selection)))
            previous: dict[str, int] = entry.get("rows", {})
            if first_tick:
                built = instance.get_materialized_partitions(keys.core_shards_key(source))
                changed = {row: n for row, n in counts.items() if row not in built}
            else:
                # rows that gained or lost samples, and rows that lost all of them (now empty)
                changed = {row: counts.get(row, 0) for row in {*counts, *previous}
                           if counts.get(row, 0) != previous.get(row, 0)}
            if changed:
                requests.append(refresh_request(source, selection, stamp))
                pending = {**pending, **changed}
                entry["selection_id"] = selection_id
            entry.update(stamp=stamp, rows=counts)
        entry["pending"] = pending
        state[source] = entry
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(state, sort_keys=True))


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
    description=(
        "Refreshes a collection's metadata selection once per change (keeping the user's filter), "
        "then requests the shards, fragments and embeddings of the rows whose samples changed."
    ),
)
def new_core_samples(
    context: dg.SensorEvaluationContext, collections: CollectionsResource
) -> dg.SensorResult:
    return evaluate_new_samples(context.instance, collections, context.cursor, _MODELS)
