"""Embeddings aggregated over any time window, and change between two windows told from noise.

Published embedding products come as fixed annual layers; here a window is any date range. The
unit of a window is an *acquisition*: per cell, the mean of the L2-normalised fragment vectors of
one product (``level="cell"``), or one fragment of one product (``level="fragment"``: same cell,
same pixel box, so the same ground at every date). Acquisition vectors are unit vectors u_j.

Per unit (cell or fragment) and window W with n acquisitions:

* ``centre``  the mean (or element-wise median) m_W of the u_j;
* ``spread``  s_W = sqrt(sum_j ||u_j - m_W||² / (n - 1)), the (unbiased) RMS distance of the
  acquisitions from the centre: how much the embedding moves between dates with no change of the
  ground (season, clouds, sensor noise). For the mean it is sqrt(sum over dimensions of the sample
  variance), which is how the SQL macro computes it; 0 for a single acquisition;
* ``count``   n.

Two windows A, B are compared with

    change_score = ||m_A - m_B||² / (s_A²/n_A + s_B²/n_B)

the squared distance between the window centres over its expected value if nothing changed (each
centre is a mean of n noisy acquisitions, so its own noise variance is s²/n). Unchanged ground
scores about 1 whatever its seasonal noise; a change scores far above (``changed`` uses
``threshold``, default 4). A window with a single acquisition has no spread of its own; the median
spread of all units with >= 2 acquisitions in that window (else in the other window) stands in
for it (``spread_pooled`` says when); with none in either window the score is NaN, not a guess. ``cosine_distance``
between the two normalised centres is reported beside it for reading. SQL: ``<view>_window`` and
``<view>_window_change`` in the catalog (`majortom_assets.vectors.sql`, docs/sql.md).

Memory: one row partition at a time (a cell lives in exactly one row partition); only scalar
statistics per unit are kept across partitions for the pooled spread.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from majortom_assets import geoparquet
from majortom_assets.vectors import files

Level = Literal["cell", "fragment"]
Statistic = Literal["mean", "median"]
DEFAULT_THRESHOLD = 4.0
_COLUMNS = ["embedding", "grid_cell", "product_id", "timestamp", "pixel_bbox"]
_WINDOW = re.compile(r"^\s*(\d{4}-\d{2}-\d{2})\s*/\s*(\d{4}-\d{2}-\d{2})\s*$")


class TimeWindow(BaseModel):
    """A closed range of days ``start/end`` (both included, UTC), e.g. ``2021-06-01/2021-08-31``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: date
    end: date

    @model_validator(mode="after")
    def _ordered(self) -> TimeWindow:
        if self.end < self.start:
            raise ValueError(f"window ends ({self.end}) before it starts ({self.start})")
        return self

    @classmethod
    def parse(cls, text: str | TimeWindow) -> TimeWindow:
        if isinstance(text, TimeWindow):
            return text
        m = _WINDOW.match(str(text))
        if not m:
            raise ValueError(f"time window {text!r}: expected START/END as ISO days, e.g. 2021-06-01/2021-08-31")
        try:
            return cls(start=date.fromisoformat(m.group(1)), end=date.fromisoformat(m.group(2)))
        except ValidationError as exc:
            reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise ValueError(f"time window {text!r}: {reason}") from None
        except ValueError as exc:   # not a calendar day (2021-02-30)
            raise ValueError(f"time window {text!r}: {exc}") from None

    @property
    def label(self) -> str:
        return f"{self.start.isoformat()}/{self.end.isoformat()}"

    @property
    def bounds_ns(self) -> tuple[np.datetime64, np.datetime64]:
        """[start 00:00, day after end 00:00) as naive-UTC datetime64[ns]."""
        lo = np.datetime64(self.start.isoformat(), "ns")
        return lo, np.datetime64(self.end.isoformat(), "ns") + np.timedelta64(1, "D")

    def arrow_filter(self) -> list[tuple]:
        """Row-group pruning on the timestamp statistics, for `geoparquet.read_table`."""
        lo = datetime.fromisoformat(self.start.isoformat())
        hi = datetime.fromisoformat(self.end.isoformat()) + pd.Timedelta(days=1)
        return [("timestamp", ">=", pd.Timestamp(lo, tz="UTC")), ("timestamp", "<", pd.Timestamp(hi, tz="UTC"))]


@dataclass
class Acquisitions:
    """Unit acquisition vectors of one partition inside one window, grouped by unit."""

    keys: pd.DataFrame      # one row per unit: grid_cell (+ r0, c0, r1, c1 for fragments)
    group: np.ndarray       # (A,) unit index of each acquisition
    vectors: np.ndarray     # (A, dim) unit vectors
    timestamps: np.ndarray  # (A,) datetime64[ns]


def _unit_keys(level: Level) -> list[str]:
    return ["grid_cell"] if level == "cell" else ["grid_cell", "r0", "c0", "r1", "c1"]


