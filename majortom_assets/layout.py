"""The storage layout of docs/architecture.md, with every path kept inside the storage root.

Partition keys and asset names arrive from the UI, the CLI and sensors; they are validated here
(grid rows with `grid.parse_row_name`, and re-rendered so `0136U` or `136U/../x` never reach
the file system) before any path is built from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from majortom_assets import grid
from majortom_assets.standard import EXPORT_PRECISIONS

#: `reports/comparison/`: multi-model reports; no model may take the name.
COMPARISON = "comparison"
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StoragePathError(ValueError):
    """A partition key or name that would build a path outside the storage root."""


def validate_row_key(key: str) -> str:
    """Return the canonical row name of a partition key, or raise naming the bad key."""
    try:
        row = grid.parse_row_name(key)
    except (ValueError, TypeError) as exc:
        raise StoragePathError(
            f"partition key {key!r} is not a Major TOM grid row (e.g. 136U, 12D): {exc}"
        ) from None
    canonical = str(grid.row_name(row))
    if canonical != key:
        raise StoragePathError(f"partition key {key!r} is not canonical; use {canonical!r}")
    return canonical


def _segment(value: str | int, what: str) -> str:
    text = str(value)
    if not _SEGMENT.match(text) or ".." in text:
        raise StoragePathError(f"{what} {text!r} may only use letters, digits, '_', '-', '.'")
    return text


@dataclass(frozen=True)
class StorageLayout:
    """Paths of every stage's files under one storage root (`$MAJORTOM_HOME`)."""

    root: Path

    @classmethod
    def at(cls, home: str | Path) -> StorageLayout:
        return cls(Path(home).expanduser().resolve())

    @classmethod
    def of_sql_database(cls, path: str | Path) -> StorageLayout:
        """The layout whose `sql_database()` is `path` (``<root>/sql/<file>``): the root its views
        read their relative paths from."""
        path = Path(path).expanduser().resolve()
        if path.parent.name != "sql":
            raise StoragePathError(f"{path} is not in a storage root's sql/ folder; give the storage root "
                                   "its views read from")
        return cls(path.parent.parent)

    def inside(self, *parts: str | int) -> Path:
        """Join validated segments under the root; refuses anything that resolves outside it."""
        path = self.root.joinpath(*(str(p) for p in parts)).resolve()
        if path != self.root and self.root not in path.parents:
            raise StoragePathError(f"path {path} is outside the storage root {self.root}")
        return path

    # --- Core collections and their local row copies -------------------------------------
    def collection_dir(self, name: str) -> Path:
        return self.inside("collections", _segment(name, "collection"))

    def selection_file(self, source: str) -> Path:
        """The filtered metadata selection of one collection (the core metadata asset)."""
        return self.inside("shards", _segment(source, "source"), "selection.parquet")

    def shard_dir(self, source: str, row: str) -> Path:
        """A row's local mini Core collection: metadata.parquet + samples.parquet."""
        return self.inside("shards", _segment(source, "source"), f"row={validate_row_key(row)}")

    # --- derived products ---------------------------------------------------------------
    def fragments_file(self, size: int, row: str) -> Path:
        return self.inside("fragments", f"{int(size)}px", f"row={validate_row_key(row)}", "fragments.parquet")

    def embeddings_dir(self, model: str) -> Path:
        return self.inside("embeddings", _segment(model, "model"))

    def embeddings_file(self, model: str, row: str) -> Path:
        return self.inside(
            "embeddings", _segment(model, "model"), f"row={validate_row_key(row)}", "embeddings.parquet"
        )

    def failures_file(self, model: str, row: str) -> Path:
        return self.inside(
            "failures", _segment(model, "model"), f"row={validate_row_key(row)}", "failures.parquet"
        )

    def map_dir(self, model: str) -> Path:
        return self.inside("maps", _segment(model, "model"))

    def index_dir(self, model: str) -> Path:
        return self.inside("indexes", _segment(model, "model"))

    def export_dir(self, model: str, precision: str) -> Path:
        if precision not in EXPORT_PRECISIONS:
            raise StoragePathError(f"export precision {precision!r} is not one of {EXPORT_PRECISIONS}")
        return self.inside("exports", _segment(model, "model"), precision)

    def report_dir(self, model: str) -> Path:
        if model == COMPARISON:
            raise StoragePathError(f"model name {model!r} is reserved for reports/{COMPARISON}/")
        return self.inside("reports", _segment(model, "model"))

    def comparison_report_dir(self) -> Path:
        """Reports that put several models side by side (an evaluation of more than one model)."""
        return self.inside("reports", COMPARISON)

    def evaluation_dir(self, models: list[str] | tuple[str, ...]) -> Path:
        """Where an evaluation of `models` writes evaluation.json / .md: the model's own report
        folder for one model (what the `vectors/<model>/evaluation` asset writes), the
        comparison folder for several, whichever of the CLI or Dagster runs it."""
        if not models:
            raise ValueError("an evaluation needs at least one model")
        return self.report_dir(models[0]) if len(models) == 1 else self.comparison_report_dir()

    def change_dir(self, model: str) -> Path:
        """Change scores between consecutive dates (`vectors/<model>/change`), per row:
        ``cells/row=<ROW>/cells.parquet`` and ``fragments/row=<ROW>/fragments.parquet``."""
        return self.inside("reports", _segment(model, "model"), "change")

    def window_change_file(self, model: str) -> Path:
        """Change between two time windows per cell (`timeseries/<model>/window_change`)."""
        return self.inside("reports", _segment(model, "model"), "window_change.parquet")

    def sql_database(self) -> Path:
        """The DuckDB catalog of views over every model's embeddings (`vectors/sql_catalog`)."""
        return self.inside("sql", "majortom.duckdb")

    def embedding_files(self, model: str) -> list[Path]:
        """Existing per-row embedding files of a model, in row-name order (for global assets)."""
        base = self.embeddings_dir(model)
        files = []
        for path in sorted(base.glob("row=*/embeddings.parquet")):
            try:
                validate_row_key(path.parent.name.removeprefix("row="))
            except StoragePathError:
                continue  # a stray folder never feeds a global product
            files.append(path)
        return files
