"""Major TOM Core collections: metadata filtering, one-row-group sample reads, band decoding.

A Core collection is ``metadata.parquet`` plus ``images/part_XXXXX.parquet`` shards holding one
sample per row group, each band a single-band GeoTIFF stored as bytes (STANDARD.md §1). The read
path is built for the embedding hot loop: a sample costs one ranged read of one row group (only
the requested columns), and its bands are decoded (``geotiff``) in a thread pool -- the codecs
release the GIL -- straight into one preallocated ``(bands, size, size)`` array.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, PositiveInt, field_validator, model_validator

from majortom_assets import geotiff, grid
from majortom_assets.remote import (
    RemoteTimeoutError,
    call_with_retries,
    redact_text,
    redact_url,
    with_timeouts,
)
from majortom_assets.standard import BAND_RESOLUTION_M, CORE_IMAGE_SIZE, NOMINAL_PIXEL_M, S1RTC_BANDS

METADATA_COLUMNS: tuple[str, ...] = (
    "grid_cell", "grid_row_u", "grid_col_r", "product_id", "timestamp", "cloud_cover", "nodata",
    "centre_lat", "centre_lon", "crs", "parquet_url", "parquet_row",
)
# Columns every metadata table must have: without them a sample cannot be found (parquet_*),
# named (grid_cell, product_id), filed under its grid row (grid_row_u / grid_col_r, checked
# against the name) or given the acquisition time its unique_id hashes (timestamp).
REQUIRED_METADATA_COLUMNS: tuple[str, ...] = ("grid_cell", "grid_row_u", "grid_col_r", "product_id",
                                              "timestamp", "parquet_url", "parquet_row")
#: What makes two metadata rows the same sample; Core's public metadata repeats some of them.
SAMPLE_KEY: tuple[str, ...] = ("grid_cell", "product_id", "timestamp")
METADATA_STAGE = "metadata"
DUPLICATE_STAGE = "duplicate"

HF_PREFIX = "hf://"
#: Land-cover labels per cell (grid_cell, class_id, class_name) beside a collection's metadata:
#: written by `synthetic`, read by the evaluation (`CoreCollection.labels`).
LABELS_FILE = "labels.parquet"
_IMAGES_FILE = re.compile(r"(?:^|/)images/([A-Za-z0-9_.\-]+\.parquet)$")
_CORE_TIMESTAMP_FORMAT = "%Y%m%dT%H%M%S"   # how Core metadata spells acquisition times


class SampleError(Exception):
    """A sample that cannot be read or decoded; names everything a user needs to find it."""

    def __init__(self, reason: str, *, product_id: str | None = None, grid_cell: str | None = None,
                 band: str | None = None, file: str | None = None) -> None:
        # reasons quote library errors and files may be remote URLs: neither may carry credentials
        self.reason, self.product_id, self.grid_cell = redact_text(reason), product_id, grid_cell
        self.band, self.file = band, (redact_url(file) if file is not None else None)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in (("product_id", self.product_id),
                                                  ("grid_cell", self.grid_cell), ("band", self.band),
                                                  ("file", self.file)) if v is not None)
        return f"{self.reason} ({where})" if where else self.reason

    def _extra(self) -> dict[str, Any]:
        """Constructor arguments of a subclass beyond the location (kept by pickling and relabelling)."""
        return {}

    def located(self, *, product_id: str | None, grid_cell: str | None, file: str | None) -> SampleError:
        """The same error (same class, reason and band) labelled with the sample it came from."""
        return type(self)(self.reason, product_id=product_id, grid_cell=grid_cell, band=self.band,
                          file=file, **self._extra())

    def __reduce__(self):   # keep the fields when the error crosses a process boundary
        return (_rebuild_sample_error, (self.reason, self.product_id, self.grid_cell, self.band, self.file,
                                        type(self), self._extra()))


def check_sample_identity(raw: Mapping[str, Any], product_id: str, grid_cell: str, *, parquet_row: Any,
                          file: str | None) -> None:
    """SampleError unless the row group read (`raw`, with its ``product_id`` / ``grid_cell``) holds
    the sample the metadata names; the error names the shard file and the row group."""
    if raw.get("product_id") != product_id or raw.get("grid_cell") != grid_cell:
        raise SampleError(f"row group {parquet_row} holds {raw.get('product_id')} / {raw.get('grid_cell')}, "
                          f"not the metadata's sample", product_id=product_id, grid_cell=grid_cell, file=file)


class BandSizeError(SampleError):
    """A band whose pixel size differs from its nominal resolution's share of the 10 m image.

    ``actual`` / ``expected`` are (height, width) in the band's own pixels; ``side_10m`` is the
    shorter side the band covers on the 10 m grid, so callers can tell "smaller than a fragment"
    from any other wrong size.
    """

    def __init__(self, reason: str, *, actual: tuple[int, int], expected: tuple[int, int],
                 resolution_m: int, **where: Any) -> None:
        self.actual, self.expected, self.resolution_m = tuple(actual), tuple(expected), int(resolution_m)
        super().__init__(reason, **where)

    @property
    def side_10m(self) -> int:
        return min(self.actual) * (self.resolution_m // NOMINAL_PIXEL_M)

    def _extra(self) -> dict[str, Any]:
        return {"actual": self.actual, "expected": self.expected, "resolution_m": self.resolution_m}


def _rebuild_sample_error(reason, product_id, grid_cell, band, file, cls=SampleError, extra=None) -> SampleError:
    return cls(reason, product_id=product_id, grid_cell=grid_cell, band=band, file=file, **(extra or {}))


@dataclass(frozen=True)
class SampleFailure:
    """A sample that was skipped, at which stage, and why (the reason names band/file when known).

    The one record of a skipped sample for every stage (shard copy, fragment grid, embedding);
    `failures_table` stores it. ``source`` is set where one list mixes collections (the fragment
    grid of a row covers every source); a failures file belongs to one source or model, so it is
    not a column there.
    """

    product_id: str
    grid_cell: str
    reason: str
    stage: str = ""   # "shard copy", "fragment grid", "decode", "invalid values", "fragment", "output rows"
    source: str = ""


#: Columns of every failures table (the shard copy's and each model partition's).
FAILURES_SCHEMA = pa.schema([pa.field("product_id", pa.string()), pa.field("grid_cell", pa.string()),
                             pa.field("stage", pa.string()), pa.field("reason", pa.string())])


def failures_table(failures: Sequence[SampleFailure]) -> pa.Table:
    return pa.table({name: pa.array([getattr(f, name) for f in failures], pa.string())
                     for name in FAILURES_SCHEMA.names}, schema=FAILURES_SCHEMA)


def failures_from_table(table: pa.Table) -> list[SampleFailure]:
    """Failures back from a table; files written before the ``stage`` column existed read as stage ''."""
    columns = {name: table.column(name).to_pylist() if name in table.column_names else [""] * table.num_rows
               for name in FAILURES_SCHEMA.names}
    return [SampleFailure(*values) for values in zip(columns["product_id"], columns["grid_cell"],
                                                      columns["reason"], columns["stage"], strict=True)]


_LOCATION_SUFFIX = re.compile(r" \((?:product_id|grid_cell|band|file)=[^()]*\)$")


def shorten_reason(reason: str, width: int = 240) -> str:
    """A reason cut to about ``width`` characters (more when its location is long) for a table.

    Only the middle of the message is dropped (long GDAL / Arrow texts): its start (what went
    wrong, e.g. "10 m band B04 is 96x96 px") and the trailing ``(product_id=..., grid_cell=...,
    band=..., file=...)`` of a SampleError are always kept whole.
    """
    if len(reason) <= width:
        return reason
    match = _LOCATION_SUFFIX.search(reason)
    location = match.group(0) if match else ""
    message = reason[: len(reason) - len(location)]
    room = max(120, width - len(location))   # the message keeps a useful start even beside a long path
    if len(message) > room:
        head = (room * 2) // 3
        message = message[:head] + " … " + message[len(message) - (room - head - 3):]
    return message + location


# --------------------------------------------------------------------------------------------
# metadata filter


class MetadataFilter(BaseModel):
    """Which samples to take from a collection's metadata. All given criteria must hold.

    ``bbox`` is (minlon, minlat, maxlon, maxlat) on the sample centres; minlon > maxlon means the
    box crosses the antimeridian. ``max_cloud_cover`` is in percent (Core's unit), ``max_nodata``
    a fraction. Naive datetimes are taken as UTC; ``start`` and ``end`` are inclusive.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: list[str] | None = None
    cells: list[str] | None = None
    bbox: tuple[float, float, float, float] | None = None
    start: datetime | None = None
    end: datetime | None = None
    max_cloud_cover: float | None = None
    max_nodata: float | None = None
    limit: PositiveInt | None = None

    @field_validator("rows")
    @classmethod
    def _check_rows(cls, rows: list[str] | None) -> list[str] | None:
        return None if rows is None else [grid.row_name(r) for r in grid.parse_row_names(rows)]

    @field_validator("cells")
    @classmethod
    def _check_cells(cls, cells: list[str] | None) -> list[str] | None:
        return None if cells is None else [grid.cell_name(r, c) for r, c in grid.parse_cell_list(cells)]

    @field_validator("bbox")
    @classmethod
    def _check_bbox(cls, bbox):
        return None if bbox is None else grid.check_bbox(bbox)

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    @field_validator("max_cloud_cover", "max_nodata")
    @classmethod
    def _non_negative(cls, value: float | None) -> float | None:
        if value is not None and value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _check_dates(self) -> MetadataFilter:
        if self.start is not None and self.end is not None and self.start > self.end:
            raise ValueError(f"start {self.start.isoformat()} is after end {self.end.isoformat()}")
        return self


def _to_utc_timestamps(values: pd.Series) -> pd.Series:
    """Core spells times '20230415T181919'; accept that, ISO strings, or real timestamps.

    Vectorised and never raising: a value that is neither (or missing) becomes NaT, for
    `validate_metadata` to reject that row alone with its cell and product named.
    """
    if pd.api.types.is_datetime64_any_dtype(values):
        return values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
    parsed = pd.Series(pd.DatetimeIndex(_core_times(values).astype("datetime64[ns]"), tz="UTC"), index=values.index)
    retry = parsed.isna() & values.notna()
    if retry.any():   # ISO strings or datetime objects; only the rows Core's format did not take
        parsed = parsed.copy()
        parsed[retry] = pd.to_datetime(values[retry], utc=True, format="ISO8601", errors="coerce")
    return parsed


_MONTH_DAYS = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], np.int64)


