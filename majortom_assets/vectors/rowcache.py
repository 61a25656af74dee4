"""Which grid rows of a model changed since a global product last looked: the O(row) update rule.

A global product (PCA map, flat exports, change scores) keeps, next to its output, a small JSON
state naming every row it has absorbed with the *stamp* of that row's embedding file (size and
mtime in ns, taken with one ``stat`` call, never an open). On the next materialisation the current
stamps are compared with the recorded ones: rows that are new or whose file was rewritten are
re-read, rows that vanished are dropped, every other row costs one ``stat``. So adding or replacing
one row opens only that row's embedding file, whatever the size of the archive.

A row file rewritten in place within the file system's mtime resolution and to the same size would
go unnoticed; the embedding writer replaces files atomically (new inode, new mtime), so this does
not happen in this project, and ``--full`` rebuilds (``refresh=True``) are always available.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from majortom_assets import geoparquet
from majortom_assets.vectors import files

STATE_FORMAT = "majortom-row-state/1"


def stamp(path: str | os.PathLike) -> str:
    """``<size>:<mtime_ns>`` of a file: changes whenever the file is replaced or rewritten."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def current_rows(paths: Iterable[str | os.PathLike]) -> dict[str, tuple[Path, str]]:
    """row name -> (embedding file, stamp) for hive-partitioned row files (``row=<ROW>/...``)."""
    out: dict[str, tuple[Path, str]] = {}
    for p in paths:
        path = Path(p)
        row = files.partition_row(path)
        if row is None:
            raise ValueError(f"{path} is not inside a row=<ROW> folder; global products update by grid row")
        if row in out:
            raise ValueError(f"row {row} has two embedding files: {out[row][0]} and {path}")
        out[row] = (path, stamp(path))
    return out


@dataclass
class RowDiff:
    """Rows to read (added, changed), to drop (removed, changed) and to keep as they are."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def to_read(self) -> list[str]:
        return sorted(self.added + self.changed, key=_row_order)

    @property
    def to_drop(self) -> list[str]:
        return sorted(self.removed + self.changed, key=_row_order)

    @property
    def dirty(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def summary(self) -> dict[str, int]:
        return {"rows added": len(self.added), "rows replaced": len(self.changed),
                "rows removed": len(self.removed), "rows unchanged": len(self.unchanged)}


def _row_order(row: str):
    from majortom_assets.grid import parse_row_name

    return parse_row_name(row)


def diff(current: Mapping[str, tuple[Path, str]], recorded: Mapping[str, str]) -> RowDiff:
    """Compare current (file, stamp) per row with the stamps a product recorded."""
    out = RowDiff()
    for row, (_, st) in current.items():
        if row not in recorded:
            out.added.append(row)
        elif recorded[row] != st:
            out.changed.append(row)
        else:
            out.unchanged.append(row)
    out.removed = [row for row in recorded if row not in current]
    for name in ("added", "changed", "removed", "unchanged"):
        setattr(out, name, sorted(getattr(out, name), key=_row_order))
    return out


def load_state(path: str | os.PathLike) -> dict:
    """The JSON state of a product, or {} when there is none (first build) or it is unreadable."""
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        state = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return state if state.get("format") == STATE_FORMAT else {}


def save_state(path: str | os.PathLike, state: dict) -> Path:
    """Write the state atomically (a crash leaves the previous state, which forces a re-read)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with geoparquet.atomic_output(p) as tmp:
        Path(tmp).write_text(json.dumps({**state, "format": STATE_FORMAT}, indent=1, sort_keys=True))
    return p