def acquisitions(table: pa.Table, window: TimeWindow, level: Level = "cell") -> Acquisitions:
    """Acquisition unit vectors of the rows of ``table`` inside ``window``."""
    if level not in ("cell", "fragment"):
        raise ValueError(f"level must be 'cell' or 'fragment', got {level!r}")
    times = files.timestamps_ns(table.column("timestamp"))
    lo, hi = window.bounds_ns
    inside = (times >= lo) & (times < hi)
    boxes = files.pixel_boxes(table.column("pixel_bbox"))[inside]
    frame = pd.DataFrame({
        "grid_cell": table.column("grid_cell").to_numpy(zero_copy_only=False)[inside],
        "product_id": table.column("product_id").to_numpy(zero_copy_only=False)[inside],
        "timestamp": times[inside],
        "r0": boxes[:, 0], "c0": boxes[:, 1], "r1": boxes[:, 2], "c1": boxes[:, 3],
    })
    x = files.l2_normalise(geoparquet.embedding_matrix(table.column("embedding"))[inside])
    keys = _unit_keys(level)
    acq_keys = keys + ["product_id"]
    acq_id, acq_index = _factorize(frame, acq_keys)
    vec = _group_mean(x, acq_id, len(acq_index))
    vec = files.l2_normalise(vec)                     # one unit vector per acquisition
    first = np.zeros(len(acq_index), np.int64)
    if len(acq_id):
        first[acq_id[::-1]] = np.arange(len(acq_id))[::-1]   # first row of each acquisition
    acq = frame.iloc[first].reset_index(drop=True)
    unit_id, unit_index = _factorize(acq, keys)
    return Acquisitions(unit_index, unit_id, vec, acq["timestamp"].to_numpy())


def _factorize(frame: pd.DataFrame, keys: Sequence[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """(group id per row, one row of key values per group, sorted by the keys)."""
    if frame.empty:
        return np.zeros(0, np.int64), pd.DataFrame({k: frame[k].iloc[:0] for k in keys})
    grouped = frame.groupby(list(keys), sort=True, observed=True)
    ids = grouped.ngroup().to_numpy(np.int64)
    index = grouped.size().index.to_frame(index=False)
    return ids, index


def _group_mean(x: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, x.shape[1]), np.float64)
    np.add.at(out, ids, x)
    counts = np.bincount(ids, minlength=n).astype(np.float64)
    return (out / np.maximum(counts, 1)[:, None]).astype(np.float32)


def _centres(acq: Acquisitions, statistic: Statistic) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre (U, dim), spread² (U,), count (U,)) per unit."""
    n_units = len(acq.keys)
    count = np.bincount(acq.group, minlength=n_units)
    if statistic == "mean":
        centre = _group_mean(acq.vectors, acq.group, n_units)
    elif statistic == "median":
        centre = np.zeros((n_units, acq.vectors.shape[1]), np.float32)
        order = np.argsort(acq.group, kind="stable")
        bounds = np.r_[0, np.cumsum(count)]
        for u in range(n_units):   # groups are a handful of dates: the loop is over units only
            centre[u] = np.median(acq.vectors[order[bounds[u]:bounds[u + 1]]], axis=0)
    else:
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    resid = acq.vectors - centre[acq.group]
    sq = np.einsum("ij,ij->i", resid, resid, dtype=np.float64)
    spread2 = np.bincount(acq.group, weights=sq, minlength=n_units) / np.maximum(count - 1, 1)
    return centre, spread2, count


def _partitions(paths) -> list[Path]:
    return files.as_paths(paths)


def _read(path: Path, windows: Sequence[TimeWindow]) -> pa.Table:
    """The partition's rows that can fall in any of the windows (row groups pruned by timestamp)."""
    lo = min(w.start for w in windows)
    hi = max(w.end for w in windows)
    span = TimeWindow(start=lo, end=hi)
    return geoparquet.read_table(path, columns=_COLUMNS, filters=span.arrow_filter())


def _key_frame(keys: pd.DataFrame, level: Level) -> pd.DataFrame:
    out = pd.DataFrame({"grid_cell": keys["grid_cell"].to_numpy()})
    if level == "fragment":
        out["pixel_bbox"] = [list(map(int, b)) for b in keys[["r0", "c0", "r1", "c1"]].to_numpy()]
    return out