def _core_times(values: pd.Series) -> np.ndarray:
    """datetime64[s] of Core's fixed-width '20230415T181919' spellings, NaT for anything else.

    Pure integer arithmetic on the characters' code points (days from the civil date, checked
    against each month's length): pandas' strptime path for this format costs ~13 µs a row and
    numpy's string-to-int casts ~1 µs a field, too slow for a 2.25 M-row table.
    """
    out = np.full(len(values), np.datetime64("NaT"), dtype="datetime64[s]")
    try:
        arr = pa.array(values, type=pa.string(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):   # mixed objects: strings only (others retry as ISO)
        arr = pa.array([v if isinstance(v, str) else None for v in values], type=pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.buffers()[2] is None:
        return out
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset: arr.offset + len(arr) + 1].astype(np.int64)
    idx = np.flatnonzero(np.diff(offsets) == 15)
    if not len(idx):
        return out
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    codes = data[offsets[idx][:, None] + np.arange(15)].astype(np.int64)   # UTF-8 bytes: digits are ASCII
    d = codes - 48
    ok = (codes[:, 8] == ord("T")) & ((d[:, [*range(8), *range(9, 15)]] >= 0)
                                     & (d[:, [*range(8), *range(9, 15)]] <= 9)).all(axis=1)
    d = np.where(ok[:, None], d, 0)
    year = d[:, 0] * 1000 + d[:, 1] * 100 + d[:, 2] * 10 + d[:, 3]
    month, day = d[:, 4] * 10 + d[:, 5], d[:, 6] * 10 + d[:, 7]
    hour, minute, second = d[:, 9] * 10 + d[:, 10], d[:, 11] * 10 + d[:, 12], d[:, 13] * 10 + d[:, 14]
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_ok = (month >= 1) & (month <= 12)
    length = _MONTH_DAYS[np.where(month_ok, month, 0)] + ((month == 2) & leap)
    ok &= month_ok & (day >= 1) & (day <= length) & (hour < 24) & (minute < 60) & (second < 60)
    y = year - (month <= 2)   # days from 1970-01-01 of a proleptic Gregorian date (H. Hinnant)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + np.where(month > 2, -3, 9)) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    seconds = days * 86400 + hour * 3600 + minute * 60 + second
    out[idx[ok]] = seconds[ok].astype("datetime64[s]")
    return out


@dataclass
class MetadataSelection:
    """A validated metadata selection: the rows to process and the rows dropped, with reasons.

    ``dropped`` has one row per dropped metadata row: ``row`` (grid row name, '?' when even that
    is unknown), ``grid_cell``, ``product_id``, ``stage`` ('metadata': the row itself is bad;
    'duplicate': an earlier row holds the same (grid_cell, product_id, timestamp)) and ``reason``.
    """

    frame: pd.DataFrame
    dropped: pd.DataFrame

    @property
    def duplicates(self) -> int:
        return int((self.dropped["stage"] == DUPLICATE_STAGE).sum())

    @property
    def rejected(self) -> int:
        return int((self.dropped["stage"] == METADATA_STAGE).sum())

    def failures(self, row: str | None = None) -> list[SampleFailure]:
        """Dropped rows as SampleFailures (all, or of one grid row) for failure tables and summaries."""
        d = self.dropped if row is None else self.dropped[self.dropped["row"] == row]
        return [SampleFailure(str(p), str(c), str(r), str(s))
                for c, p, s, r in zip(d["grid_cell"], d["product_id"], d["stage"], d["reason"], strict=True)]

    def per_row(self) -> pd.DataFrame:
        """Per grid row: samples kept, duplicates dropped, rows rejected (rows with any of them)."""
        kept = (pd.Series(grid.row_name(self.frame["grid_row_u"].to_numpy().astype(np.int64)))
                .value_counts() if len(self.frame) else pd.Series(dtype=int))
        dup = self.dropped.loc[self.dropped["stage"] == DUPLICATE_STAGE, "row"].value_counts()
        bad = self.dropped.loc[self.dropped["stage"] == METADATA_STAGE, "row"].value_counts()
        table = pd.DataFrame({"samples": kept, "duplicates dropped": dup, "rows rejected": bad})
        table = table.fillna(0).astype(int).rename_axis("row").reset_index()
        return table.sort_values("row", kind="stable").reset_index(drop=True)

    def summary(self) -> str:
        """One line for a log or a CLI: what was dropped, per row ('' when nothing was)."""
        if self.dropped.empty:
            return ""
        rows = self.per_row()
        rows = rows[(rows["duplicates dropped"] > 0) | (rows["rows rejected"] > 0)]
        detail = ", ".join(f"{row}: {dup} duplicate(s), {bad} rejected" for row, dup, bad in
                           zip(rows["row"], rows["duplicates dropped"], rows["rows rejected"], strict=True))
        return (f"metadata: dropped {self.duplicates} duplicate row(s) (first kept) and rejected "
                f"{self.rejected} bad row(s) ({detail})")


_DROPPED_COLUMNS = ["row", "grid_cell", "product_id", "stage", "reason"]


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def validate_metadata(frame: pd.DataFrame, source: str = "metadata") -> MetadataSelection:
    """Check a metadata table up front, vectorised, so one bad row costs that row only.

    Table-level: a missing required column raises ValueError naming it (nothing could be
    processed). Row-level, each rejected with a reason naming the value: a ``grid_cell`` that is
    not a cell of the 10 km grid; ``grid_row_u`` / ``grid_col_r`` that disagree with the name (the
    sample would be filed under the wrong row); a missing or unparseable ``timestamp``; an empty
    ``product_id``; a missing ``parquet_url`` or negative / missing ``parquet_row``. Then rows
    repeating an earlier (grid_cell, product_id, timestamp) are dropped, the first kept.
    ``timestamp`` comes back as UTC datetimes. Only the bad rows are visited one by one.
    """
    missing = [c for c in REQUIRED_METADATA_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{source} lacks required column(s) {missing} (has {sorted(map(str, frame.columns))})")
    n = len(frame)
    frame = frame.reset_index(drop=True)
    cells = frame["grid_cell"].to_numpy(dtype=object)
    ok_cell, rows, cols = grid.valid_cells(cells)
    row_u = pd.to_numeric(frame["grid_row_u"], errors="coerce").to_numpy(np.float64)
    col_r = pd.to_numeric(frame["grid_col_r"], errors="coerce").to_numpy(np.float64)
    agree = (row_u == rows) & (col_r == cols)
    stamps = _to_utc_timestamps(frame["timestamp"])
    ok_time = stamps.notna().to_numpy()
    products = frame["product_id"]
    ok_product = (products.notna() & (products.astype(str).str.len() > 0)).to_numpy()
    ok_url = frame["parquet_url"].notna().to_numpy()
    prow = pd.to_numeric(frame["parquet_row"], errors="coerce").to_numpy(np.float64)
    ok_prow = np.isfinite(prow) & (prow >= 0) & (prow == np.floor(prow))
    good = ok_cell & agree & ok_time & ok_product & ok_url & ok_prow

    def row_label(i: int) -> str:
        """A dropped row's grid row for the report: the name's, else grid_row_u's, else '?'."""
        if ok_cell[i]:
            return str(grid.row_name(int(rows[i])))
        return str(grid.row_name(int(row_u[i]))) if np.isfinite(row_u[i]) else "?"

    dropped: list[tuple] = []
    raw_times = frame["timestamp"].to_numpy(dtype=object)
    for i in np.flatnonzero(~good):
        cell, product = _text(cells[i]), _text(products.iat[i])
        if not ok_cell[i]:
            reason = f"grid_cell {cells[i]!r} is not a cell of the 10 km grid (expected a name like '136U_496R')"
        elif not agree[i]:
            reason = (f"grid_row_u/grid_col_r ({_text(frame['grid_row_u'].iat[i])}, "
                      f"{_text(frame['grid_col_r'].iat[i])}) disagree with grid_cell {cell} "
                      f"(row {rows[i]}, col {cols[i]})")
        elif not ok_time[i]:
            reason = (f"timestamp {raw_times[i]!r} is missing or not a time "
                      f"(Core spells '20230415T181919'; ISO 8601 is accepted)")
        elif not ok_product[i]:
            reason = "product_id is missing"
        elif not ok_url[i]:
            reason = "parquet_url is missing"
        else:
            reason = f"parquet_row {_text(frame['parquet_row'].iat[i])!r} is not a row-group number"
        dropped.append((row_label(i), cell, product, METADATA_STAGE, f"metadata row rejected: {reason}"))

    # (grid_cell, product_id, timestamp) as three integers: hashing ints beats hashing strings
    product_codes, _ = pd.factorize(products[good])
    key = pd.DataFrame({"cell": rows[good] * (1 << 32) + cols[good],
                        "product": product_codes,
                        "time": stamps.array.asi8[good]})
    repeat = np.zeros(n, dtype=bool)
    repeat[np.flatnonzero(good)] = key.duplicated(keep="first").to_numpy()
    for i in np.flatnonzero(repeat):
        cell, product = str(cells[i]), str(products.iat[i])
        reason = (f"duplicate metadata row: {cell} / {product} at {stamps.iat[i].isoformat()} "
                  f"is listed more than once; the first is kept")
        dropped.append((row_label(i), cell, product, DUPLICATE_STAGE, reason))
    keep = good & ~repeat
    # one take for the whole table; the names are checked, so the ints are now exact
    kept = frame.loc[keep] if not keep.all() else frame.copy()
    kept["timestamp"] = stamps[keep]   # same index labels: aligned, stays datetime64[ns, UTC]
    kept["grid_row_u"] = rows[keep].astype(np.int32)
    kept["grid_col_r"] = cols[keep].astype(np.int32)
    kept["parquet_row"] = prow[keep].astype(np.int64)
    kept = kept.reset_index(drop=True)
    return MetadataSelection(kept, pd.DataFrame(dropped, columns=_DROPPED_COLUMNS))


# --------------------------------------------------------------------------------------------
# the collection


@dataclass
class CoreSample:
    """One decoded sample: pixels on the 10 m grid plus what is needed to georeference them."""

    product_id: str
    grid_cell: str
    timestamp: pd.Timestamp
    crs: str
    transform: tuple[float, ...]   # affine (a, b, c, d, e, f) of the 10 m pixel grid, rasterio order
    bands: tuple[str, ...]
    pixels: np.ndarray             # (len(bands), size, size)
    _nodata_fraction: float | None = field(default=None, repr=False)

    @property
    def nodata_fraction(self) -> float:
        """Share of pixels that are no-data (0, or NaN for S1) in every band; computed on demand."""
        if self._nodata_fraction is None:
            px = self.pixels
            empty = (px == 0) | np.isnan(px) if px.dtype.kind == "f" else px == 0
            self._nodata_fraction = float(np.logical_and.reduce(empty, axis=0).mean())
        return self._nodata_fraction


def _row_value(row: Any, name: str) -> Any:
    """A field of a metadata row given as a dict, a pandas Series or an itertuples() namedtuple."""
    if not isinstance(row, tuple) and hasattr(row, "__getitem__"):
        try:
            return row[name]
        except (KeyError, IndexError):
            pass
    if hasattr(row, name):
        return getattr(row, name)
    raise KeyError(f"metadata row has no {name!r} field")


def _hf_filesystem(storage_options: Mapping[str, Any]):
    from huggingface_hub import HfFileSystem

    if "token" in storage_options:
        raise ValueError("pass the Hugging Face token through the HF_TOKEN environment variable, "
                         "not storage_options (it must never reach logs or metadata)")
    # token=False stops huggingface_hub from picking up a cached login: only HF_TOKEN is used.
    return HfFileSystem(token=os.environ.get("HF_TOKEN") or False, **storage_options)


class CoreCollection:
    """A Core collection at a local path, an fsspec URL, or ``hf://datasets/<owner>/<name>``."""

    _FOOTER_CACHE_SIZE = 32

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        url = os.fspath(url)
        options = dict(storage_options or {})
        if url.startswith(HF_PREFIX):
            root = url[len(HF_PREFIX):].strip("/")
            parts = root.split("/")
            if len(parts) < 3 or parts[0] != "datasets" or not all(parts[:3]):
                raise ValueError(f"expected hf://datasets/<owner>/<name>, got {redact_url(url)!r}")
            self.fs = _hf_filesystem(options)
        else:
            protocol = fsspec.core.split_protocol(url)[0] or "file"
            self.fs, root = fsspec.core.url_to_fs(url, **with_timeouts(protocol, options))
            root = root.rstrip("/") or "/"
        # `url` is what users see (files, messages, metadata): never with credentials. The real one
        # went into `fs` above and is not kept.
        self.url, self.root = redact_url(url), root
        self._footers: OrderedDict[str, pq.FileMetaData] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:   # never storage_options: they may hold credentials
        return f"CoreCollection({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for decode worker processes: the filesystem travels, the lock and footer cache do not."""
        state = self.__dict__.copy()
        state["_footers"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- paths ---------------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if self.root != "/" else "/" + "/".join(parts)

    @property
    def metadata_path(self) -> str:
        return self._join("metadata.parquet")

    @property
    def labels_path(self) -> str:
        """Where the collection keeps its land-cover labels per cell (`LABELS_FILE`)."""
        return self._join(LABELS_FILE)

    def labels(self) -> pd.DataFrame:
        """The collection's labels (grid_cell, class_id, class_name): what the evaluation scores
        embeddings against. FileNotFoundError naming the collection when it has none (the
        synthetic collections have them; Major TOM Core does not)."""
        try:
            with call_with_retries(lambda: self.fs.open(self.labels_path, "rb"), self.labels_path,
                                   what=f"opening {LABELS_FILE}") as fh:
                return pd.read_parquet(fh)
        except RemoteTimeoutError:
            raise
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url} has no {LABELS_FILE} (grid_cell, class_id, class_name); "
                                    "the evaluation needs land-cover labels per cell") from None

    def shard_path(self, parquet_url: str) -> str:
        """Where a metadata ``parquet_url`` lives in *this* collection.

        Core metadata points at huggingface.co URLs; only the trailing ``images/<file>`` is kept so
        that a mirrored or synthetic collection reads its own shards wherever it is stored.
        """
        text = str(parquet_url).split("?", 1)[0].split("#", 1)[0]
        match = _IMAGES_FILE.search(text)
        if match is None:
            raise ValueError(f"parquet_url {parquet_url!r} does not end in images/<shard>.parquet")
        return self._join("images", match.group(1))

    # -- metadata ------------------------------------------------------------------------------
    @property
    def _is_local(self) -> bool:
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self.fs, LocalFileSystem)

    def _arrow_filesystem(self):
        if self._is_local:
            import pyarrow.fs as pafs

            return pafs.LocalFileSystem()
        return self.fs

    def metadata(self, flt: MetadataFilter | None = None) -> pd.DataFrame:
        """Metadata rows passing ``flt`` (STANDARD.md §1 columns; ``timestamp`` as UTC datetimes).

        Row, cell, bbox, cloud and no-data criteria are pushed into the parquet scan, so a
        170 MB Core metadata file is read only where its row-group statistics can match. Bad and
        duplicate rows are left out (`select` says which and why).
        """
        return self.select(flt).frame

    def select(self, flt: MetadataFilter | None = None) -> MetadataSelection:
        """The validated selection (`validate_metadata`): rows to process plus the rows dropped."""
        flt = flt or MetadataFilter()
        try:
            if not self._is_local:
                # pyarrow drops the cause of a remote error (a stalled server reads as "not
                # found"); ask fsspec first, whose errors keep it, so stalls are retried and named.
                call_with_retries(lambda: self.fs.info(self.metadata_path), self.metadata_path,
                                  what="opening metadata.parquet")
            dataset = call_with_retries(
                lambda: pads.dataset(self.metadata_path, format="parquet", filesystem=self._arrow_filesystem()),
                self.metadata_path, what="opening metadata.parquet")
        except RemoteTimeoutError:
            raise
        except (FileNotFoundError, OSError) as exc:
            raise FileNotFoundError(f"{self.url}: cannot open metadata.parquet ({redact_text(exc)})") from None
        names = set(dataset.schema.names)
        missing = [c for c in REQUIRED_METADATA_COLUMNS if c not in names]
        if missing:   # before any row is read: nothing could be processed without them
            raise ValueError(f"{self.url}: metadata.parquet lacks required column(s) {missing}; "
                             f"Core metadata has {list(METADATA_COLUMNS)}")

        def need(column: str, criterion: str) -> pc.Expression:
            if column not in names:
                raise ValueError(f"{self.url}: filter {criterion} needs metadata column {column!r}, "
                                 f"which this collection does not have (columns: {sorted(names)})")
            return pc.field(column)

        expr: pc.Expression | None = None

        def add(condition: pc.Expression) -> None:
            nonlocal expr
            expr = condition if expr is None else expr & condition

        if flt.rows is not None:
            add(need("grid_row_u", "rows").isin([grid.parse_row_name(r) for r in flt.rows]))
        if flt.cells is not None:
            add(need("grid_cell", "cells").isin(flt.cells))
        if flt.bbox is not None:
            minlon, minlat, maxlon, maxlat = flt.bbox
            lat, lon = need("centre_lat", "bbox"), need("centre_lon", "bbox")
            add((lat >= minlat) & (lat <= maxlat))
            add((lon >= minlon) & (lon <= maxlon) if minlon <= maxlon else (lon >= minlon) | (lon <= maxlon))
        if flt.max_cloud_cover is not None:
            add(need("cloud_cover", "max_cloud_cover") <= flt.max_cloud_cover)
        if flt.max_nodata is not None:
            add(need("nodata", "max_nodata") <= flt.max_nodata)
        if flt.start is not None or flt.end is not None:
            need("timestamp", "start/end")

        table = call_with_retries(lambda: dataset.to_table(filter=expr), self.metadata_path,
                                  what="reading metadata.parquet")
        selection = validate_metadata(table.to_pandas(), f"{self.url}: metadata.parquet")
        frame = selection.frame
        keep = np.ones(len(frame), dtype=bool)
        if flt.start is not None:
            keep &= (frame["timestamp"] >= pd.Timestamp(flt.start)).to_numpy()
        if flt.end is not None:
            keep &= (frame["timestamp"] <= pd.Timestamp(flt.end)).to_numpy()
        if not keep.all():
            frame = frame.loc[keep]
        if flt.limit is not None:
            frame = frame.iloc[: flt.limit]
        selection.frame = frame.reset_index(drop=True)
        return selection

    # -- samples -------------------------------------------------------------------------------
    def _footer(self, path: str, handle) -> pq.FileMetaData:
        """Shard footers are cached: a remote footer costs a round trip per sample otherwise."""
        with self._lock:
            meta = self._footers.get(path)
            if meta is not None:
                self._footers.move_to_end(path)
                return meta
        meta = pq.read_metadata(handle)
        with self._lock:
            self._footers[path] = meta
            while len(self._footers) > self._FOOTER_CACHE_SIZE:
                self._footers.popitem(last=False)
        return meta

    def read_raw(self, parquet_url: str, parquet_row: int, columns: Sequence[str], *,
                 product_id: str | None = None, grid_cell: str | None = None) -> dict[str, Any]:
        """The given columns of one row group (one sample) of a shard, read by byte range.

        ``product_id`` / ``grid_cell`` only label errors.
        """
        table = self._read_row_group(parquet_url, parquet_row, columns, product_id, grid_cell)
        return {name: table.column(name)[0].as_py() for name in table.column_names}

    def _read_row_group(self, parquet_url: str, parquet_row: int, columns: Sequence[str],
                        product_id: str | None, grid_cell: str | None) -> pa.Table:
        path = self.shard_path(parquet_url)
        columns = list(dict.fromkeys(columns))
        where = {"product_id": product_id, "grid_cell": grid_cell, "file": path}
        def read() -> pa.Table:
            with self.fs.open(path, "rb") as handle:
                meta = self._footer(path, handle)
                parquet = pq.ParquetFile(handle, metadata=meta)
                row = int(parquet_row)
                if not 0 <= row < parquet.num_row_groups:
                    raise SampleError(f"parquet_row {row} is outside the shard's "
                                      f"{parquet.num_row_groups} row groups", **where)
                present = set(parquet.schema_arrow.names)
                for column in columns:
                    if column not in present:
                        raise SampleError("column missing from shard", band=column, **where)
                return parquet.read_row_group(row, columns=columns)

        try:
            table = call_with_retries(read, path, what="reading the shard")
        except SampleError:
            raise
        except RemoteTimeoutError as exc:
            raise SampleError(str(exc), **where) from None
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise SampleError(f"cannot read shard: {type(exc).__name__}: {exc}", **where) from None
        if table.num_rows != 1:
            raise SampleError(f"row group {parquet_row} holds {table.num_rows} rows; Core shards hold "
                              f"one sample per row group", **where)
        return table

    def read_sample(self, row: Any, bands: Sequence[str], size: int = CORE_IMAGE_SIZE, *,
                    max_workers: int | None = None) -> CoreSample:
        """Read and decode one metadata row's sample; ids in the shard must match the metadata."""
        bands = tuple(bands)
        product_id, grid_cell = str(_row_value(row, "product_id")), str(_row_value(row, "grid_cell"))
        parquet_url = _row_value(row, "parquet_url")
        path = self.shard_path(parquet_url)
        columns = ["product_id", "grid_cell", *bands]
        if type(self).read_raw is CoreCollection.read_raw:   # band bytes stay in Arrow's buffers
            raw = _zero_copy_values(self._read_row_group(parquet_url, _row_value(row, "parquet_row"),
                                                         columns, product_id, grid_cell))
        else:   # a subclass hooks read_raw (fault injection, caching): honour it
            raw = self.read_raw(parquet_url, _row_value(row, "parquet_row"), columns,
                                product_id=product_id, grid_cell=grid_cell)
        check_sample_identity(raw, product_id, grid_cell, parquet_row=_row_value(row, "parquet_row"), file=path)
        pixels, crs, transform = decode_bands(raw, bands, size, product_id=product_id, grid_cell=grid_cell,
                                              file=path, max_workers=max_workers)
        try:
            expected_crs = _row_value(row, "crs")
        except KeyError:
            expected_crs = None
        if expected_crs is not None and isinstance(expected_crs, str) and expected_crs != crs:
            raise SampleError(f"GeoTIFF CRS {crs} differs from the metadata's {expected_crs}",
                              product_id=product_id, grid_cell=grid_cell, file=path)
        try:
            stamp = pd.Timestamp(_row_value(row, "timestamp"))
        except KeyError:
            stamp = pd.NaT
        if stamp is not pd.NaT:
            stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        return CoreSample(product_id=product_id, grid_cell=grid_cell, timestamp=stamp, crs=crs,
                          transform=transform, bands=bands, pixels=pixels)


