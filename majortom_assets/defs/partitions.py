"""The one partitioning of this project: Major TOM grid rows (`136U`, `12D`, ...).

Rows are dynamic partitions: which rows exist depends on the collections (a synthetic demo has a
handful, Core-S2L2A about 1,700 of the grid's ~2,000), and new samples can open new rows. The
`new_core_samples` sensor and the demo add them from the collections' metadata; every key is
validated with `grid.parse_row_name` first. One partition per row keeps each asset far below
Dagster's 100,000-partition guidance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import dagster as dg
import numpy as np

from majortom_assets import grid
from majortom_assets.layout import StoragePathError, validate_row_key

GRID_ROWS = dg.DynamicPartitionsDefinition(name="grid_rows")

#: Backfills batch rows into runs of at most this many partitions: a run loads each model once,
#: and one policy for every row asset lets a backfill plan shards -> fragments -> embeddings together.
ROW_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=50)

#: Dagster's guidance for partitions per asset; the 10 km grid has ~2,000 rows, far below it.
MAX_ROW_PARTITIONS = 100_000


def row_sample_counts(metadata) -> dict[str, int]:
    """Samples per grid row name in a Core metadata table (vectorised over `grid_row_u`)."""
    if len(metadata) == 0:
        return {}
    rows, counts = np.unique(np.asarray(metadata["grid_row_u"], dtype=np.int64), return_counts=True)
    names = np.atleast_1d(grid.row_name(rows))
    return {str(name): int(count) for name, count in zip(names, counts, strict=True)}


def new_row_keys(existing: Iterable[str], rows: Iterable[str]) -> list[str]:
    """Validated rows not yet registered, in a stable order; refuses to pass the partition limit."""
    have = set(existing)
    fresh = []
    for row in rows:
        key = validate_row_key(row)
        if key not in have:
            have.add(key)
            fresh.append(key)
    if len(have) > MAX_ROW_PARTITIONS:
        raise StoragePathError(
            f"{len(have)} row partitions would exceed Dagster's {MAX_ROW_PARTITIONS} guidance; "
            "check the collection's grid_row_u values"
        )
    return sorted(fresh, key=grid.parse_row_name)


def register_rows(instance: dg.DagsterInstance, rows: Iterable[str]) -> list[str]:
    """Add rows to the instance's `grid_rows` partitions (demo and tests; the sensor uses requests)."""
    fresh = new_row_keys(instance.get_dynamic_partitions(GRID_ROWS.name), rows)
    if fresh:
        instance.add_dynamic_partitions(GRID_ROWS.name, fresh)
    return fresh


def merge_counts(per_source: Mapping[str, Mapping[str, int]]) -> list[str]:
    """All rows that hold samples in any collection, south to north."""
    rows = {row for counts in per_source.values() for row in counts}
    return sorted(rows, key=grid.parse_row_name)