def iter_window_stats(paths, window: TimeWindow | str, level: Level = "cell",
                      statistic: Statistic = "mean") -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Per partition: (unit table with count, spread, first/last date; centre vectors (U, dim))."""
    window = TimeWindow.parse(window)
    for path in _partitions(paths):
        acq = acquisitions(_read(path, [window]), window, level)
        if not len(acq.keys):
            continue
        centre, spread2, count = _centres(acq, statistic)
        frame = _key_frame(acq.keys, level)
        times = pd.Series(acq.timestamps)
        frame["acquisitions"] = count
        frame["spread"] = np.sqrt(spread2)
        frame["first"] = pd.to_datetime(times.groupby(acq.group).min().to_numpy(), utc=True)
        frame["last"] = pd.to_datetime(times.groupby(acq.group).max().to_numpy(), utc=True)
        yield frame, centre


def window_stats(paths, window: TimeWindow | str, level: Level = "cell", statistic: Statistic = "mean",
                 with_vectors: bool = True) -> pd.DataFrame:
    """One row per unit with acquisitions in the window: count, spread, dates and (optionally) the
    window embedding (the centre, L2-normalised, as a list column ``embedding``)."""
    window = TimeWindow.parse(window)
    parts = []
    for frame, centre in iter_window_stats(paths, window, level, statistic):
        if with_vectors:
            frame["embedding"] = list(files.l2_normalise(centre))
        parts.append(frame)
    if not parts:
        cols = list(_key_frame(pd.DataFrame(columns=_unit_keys(level)), level).columns)
        return pd.DataFrame(columns=["window", *cols, "acquisitions", "spread", "first", "last"])
    out = pd.concat(parts, ignore_index=True)
    out.insert(0, "window", window.label)
    return out


def _pair_stats(table: pa.Table, a: TimeWindow, b: TimeWindow, level: Level,
                statistic: Statistic) -> pd.DataFrame:
    acq_a, acq_b = acquisitions(table, a, level), acquisitions(table, b, level)
    if not len(acq_a.keys) or not len(acq_b.keys):
        return pd.DataFrame()
    ca, s2a, na = _centres(acq_a, statistic)
    cb, s2b, nb = _centres(acq_b, statistic)
    keys = _unit_keys(level)
    ka = acq_a.keys.assign(_ia=np.arange(len(acq_a.keys)))
    kb = acq_b.keys.assign(_ib=np.arange(len(acq_b.keys)))
    both = ka.merge(kb, on=keys, how="inner")
    ia, ib = both["_ia"].to_numpy(), both["_ib"].to_numpy()
    diff = ca[ia].astype(np.float64) - cb[ib]
    frame = _key_frame(both, level)
    frame["acquisitions_a"] = na[ia]
    frame["acquisitions_b"] = nb[ib]
    frame["spread_a2"] = s2a[ia]
    frame["spread_b2"] = s2b[ib]
    frame["distance2"] = np.einsum("ij,ij->i", diff, diff)
    frame["cosine_distance"] = 1.0 - np.einsum(
        "ij,ij->i", files.l2_normalise(ca[ia]).astype(np.float64), files.l2_normalise(cb[ib]))
    return frame


def compare_windows(paths, a: TimeWindow | str, b: TimeWindow | str, level: Level = "cell",
                    statistic: Statistic = "mean", threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """Change between two windows per unit present in both, highest ``change_score`` first.

    Columns: grid_cell (+ pixel_bbox), acquisitions_a/_b, spread_a/_b, cosine_distance,
    change_score, spread_pooled (a window's spread was borrowed, see the module docstring), changed.
    """
    a, b = TimeWindow.parse(a), TimeWindow.parse(b)
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    parts = []
    for path in _partitions(paths):
        frame = _pair_stats(_read(path, [a, b]), a, b, level, statistic)
        if len(frame):
            parts.append(frame)
    cols = ["grid_cell", *(["pixel_bbox"] if level == "fragment" else []), "acquisitions_a", "acquisitions_b",
            "spread_a", "spread_b", "cosine_distance", "change_score", "spread_pooled", "changed"]
    if not parts:
        return pd.DataFrame(columns=["window_a", "window_b", *cols])
    df = pd.concat(parts, ignore_index=True)
    floors = {}
    for side in ("a", "b"):
        own = df[f"acquisitions_{side}"].to_numpy() >= 2
        floors[side] = float(np.median(df[f"spread_{side}2"].to_numpy()[own])) if own.any() else np.nan
    pooled = np.zeros(len(df), bool)
    for side, other in (("a", "b"), ("b", "a")):
        floor = floors[side] if np.isfinite(floors[side]) else floors[other]
        own = df[f"acquisitions_{side}"].to_numpy() >= 2
        df[f"spread_{side}2"] = np.where(own, df[f"spread_{side}2"].to_numpy(), floor)
        pooled |= ~own
    df["spread_pooled"] = pooled
    noise = (df["spread_a2"] / df["acquisitions_a"] + df["spread_b2"] / df["acquisitions_b"]).to_numpy()
    d2 = df["distance2"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(noise > 0, d2 / noise, np.where(d2 > 0, np.inf, 0.0))
    df["change_score"] = np.where(np.isnan(noise), np.nan, score)
    df["spread_a"] = np.sqrt(df["spread_a2"])
    df["spread_b"] = np.sqrt(df["spread_b2"])
    df["changed"] = df["change_score"] > threshold
    df = df.sort_values(["change_score", "grid_cell"], ascending=[False, True], kind="stable", na_position="last")
    df.insert(0, "window_b", b.label)
    df.insert(0, "window_a", a.label)
    return df[["window_a", "window_b", *cols]].reset_index(drop=True)