def _zero_copy_values(table: pa.Table) -> dict[str, Any]:
    """One-row table -> {column: value}; binary values as memoryviews of Arrow's buffer.

    ``as_py()`` would copy ~8 MB of band bytes per S2 sample into fresh Python objects, which
    costs more (page faults included) than reading them (docs/benchmarks.md, "Embedding engine").
    """
    out: dict[str, Any] = {}
    for name in table.column_names:
        value = table.column(name)[0]
        if pa.types.is_binary(value.type) or pa.types.is_large_binary(value.type):
            out[name] = None if not value.is_valid else memoryview(value.as_buffer())
        else:
            out[name] = value.as_py()
    return out


# --------------------------------------------------------------------------------------------
# decoding

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_THREAD_ENV = threading.local()


def _gdal_env():
    """A GDAL environment for bands the direct decoder leaves to rasterio; none without rasterio."""
    if geotiff.rasterio_available():
        import rasterio

        return rasterio.Env()
    return contextlib.nullcontext()


def _enter_gdal_env() -> None:
    """Keep one GDAL environment per worker thread instead of one per rasterio.open call."""
    env = _gdal_env()
    env.__enter__()
    _THREAD_ENV.env = env


_POOLS_PID = os.getpid()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A shared decode pool per worker count; rebuilt after a fork (the child has no threads)."""
    global _POOLS_PID
    with _POOLS_LOCK:
        if _POOLS_PID != os.getpid():
            _POOLS.clear()
            _POOLS_PID = os.getpid()
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="majortom-decode",
                                                        initializer=_enter_gdal_env)
        return pool


def default_decode_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def output_dtype(bands: Sequence[str]) -> np.dtype:
    """float32 for S1 backscatter, uint16 for S2 reflectance (and its uint8 cloud mask)."""
    return np.dtype(np.float32) if all(b in S1RTC_BANDS for b in bands) else np.dtype(np.uint16)


@dataclass(frozen=True)
class _Decoded:
    band: str
    factor: int
    crs: str | None
    transform: tuple[float, ...]


def band_factor(band: str) -> int:
    """Upsampling factor of a band to the 10 m grid (1, 2 or 6), from its nominal resolution."""
    try:
        return BAND_RESOLUTION_M[band] // NOMINAL_PIXEL_M
    except KeyError:
        raise ValueError(f"unknown band {band!r}: no nominal resolution is declared for it "
                         f"(known: {sorted(BAND_RESOLUTION_M)})") from None


def _check_shape(height: int, width: int, count: int, size: int, band: str) -> int:
    """The band's upsampling factor; SampleError unless the band is exactly size/factor square."""
    if count != 1:
        raise SampleError(f"GeoTIFF has {count} bands, expected 1", band=band)
    factor = band_factor(band)
    resolution = BAND_RESOLUTION_M[band]
    if size % factor:
        raise SampleError(f"10 m image size {size} px is not a multiple of the {resolution} m band's "
                          f"factor {factor}", band=band)
    side = size // factor
    if (height, width) != (side, side):
        raise BandSizeError(f"{resolution} m band {band} is {height}×{width} px, expected {side}×{side}",
                            actual=(height, width), expected=(side, side), resolution_m=resolution, band=band)
    return factor


