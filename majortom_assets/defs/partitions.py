"""The one partitioning of this project: every row of the Major TOM 10 km grid (`136U`, `12D`, ...).

Rows are STATIC partitions over the whole grid, south to north (`946D` ... `1D`, `0U`, `1U` ...
`946U`, 1,893 keys), not dynamic partitions registered from a collection's metadata. Every entry
point can then name any row on a fresh instance with no daemon and no Python: `dagster asset
materialize --partition 5U`, `--partition-range 3U...5U`, `dg launch`, the UI's materialise dialog
and "backfill all". A row without samples is a cheap no-op that still records a materialisation
(`samples: 0`), so "missing" in the UI always means "never run", whatever the collection holds.
Key order is latitude order, so a range is a band of latitude. 1,893 keys per asset is far below
Dagster's 100,000-partition guidance (measured in benchmarks/bench_dagster_scale.py).

A key that is not a grid row is refused with the row format (`136U`, `12D`) by
`GridRowPartitions.validate_partition_key`, which is what `dagster asset materialize` and
`dg launch` call before a run starts.
"""

from __future__ import annotations

import dagster as dg
import numpy as np

from majortom_assets import grid
from majortom_assets.layout import StoragePathError, validate_row_key

#: Spacing of the grid whose rows are the partitions (Major TOM Core uses the 10 km grid).
GRID_SPACING_KM = 10.0


def grid_row_names(spacing_km: float = GRID_SPACING_KM) -> tuple[str, ...]:
    """Canonical names of every row of the grid, south to north."""
    return tuple(str(name) for name in np.atleast_1d(grid.row_name(grid.get_grid(spacing_km).rows())))


class GridRowPartitions(dg.StaticPartitionsDefinition):
    """Static partitions over grid rows whose key check names the row format on a bad key.

    Dagster's own check raises `DagsterUnknownPartitionError`, which `dagster asset materialize`
    turns into a generic "no PartitionsDefinition contains ..." message; a user who typed `5u` or
    `05U` should read what a row key looks like instead.
    """

    def __init__(self, row_names: tuple[str, ...]):
        super().__init__(list(row_names))
        self._key_set = frozenset(row_names)

    def has_partition_key(self, partition_key: str) -> bool:  # O(1) instead of a list scan
        return partition_key in self._key_set

    def validate_partition_key(self, partition_key: str, context=None) -> None:
        if partition_key in self._key_set:
            return
        validate_row_key(partition_key)  # raises naming the format for anything that is not a row
        keys = self.get_partition_keys()
        raise StoragePathError(
            f"partition key {partition_key!r} is not a row of the {GRID_SPACING_KM:g} km grid "
            f"(rows {keys[0]} .. {keys[-1]}, e.g. 136U, 12D)"
        )


ROW_NAMES: tuple[str, ...] = grid_row_names()
GRID_ROWS = GridRowPartitions(ROW_NAMES)

#: One run per backfill (or per `--partition-range`): the run loads each model once for all its
#: rows, and `dagster asset materialize --partition-range` accepts only single-run policies. Rows
#: record their materialisations one by one (see `row_results`), so a run that fails on one row
#: keeps every finished row and a backfill re-run from failure redoes only the rest.
ROW_BACKFILL = dg.BackfillPolicy.single_run()


def row_sample_counts(metadata) -> dict[str, int]:
    """Samples per grid row name in a Core metadata table (vectorised over `grid_row_u`)."""
    if len(metadata) == 0:
        return {}
    rows, counts = np.unique(np.asarray(metadata["grid_row_u"], dtype=np.int64), return_counts=True)
    names = np.atleast_1d(grid.row_name(rows))
    return {str(name): int(count) for name, count in zip(names, counts, strict=True)}


def order_rows(rows) -> list[str]:
    """Row names south to north (partition order)."""
    return sorted(rows, key=grid.parse_row_name)


#: Rows without samples a band may bridge: each costs a no-op step and two event-log writes per
#: row asset (about 0.1 s each with SQLite storage), far less than loading the models again.
MAX_EMPTY_GAP = 8


def row_bands(rows, max_gap: int = MAX_EMPTY_GAP) -> list[tuple[str, str]]:
    """Partition ranges (first, last) covering `rows`, south to north, one per band of rows at
    most `max_gap` empty rows apart: one run per band loads each model once for all its rows."""
    index = {name: i for i, name in enumerate(ROW_NAMES)}
    positions = sorted({index[validate_row_key(row)] for row in rows})
    bands: list[tuple[str, str]] = []
    start = prev = None
    for pos in positions:
        if start is None:
            start = prev = pos
        elif pos - prev - 1 <= max_gap:
            prev = pos
        else:
            bands.append((ROW_NAMES[start], ROW_NAMES[prev]))
            start = prev = pos
    if start is not None:
        bands.append((ROW_NAMES[start], ROW_NAMES[prev]))
    return bands


def change_bands(changed, holding, max_gap: int = MAX_EMPTY_GAP) -> list[tuple[str, str]]:
    """Partition ranges covering every `changed` row, south to north, that include no row which
    holds samples (`holding`) without having changed: a band bridges at most `max_gap` empty rows,
    so a run over it recomputes nothing that was up to date and loads each model once."""
    changed, holding = set(changed), set(holding)
    bands: list[tuple[str, str]] = []
    start = last = None
    gap = 0
    for row in ROW_NAMES:
        if row in changed:
            if start is None:
                start = row
            last, gap = row, 0
        elif start is not None and row not in holding and gap < max_gap:
            gap += 1
        elif start is not None:
            bands.append((start, last))
            start = last = None
            gap = 0
    if start is not None:
        bands.append((start, last))
    return bands


class RowResults:
    """Per-row outcomes of one step over many rows (a backfill or a `--partition-range` run).

    Rows are independent: a row that fails must not cost the rows before or after it. On success
    the step's output materialises every row with the metadata recorded here; when some row
    failed, the step yields one `AssetMaterialization` per finished row before it fails, so those
    rows count as materialised (the backfill and the UI see them) and a re-run from failure redoes
    only the failed rows. A step where no row succeeded may be retried (a transient outage); one
    where some rows succeeded is not, since a retry would redo every finished row.
    """

    def __init__(self, context: dg.AssetExecutionContext, asset_key: dg.AssetKey):
        self.context = context
        self.asset_key = asset_key
        self.done: dict[str, dict] = {}
        self.failed: dict[str, str] = {}

    def record(self, row: str, metadata: dict) -> None:
        self.done[row] = metadata
        self.context.add_asset_metadata(metadata, partition_key=row)

    def fail(self, row: str, message: str) -> None:
        self.failed[row] = message
        self.context.log.error(f"{self.asset_key.to_user_string()} row {row}: {message}")

    def finish(self):
        """Yield the step's result, or the finished rows' materialisations and then fail."""
        if not self.failed:
            yield dg.MaterializeResult()
            return
        for row, metadata in self.done.items():
            yield dg.AssetMaterialization(asset_key=self.asset_key, partition=row, metadata=metadata)
        shown = "; ".join(f"row {row}: {message}" for row, message in list(self.failed.items())[:20])
        more = f" (and {len(self.failed) - 20} more rows)" if len(self.failed) > 20 else ""
        raise dg.Failure(
            f"{len(self.failed)} of {len(self.failed) + len(self.done)} rows failed, "
            f"{len(self.done)} recorded as materialised: {shown}{more}",
            metadata={
                "failed rows": ", ".join(self.failed),
                "materialised rows": len(self.done),
            },
            allow_retries=not self.done,
        )