def check_band_values(native: np.ndarray, target: np.dtype, band: str) -> None:
    """SampleError unless a band stored as another dtype than its own holds only values that
    dtype keeps exactly (S2 bands are uint16 reflectances, S1 bands float32 backscatter).

    Without it an int16 band with negative values or a float64 band above 65535 was wrapped
    into uint16 and a float32 band's NaN became 0, each embedded as if it were data. Integer
    bands of another width pass when every value fits; float bands bound for uint16 must hold
    finite integers in range; float64 bound for float32 must stay finite (NaN is S1 no-data).
    Only called when the dtypes differ, so Core's own bands never pay for it.
    """
    target = np.dtype(target)
    kind = "S1 backscatter (float32)" if target.kind == "f" else "S2 reflectance (uint16)"
    what = f"band {band} is stored as {native.dtype}, not {target} ({kind})"
    if native.dtype.kind not in "uif":
        raise SampleError(f"{what}: {native.dtype} values cannot be read as {target}", band=band)
    if target.kind == "f":
        if native.dtype.kind == "f":
            finite = np.isfinite(native)
            if (np.abs(native, where=finite, out=np.zeros(native.shape, native.dtype))
                    > np.finfo(target).max).any():
                raise SampleError(f"{what}: values beyond the {target} range", band=band)
        return
    info = np.iinfo(target)
    if native.dtype.kind == "f":
        bad = ~np.isfinite(native)
        if bad.any():
            raise SampleError(f"{what}: {int(bad.sum())} pixel(s) are NaN or infinite; S2 bands have "
                              f"no NaN no-data (0 is no-data)", band=band)
        if (native != np.floor(native)).any():
            raise SampleError(f"{what}: non-integer values (e.g. {float(native[native != np.floor(native)][0])}); "
                              f"S2 bands are integer digital numbers", band=band)
    lo, hi = native.min(), native.max()
    if lo < info.min or hi > info.max:
        raise SampleError(f"{what}: values {lo}..{hi} lie outside {target}'s {info.min}..{info.max} "
                          f"and would wrap", band=band)


def _upsample_into(low: np.ndarray, out: np.ndarray, factor: int) -> None:
    # nearest neighbour: repeat columns once, then copy each widened row factor times
    # (4-8x faster than broadcasting into a (h, f, w, f) view or two np.repeat calls)
    height, size = low.shape[0], out.shape[-1]
    wide = np.repeat(low, factor, axis=1)
    out.reshape(height, factor, size)[...] = wide[:, None, :]


def _decode_into(data: Any, band: str, out: np.ndarray, size: int) -> _Decoded:
    """One band into its (size, size) slot: 10 m bands straight in, coarser ones upsampled."""
    if data is None:
        raise SampleError("band column is empty in this row group", band=band)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SampleError(f"band column holds {type(data).__name__}, not GeoTIFF bytes", band=band)
    try:
        with geotiff.open_band(data) as tiff:
            info = tiff.info
            factor = _check_shape(info.height, info.width, info.count, size, band)
            if info.dtype != out.dtype:   # not the band's own type: only lossless values may pass
                native = tiff.read()
                check_band_values(native, out.dtype, band)
                if factor == 1:
                    out[...] = native
                else:
                    _upsample_into(native.astype(out.dtype), out, factor)
            elif factor == 1:
                tiff.read(out)
            else:
                _upsample_into(tiff.read(), out, factor)
    except geotiff.GeoTiffError as exc:
        raise SampleError(str(exc), band=band) from None
    return _Decoded(band, factor, info.crs, info.transform)


def decode_bands(raw: Mapping[str, Any], bands: Sequence[str], size: int = CORE_IMAGE_SIZE, *, product_id: str,
                 grid_cell: str, file: str | None = None, max_workers: int | None = None,
                 dtype: np.dtype | str | None = None) -> tuple[np.ndarray, str, tuple[float, ...]]:
    """Decode GeoTIFF band bytes into ``(len(bands), size, size)`` on the 10 m grid.

    Each band must be exactly ``size / factor`` px square, its factor fixed by its nominal
    resolution (``BAND_RESOLUTION_M``): a band of any other size raises ``BandSizeError`` rather
    than being stretched. 20 m and 60 m bands are upsampled by nearest neighbour (block repeat). CRS and
    transform come from a 10 m band; if none was requested they are derived from the coarsest
    band's transform (same origin, pixel size divided by its factor).
    """
    bands = tuple(bands)
    if not bands:
        raise ValueError("no bands requested")
    if len(set(bands)) != len(bands):
        raise ValueError(f"bands repeat: {bands}")
    where = {"product_id": product_id, "grid_cell": grid_cell, "file": file}
    for band in bands:
        band_factor(band)   # ValueError for a band without a declared resolution, before any work
    for band in bands:
        if band not in raw:
            raise SampleError("band column missing from the sample", band=band, **where)
    pixels = np.empty((len(bands), size, size), dtype=np.dtype(dtype) if dtype else output_dtype(bands))
    workers = default_decode_workers() if max_workers is None else max(1, int(max_workers))

    def one(i: int) -> _Decoded:
        return _decode_into(raw[bands[i]], bands[i], pixels[i], size)

    try:
        if workers == 1 or len(bands) == 1:
            with _gdal_env():
                decoded = [one(i) for i in range(len(bands))]
        else:
            decoded = list(_pool(workers).map(one, range(len(bands))))
    except SampleError as exc:
        raise exc.located(**where) from None

    reference = next((d for d in decoded if d.factor == 1), None)
    if reference is None:
        coarse = max(decoded, key=lambda d: d.factor)
        a, b, c, d, e, f = coarse.transform
        k = coarse.factor
        transform = (a / k, b / k, c, d / k, e / k, f)
        crs = coarse.crs
    else:
        transform, crs = reference.transform, reference.crs
    if crs is None:
        raise SampleError("GeoTIFF has no CRS", band=(reference or decoded[0]).band, **where)
    for d in decoded:   # bands must share the 10 m grid's origin and scale
        a, _, c, _, e, f = d.transform
        if (abs(c - transform[2]) > 1e-6 * max(1.0, abs(c)) or abs(f - transform[5]) > 1e-6 * max(1.0, abs(f))
                or abs(a - transform[0] * d.factor) > 1e-9 * abs(a) or abs(e - transform[4] * d.factor) > 1e-9 * abs(e)):
            raise SampleError(f"band grid {d.transform} does not align with the 10 m grid {transform} "
                              f"(factor {d.factor})", band=d.band, **where)
    return pixels, crs, transform
