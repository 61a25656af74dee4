"""The published Major TOM embedding expansions as read-only inputs, normalised on read.

The released sets (``hf://datasets/Major-TOM/Core-S2L1C-SSL4EO``, ``Core-S1RTC-SSL4EO``,
``Core-S2RGB-SigLIP``, ``Core-S2RGB-DINOv2``, or a local copy: one file or a folder) were written
by the public reference embedder, whose output differs from Table 2 (../shared/RELEASED_FORMAT.md).
Each difference is *detected*, never assumed, because other library versions may have written
other files:

* ``embedding`` as a variable-length ``list<float>``: every length is checked (the first bad row
  is named with its file) and the column becomes ``fixed_size_list<float32>[dim]``;
* ``geo`` metadata with ``crs: null`` and footprints whose rows and columns are swapped relative
  to ``pixel_bbox`` (or whose WKT has northing before easting): the UTM footprint is corrected
  from the evidence of each file and the CRS84 geometry, centre and antimeridian split are
  recomputed from it with the same code our own files use (`geoparquet.fragment_footprints`);
* ``unique_id`` made from a truncated numpy print: kept as published (never rewritten), flagged
  as unverifiable in the quirks report and in the view's file metadata;
* the DINOv2 set's double 1/255 rescale and resize/crop: not visible in the files, reported as a
  known quirk of that set so its vectors are not mistaken for ours.

Products read Table 2 partitions (`vectors.files`), so a released source is served to them as a
*view*: a storage root of normalised Table 2 files, one per grid row, written atomically and kept
until the source files change (their sizes, times or hashes are compared on every open).
`ReleasedView` is ``os.PathLike``, so every function that takes a storage root takes a view.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely

from majortom_assets import geoparquet, grid
from majortom_assets.remote import redact_text, redact_url, with_timeouts

HF_PREFIX = "hf://"
HF_ORG = "hf://datasets/Major-TOM/"
VIEW_MANIFEST = "released.json"
DEFAULT_SAMPLE_ROWS = 4096
DEFAULT_SAMPLE_FILES = 8

#: The four published sets: our model name, its width, and what is known about how it was made.
DATASETS: dict[str, dict[str, Any]] = {
    "Core-S2L1C-SSL4EO": {"model": "ssl4eo-s2", "dim": 2048, "fragment_size": 224, "source": "Core-S2L1C"},
    "Core-S1RTC-SSL4EO": {"model": "ssl4eo-s1", "dim": 2048, "fragment_size": 224, "source": "Core-S1RTC",
                          "known": "the reference SSL4EO-S1 preprocessing crashes as published "
                                   "(log10 misuse), so how this set was computed is not known"},
    "Core-S2RGB-SigLIP": {"model": "siglip-rgb", "dim": 1152, "fragment_size": 384, "source": "Core-S2L2A"},
    "Core-S2RGB-DINOv2": {"model": "dinov2-rgb", "dim": 768, "fragment_size": 224, "source": "Core-S2L2A",
                          "known": "inputs were rescaled by 1/255 twice (the model saw a near-constant "
                                   "image) and each fragment resized to 256 px and centre-cropped to 224: "
                                   "these vectors are not comparable with correctly preprocessed DINOv2"},
}
# Columns a released file must have for its rows to become Table 2 rows.
REQUIRED_COLUMNS = ("unique_id", "embedding", "timestamp", "product_id", "grid_cell",
                    "utm_footprint", "utm_crs", "pixel_bbox")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SWAP_TOLERANCE_M = 0.5


class ReleasedSourceUnavailable(RuntimeError):
    """A remote released set that could not be listed or read (network, permissions)."""


class ReleasedFormatError(ValueError):
    """A released file that cannot be normalised; the message names the file and the row."""


# ------------------------------------------------------------------------------------- sources
def dataset_of(url: str) -> str | None:
    """The published set a path or URL names (``.../Core-S2RGB-DINOv2/...``), or None."""
    for name in DATASETS:
        if re.search(rf"(^|[/\\]){re.escape(name)}($|[/\\._-])", url, flags=re.IGNORECASE):
            return name
    return None


def _open_fs(url: str, storage_options: dict | None = None):
    options = dict(storage_options or {})
    if url.startswith(HF_PREFIX):
        from majortom_assets.core import _hf_filesystem

        path = url[len(HF_PREFIX):].strip("/")
        parts = path.split("/")
        if len(parts) < 3 or parts[0] != "datasets" or not all(parts[:3]):
            raise ValueError(f"expected hf://datasets/<owner>/<name>[/path], got {redact_url(url)!r}")
        return _hf_filesystem(options), path
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    fs, path = fsspec.core.url_to_fs(url, **with_timeouts(protocol, options))
    return fs, path


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _version(info: dict) -> str:
    """A string that changes when the file does: content hashes where the store has them."""
    lfs = info.get("lfs") or {}
    for key in ("sha256", "oid"):
        if isinstance(lfs, dict) and lfs.get(key):
            return f"sha256:{lfs[key]}"
    for key in ("blob_id", "ETag", "etag", "md5", "crc32c"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_commit") or ""
    return f"size:{info.get('size')}:mtime:{mtime}"


@dataclass
class ReleasedSource:
    """One released set (a file or a folder of parquet files), opened read-only."""

    url: str                      # redacted: safe to show and store
    dataset: str | None
    model: str
    files: list[str]              # paths inside `fs`, sorted
    fs: Any = field(repr=False)

    @property
    def expected_dim(self) -> int | None:
        return DATASETS[self.dataset]["dim"] if self.dataset else None

    def open(self, path: str) -> pq.ParquetFile:
        if _is_local(self.fs):
            return pq.ParquetFile(path)
        return pq.ParquetFile(self.fs.open(path, "rb"))

    def versions(self) -> dict[str, str]:
        """File -> version (size + mtime locally; LFS sha256 / ETag remotely): cheap, no data read."""
        return {path: _version(self.fs.info(path)) for path in self.files}

    def display(self, path: str) -> str:
        """A file's name as users see it (the redacted source URL + the path inside it)."""
        return path if _is_local(self.fs) else f"{self.url.rstrip('/')}/{Path(path).name}"


def _list_parquet(fs, path: str, shown: str) -> list[str]:
    if not fs.exists(path):
        where = "" if _is_local(fs) else " (or cannot be reached)"
        raise FileNotFoundError(f"released source {shown} does not exist{where}")
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if p.endswith(".parquet")
                       and not Path(p).name.startswith("."))
        if not found:
            raise FileNotFoundError(f"released source {shown} holds no .parquet files")
        return found
    return [path]


def open_source(url: str | os.PathLike, model: str | None = None,
                storage_options: dict | None = None) -> ReleasedSource:
    """Open a released set: a parquet file or a folder (searched recursively), local or fsspec/hf://.

    ``model`` names the view's model; it must agree with the set the URL names, and is required
    only when the URL names none of the four published sets.
    """
    text = os.fspath(url)
    fs, path = _open_fs(text, storage_options)
    shown = redact_url(text)
    try:
        found = _list_parquet(fs, path, shown)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - httpx, aiohttp, botocore, hub errors alike: one line, URL redacted
        raise ReleasedSourceUnavailable(f"cannot read released source {shown}: "
                                        f"{type(exc).__name__}: {redact_text(exc)}") from None
    dataset = dataset_of(text)
    known = DATASETS[dataset]["model"] if dataset else None
    if model is not None and known is not None and model != known:
        raise ValueError(f"released set {dataset} holds {known} embeddings, not {model!r}")
    chosen = model or known
    if chosen is None:
        raise ValueError(f"cannot tell which model {shown} holds (its path names none of "
                         f"{', '.join(DATASETS)}); pass the model name")
    source = ReleasedSource(url=shown, dataset=dataset, model=chosen, files=[], fs=fs)
    for p in found:   # keep embedding files only (a folder may also hold metadata tables)
        names = source.open(p).schema_arrow.names
        if "embedding" in names:
            source.files.append(p)
    if not source.files:
        raise FileNotFoundError(f"released source {shown} holds no file with an 'embedding' column")
    return source


# -------------------------------------------------------------------------------- footprints
@dataclass(frozen=True)
class FootprintFix:
    """How one file's ``utm_footprint`` relates to its ``pixel_bbox`` (from the file's own rows)."""

    axis_swapped: bool | None       # WKT holds (northing, easting); None = not determinable
    transposed: bool | None         # footprint follows (col, row) instead of (row, col)
    evidence: int                   # samples with off-diagonal fragments that decided it


def _utm_boxes(wkt: np.ndarray, swapped: bool) -> np.ndarray:
    """(N, 4) [xmin, ymin, xmax, ymax] of WKT footprints, easting first."""
    b = shapely.bounds(shapely.from_wkt(wkt))
    if swapped:
        b = b[:, [1, 0, 3, 2]]
    return b


def _axis_swapped(wkt: np.ndarray, crs: np.ndarray, cells: np.ndarray) -> bool | None:
    """Compare each footprint's centre, read both ways, with its grid cell's location."""
    rows, cols = grid.parse_cell_names(cells)
    cell_lat, cell_lon = grid.get_grid().cell_centre(rows, cols)
    votes = []
    for code in np.unique(crs):
        sel = crs == code
        tr = geoparquet._to_wgs84(str(code))   # per-thread cache: a transformer costs ~10 ms to build
        b = shapely.bounds(shapely.from_wkt(wkt[sel]))
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        for swapped, (x, y) in ((False, (cx, cy)), (True, (cy, cx))):
            with np.errstate(all="ignore"):
                lon, lat = tr.transform(x, y)
            d = np.hypot(np.asarray(lat) - cell_lat[sel], ((np.asarray(lon) - cell_lon[sel] + 180) % 360) - 180)
            votes.append((swapped, np.nan_to_num(d, nan=1e9)))
    near = {False: 0, True: 0}
    for swapped, d in votes:
        near[swapped] += int((d < 1.0).sum())
    if near[False] == near[True]:
        return None
    return near[True] > near[False]


def detect_footprint_fix(table: pa.Table) -> FootprintFix:
    """Decide, from rows of one file, whether its UTM footprints are axis-swapped and/or transposed.

    Within one sample (grid_cell, product_id) all fragments share one image origin. With pixel
    size p, the correct reading gives origin x = xmin - p*col_start, y = ymax + p*row_start for
    every fragment; a transposed footprint gives the same constant only with row and column
    swapped. Samples whose fragments are all on the diagonal (row_start == col_start) cannot tell.
    """
    if table.num_rows == 0:
        return FootprintFix(None, None, 0)
    wkt = table.column("utm_footprint").to_numpy(zero_copy_only=False)
    swapped = _axis_swapped(wkt, table.column("utm_crs").to_numpy(zero_copy_only=False),
                            table.column("grid_cell").to_numpy(zero_copy_only=False))
    b = _utm_boxes(wkt, bool(swapped))
    box = _pixel_boxes(table.column("pixel_bbox"), "?", 0)
    side = np.maximum(box[:, 3] - box[:, 1], 1)
    p = (b[:, 2] - b[:, 0]) / side
    df = pd.DataFrame({
        "cell": table.column("grid_cell").to_numpy(zero_copy_only=False),
        "product": table.column("product_id").to_numpy(zero_copy_only=False),
        "ax": b[:, 0] - p * box[:, 1], "ay": b[:, 3] + p * box[:, 0],
        "tx": b[:, 0] - p * box[:, 0], "ty": b[:, 3] + p * box[:, 1],
        "off": box[:, 0] != box[:, 1],
    })
    g = df.groupby(["cell", "product"], sort=False)
    informative = g["off"].any()
    if not informative.any():
        return FootprintFix(swapped, None, 0)
    spread = g[["ax", "ay", "tx", "ty"]].agg(lambda s: s.max() - s.min())[informative]
    fits_a = (spread[["ax", "ay"]].max(axis=1) < _SWAP_TOLERANCE_M)
    fits_t = (spread[["tx", "ty"]].max(axis=1) < _SWAP_TOLERANCE_M)
    a, t = int((fits_a & ~fits_t).sum()), int((fits_t & ~fits_a).sum())
    if a == t:
        return FootprintFix(swapped, None, 0)
    return FootprintFix(swapped, t > a, max(a, t))


def _row(offset, i: int) -> int:
    """Row number in the file of position ``i`` of a batch: ``offset`` is the batch's first row,
    or (for a filtered batch) the file row of every position."""
    return int(offset[i]) if isinstance(offset, np.ndarray) else int(offset) + i


def _pixel_boxes(column: pa.ChunkedArray | pa.Array, where: str, offset: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != 4)
    if bad.size:
        raise ReleasedFormatError(f"{where}: row {_row(offset, int(bad[0]))}: pixel_bbox holds "
                                  f"{lengths[bad[0]]} values, expected 4")
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, 4)


def corrected_footprints(table: pa.Table, fix: FootprintFix, where: str = "?", offset: int = 0
                         ) -> geoparquet.Footprints:
    """Footprints that follow the pixel content: UTM WKT, CRS84 WKB (antimeridian-safe), centres."""
    n = table.num_rows
    wkt = table.column("utm_footprint").to_numpy(zero_copy_only=False)
    crs = table.column("utm_crs").to_numpy(zero_copy_only=False)
    b = _utm_boxes(wkt, bool(fix.axis_swapped))
    if fix.transposed:
        box = _pixel_boxes(table.column("pixel_bbox"), where, offset)
        p = (b[:, 2] - b[:, 0]) / np.maximum(box[:, 3] - box[:, 1], 1)
        shift = p * (box[:, 1] - box[:, 0])
        b = np.stack([b[:, 0] + shift, b[:, 1] + shift, b[:, 2] + shift, b[:, 3] + shift], axis=1)
    out = geoparquet.Footprints(np.empty(n, object), np.empty(n, object), np.empty(n), np.empty(n))
    # Map-unit "pixel boxes" through the affine (1, 0, 0, 0, -1, 0): x = col, y = -row.
    as_boxes = np.stack([-b[:, 3], b[:, 0], -b[:, 1], b[:, 2]], axis=1)
    for code in np.unique(crs):
        sel = np.flatnonzero(crs == code)
        try:
            feet = geoparquet.fragment_footprints(as_boxes[sel], (1.0, 0.0, 0.0, 0.0, -1.0, 0.0), str(code))
        except ValueError as exc:
            raise ReleasedFormatError(f"{where}: rows {_row(offset, int(sel[0]))}..: {exc}") from None
        out.geometry_wkb[sel] = feet.geometry_wkb
        out.utm_wkt[sel] = feet.utm_wkt
        out.centre_lat[sel] = feet.centre_lat
        out.centre_lon[sel] = feet.centre_lon
    return out


# ------------------------------------------------------------------------------ normalisation
def embedding_fixed(column: pa.ChunkedArray | pa.Array, where: str, offset: int,
                    dim: int | None = None) -> pa.FixedSizeListArray:
    """A variable-length (or fixed) list column as fixed_size_list<float32>[dim], checked row by row.

    ``dim`` defaults to the first row's length; the first row of another length (or a null) is
    named with its position in the file.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    typ = column.type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)):
        raise ReleasedFormatError(f"{where}: embedding column is {typ}, not a list of numbers")
    if column.null_count:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise ReleasedFormatError(f"{where}: row {_row(offset, first)}: embedding is null")
    n = len(column)
    if pa.types.is_fixed_size_list(typ):
        width = typ.list_size
        if dim is not None and width != dim:
            raise ReleasedFormatError(f"{where}: embeddings have {width} values, expected {dim}")
        values = column.flatten()
    else:
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        width = int(dim if dim is not None else (lengths[0] if n else 0))
        bad = np.flatnonzero(lengths != width)
        if bad.size:
            i = int(bad[0])
            raise ReleasedFormatError(f"{where}: row {_row(offset, i)}: embedding has {lengths[i]} values, "
                                      f"expected {width} ({bad.size} rows of this batch differ)")
        values = column.flatten()   # respects slicing offsets
    if values.null_count:
        raise ReleasedFormatError(f"{where}: rows {_row(offset, 0)}..{_row(offset, n - 1)}: embedding holds null values")
    values = values.cast(pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, width)


def _timestamps(column: pa.ChunkedArray, where: str) -> pa.Array:
    """Released timestamps are zone-less ISO strings: read as UTC (the acquisition times are UTC)."""
    if pa.types.is_timestamp(column.type):
        typ = column.type
        arr = column.combine_chunks()
        if typ.tz is None:
            arr = arr.cast(pa.timestamp(typ.unit, tz="UTC"))
        return arr.cast(pa.timestamp("us", tz="UTC"))
    try:
        ts = pd.to_datetime(column.to_numpy(zero_copy_only=False), utc=True, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise ReleasedFormatError(f"{where}: unreadable timestamp: {exc}") from None
    return pa.array(ts.as_unit("us"), pa.timestamp("us", tz="UTC"))


def normalise_table(table: pa.Table, fix: FootprintFix, where: str, offset: int = 0,
                    dim: int | None = None) -> pa.Table:
    """Released rows as Table 2 rows (schema `geoparquet.embedding_schema`); ids kept as published."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ReleasedFormatError(f"{where}: missing columns {missing}")
    emb = embedding_fixed(table.column("embedding"), where, offset, dim)
    cells = table.column("grid_cell").cast(pa.string()).combine_chunks()
    rows, cols = grid.parse_cell_names(cells.to_numpy(zero_copy_only=False))
    feet = corrected_footprints(table, fix, where, offset)
    boxes = _pixel_boxes(table.column("pixel_bbox"), where, offset)
    columns = {
        "unique_id": table.column("unique_id").cast(pa.string()).combine_chunks(),
        "embedding": emb,
        "grid_cell": cells,
        "grid_row_u": pa.array(np.asarray(rows, np.int32)),
        "grid_col_r": pa.array(np.asarray(cols, np.int32)),
        "product_id": table.column("product_id").cast(pa.string()).combine_chunks(),
        "timestamp": _timestamps(table.column("timestamp"), where),
        "geometry": pa.array(feet.geometry_wkb, pa.binary()),
        "utm_footprint": pa.array(feet.utm_wkt, pa.string()),
        "utm_crs": table.column("utm_crs").cast(pa.string()).combine_chunks(),
        "pixel_bbox": pa.FixedSizeListArray.from_arrays(pa.array(boxes.astype(np.int32).reshape(-1)), 4),
        "centre_lat": pa.array(feet.centre_lat),
        "centre_lon": pa.array(feet.centre_lon),
    }
    schema = geoparquet.embedding_schema(emb.type.list_size)
    return pa.Table.from_arrays([columns[n] for n in schema.names], schema=schema)


def _head(source: ReleasedSource, path: str, rows: int | None, columns: Sequence[str] | None = None) -> pa.Table:
    pf = source.open(path)
    if rows is None:
        return pf.read(columns=columns)
    parts, got = [], 0
    for batch in pf.iter_batches(batch_size=min(rows, 65_536), columns=columns):
        parts.append(batch)
        got += batch.num_rows
        if got >= rows:
            break
    if not parts:
        return pf.schema_arrow.empty_table().select(columns) if columns else pf.schema_arrow.empty_table()
    return pa.Table.from_batches(parts).slice(0, rows)


def file_fix(source: ReleasedSource, path: str, sample_rows: int = DEFAULT_SAMPLE_ROWS) -> FootprintFix:
    cols = ["grid_cell", "product_id", "pixel_bbox", "utm_footprint", "utm_crs"]
    return detect_footprint_fix(_head(source, path, sample_rows, cols))


def iter_normalised(source: ReleasedSource, path: str, batch_rows: int = 16_384,
                    rows: Sequence[int] | None = None) -> Iterator[pa.Table]:
    """Normalised Table 2 batches of one released file; ``rows`` keeps only these grid_row_u values.

    Row groups whose ``grid_row_u`` statistics exclude every wanted row are not read.
    """
    where = source.display(path)
    fix = file_fix(source, path)
    pf = source.open(path)
    wanted = None if rows is None else np.asarray(sorted({int(r) for r in rows}), np.int64)
    groups = list(range(pf.metadata.num_row_groups))
    if wanted is not None and "grid_row_u" in pf.schema_arrow.names:
        groups = [g for g in groups if _group_may_hold(pf, g, wanted)]
    offset = 0
    starts = np.concatenate([[0], np.cumsum([pf.metadata.row_group(g).num_rows
                                             for g in range(pf.metadata.num_row_groups)])])
    for g in groups:
        offset = int(starts[g])
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g]):
            table = pa.Table.from_batches([batch])
            keep = None
            if wanted is not None:
                if "grid_row_u" in table.column_names:
                    r = table.column("grid_row_u").to_numpy(zero_copy_only=False).astype(np.int64)
                else:
                    r = np.asarray(grid.parse_cell_names(table.column("grid_cell").to_numpy(
                        zero_copy_only=False))[0], np.int64)
                keep = np.isin(r, wanted)
            if keep is None or keep.all():
                yield normalise_table(table, fix, where, offset, source.expected_dim)
            elif keep.any():
                idx = np.flatnonzero(keep)
                sub = table.take(pa.array(idx))
                yield normalise_table(sub, fix, where, offset + idx, source.expected_dim)
            offset += table.num_rows


def _group_may_hold(pf: pq.ParquetFile, group: int, wanted: np.ndarray) -> bool:
    col = pf.schema_arrow.names.index("grid_row_u")
    stats = pf.metadata.row_group(group).column(col).statistics
    if stats is None or not stats.has_min_max:
        return True
    return bool(((wanted >= stats.min) & (wanted <= stats.max)).any())


def source_rows(source: ReleasedSource) -> dict[str, int]:
    """Grid row name -> fragment count over all files (reads one small column)."""
    counts: dict[int, int] = {}
    for path in source.files:
        pf = source.open(path)
        col = "grid_row_u" if "grid_row_u" in pf.schema_arrow.names else "grid_cell"
        for batch in pf.iter_batches(batch_size=262_144, columns=[col]):
            values = batch.column(0).to_numpy(zero_copy_only=False)
            if col == "grid_cell":
                values = grid.parse_cell_names(values)[0]
            r, c = np.unique(np.asarray(values, np.int64), return_counts=True)
            for row, count in zip(r.tolist(), c.tolist(), strict=True):
                counts[row] = counts.get(row, 0) + count
    return {str(grid.row_name(r)): counts[r] for r in sorted(counts)}


# ------------------------------------------------------------------------------------ quirks
@dataclass
class QuirkCheck:
    """One standard check: ``pass``, ``fail`` (a quirk, normalised or flagged) or ``unknown``."""

    name: str
    status: str
    detail: str
    files: list[str] = field(default_factory=list)


@dataclass
class QuirksReport:
    source: str
    dataset: str | None
    model: str
    files: int
    rows: int
    checked_rows: int
    checks: list[QuirkCheck]

    @property
    def failed(self) -> list[QuirkCheck]:
        return [c for c in self.checks if c.status == "fail"]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [f"# Quirks of {self.dataset or self.source}", "",
                 (f"source {self.source}, model {self.model}: {self.files} files, {self.rows} rows "
                 f"({self.checked_rows} rows inspected)"), "",
                 "| check | status | detail |", "|---|---|---|"]
        for c in self.checks:
            lines.append(f"| {c.name} | {c.status} | {c.detail.replace('|', '/')} |")
        return "\n".join(lines) + "\n"


def _reference_print_id(vec: np.ndarray) -> str:
    """The reference recipe as far as it can be reproduced: sha256 of numpy's (truncated) print."""
    return hashlib.sha256(str(vec).encode()).hexdigest()


class _Collect:
    def __init__(self) -> None:
        self.by_check: dict[str, dict[str, list[str]]] = {}

    def add(self, check: str, status: str, file: str, note: str = "") -> None:
        self.by_check.setdefault(check, {}).setdefault(status, []).append(file if not note else f"{file}: {note}")


def check_source(source: ReleasedSource, sample_rows: int | None = DEFAULT_SAMPLE_ROWS,
                 max_files: int | None = DEFAULT_SAMPLE_FILES) -> QuirksReport:
    """Which of the standard's checks each file of a released set fails. Nothing is raised for a
    quirk: it is reported.

    Footer checks (schema, metadata) cover every file; row checks read the first ``sample_rows``
    rows (None = all) of up to ``max_files`` files spread evenly over the set (None = all files),
    so a remote set of hundreds of shards is checked in a bounded number of reads.
    """
    col = _Collect()
    total = checked = 0
    n = len(source.files)
    sampled = set(range(n)) if max_files is None or n <= max_files else \
        set(np.linspace(0, n - 1, max_files).round().astype(int).tolist())
    for k, path in enumerate(source.files):
        where = source.display(path)
        pf = source.open(path)
        schema, meta = pf.schema_arrow, pf.metadata.metadata or {}
        total += pf.metadata.num_rows
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        col.add("required_columns", "fail" if missing else "pass", where, f"missing {missing}" if missing else "")
        etype = schema.field("embedding").type
        fixed = pa.types.is_fixed_size_list(etype)
        col.add("embedding_fixed_size", "pass" if fixed else "fail", where, "" if fixed else str(etype))
        f32 = pa.types.is_float32(etype.value_type) if hasattr(etype, "value_type") else False
        col.add("embedding_float32", "pass" if f32 else "fail", where, "" if f32 else str(etype))
        geo = json.loads(meta[b"geo"]) if b"geo" in meta else None
        gcol = (geo or {}).get("columns", {}).get("geometry", {})
        if geo is None:
            col.add("geo_crs_declared", "fail", where, "no geo metadata")
        elif gcol.get("crs", "absent") is None:
            col.add("geo_crs_declared", "fail", where, "crs: null (unknown CRS in GeoParquet 1.1)")
        else:
            col.add("geo_crs_declared", "pass", where)
        has_info = geoparquet.META_INFO in meta
        col.add("provenance_metadata", "pass" if has_info else "fail", where,
                "" if has_info else "no model/weights/provenance keys")
        if missing or k not in sampled:
            continue
        head = _head(source, path, sample_rows)
        checked += head.num_rows
        if not fixed and head.num_rows:
            lengths = pc.list_value_length(head.column("embedding").combine_chunks()).to_numpy(zero_copy_only=False)
            uniq = np.unique(lengths)
            col.add("embedding_lengths_equal", "pass" if len(uniq) == 1 else "fail", where,
                    f"lengths {uniq[:5].tolist()}" if len(uniq) != 1 else f"all {int(uniq[0])}")
        fix = detect_footprint_fix(head)
        col.add("utm_footprint_follows_pixels",
                "unknown" if fix.transposed is None else ("fail" if fix.transposed else "pass"), where,
                "rows and columns swapped relative to pixel_bbox" if fix.transposed else
                ("no off-diagonal fragments to tell" if fix.transposed is None else ""))
        col.add("utm_footprint_axis_order",
                "unknown" if fix.axis_swapped is None else ("fail" if fix.axis_swapped else "pass"), where,
                "WKT holds northing before easting" if fix.axis_swapped else "")
        if "geometry" in head.column_names and head.num_rows:
            geoms = shapely.from_wkb(head.column("geometry").to_numpy(zero_copy_only=False))
            b = shapely.bounds(geoms)
            wide = int(((b[:, 2] - b[:, 0]) > 180).sum())
            col.add("geometry_antimeridian_valid", "fail" if wide else "pass", where,
                    f"{wide} polygons span > 180° of longitude" if wide else "")
            feet = corrected_footprints(head, fix, where)
            stored = shapely.centroid(geoms)
            x, y = shapely.get_x(stored), shapely.get_y(stored)
            d = np.hypot(((x - feet.centre_lon + 180) % 360) - 180, y - feet.centre_lat)
            off = int(((d > 1e-3) & ((b[:, 2] - b[:, 0]) <= 180)).sum())
            col.add("geometry_follows_pixels", "fail" if off > 0 else "pass", where,
                    f"{off} stored geometries differ from the corrected footprint" if off > 0 else "")
        ids = head.column("unique_id").to_numpy(zero_copy_only=False)
        if head.num_rows:
            try:
                norm = normalise_table(head, fix, where, 0, source.expected_dim)
                emb = geoparquet.embedding_matrix(norm.column("embedding"))
                stored_geom = head.column("geometry") if "geometry" in head.column_names else norm.column("geometry")
                ours = geoparquet.unique_ids(stored_geom, norm.column("timestamp"), norm.column("product_id"), emb)
                k = min(len(ids), 64)
                printed = sum(_reference_print_id(emb[i]) == ids[i] for i in range(k))
                if (ours == ids).all():
                    col.add("unique_id_verifiable", "pass", where)
                else:
                    note = ("hash of numpy's truncated print of the vector: does not protect the embedding"
                            if printed == k else "not our recipe; cannot be recomputed")
                    col.add("unique_id_verifiable", "fail", where, note)
                dups = len(ids) - len(np.unique(ids))
                col.add("unique_id_unique", "fail" if dups else "pass", where, f"{dups} duplicates" if dups else "")
            except ReleasedFormatError as exc:
                col.add("normalisable", "fail", where, str(exc))
        hex_ok = all(_HEX64.match(str(i)) for i in ids[:256])
        col.add("unique_id_sha256_hex", "pass" if hex_ok else "fail", where)
        ts = head.column("timestamp")
        naive = not pa.types.is_timestamp(ts.type) or ts.type.tz is None
        col.add("timestamp_utc", "fail" if naive else "pass", where,
                "no time zone; read as UTC" if naive else "")
        if "grid_row_u" in head.column_names and head.num_rows:
            r, c = grid.parse_cell_names(head.column("grid_cell").to_numpy(zero_copy_only=False))
            ok = (np.asarray(r) == head.column("grid_row_u").to_numpy(zero_copy_only=False)).all() and \
                (np.asarray(c) == head.column("grid_col_r").to_numpy(zero_copy_only=False)).all()
            col.add("grid_ints_match_cell", "pass" if ok else "fail", where)
    checks = []
    for name, statuses in col.by_check.items():
        status = "fail" if "fail" in statuses else ("unknown" if "unknown" in statuses else "pass")
        entries = statuses.get(status, [])
        details = sorted({e.split(": ", 1)[1] for e in entries if ": " in e})
        checks.append(QuirkCheck(name, status, "; ".join(details) if status != "pass" else "",
                                 [e.split(": ", 1)[0] for e in entries] if status != "pass" else []))
    if source.dataset and DATASETS[source.dataset].get("known"):
        checks.append(QuirkCheck("preprocessing_as_standard", "fail",
                                 f"known quirk of {source.dataset}: {DATASETS[source.dataset]['known']}"))
    return QuirksReport(source.url, source.dataset, source.model, len(source.files), total, checked, checks)


# ------------------------------------------------------------------------------------- views
def view_info(source: ReleasedSource, dim: int) -> geoparquet.EmbeddingFileInfo:
    spec = DATASETS.get(source.dataset or "", {})
    return geoparquet.EmbeddingFileInfo(
        model=source.model, weights=f"released:{source.dataset or source.url}", random_weights=False,
        embedding_dim=dim, fragment_size=int(spec.get("fragment_size", 224)), target_overlap=0.1,
        source_collection=source.url,
        extra={"released": {"dataset": source.dataset, "source": source.url,
                            "unique_id": "as published; unverifiable (reference recipe hashes a "
                                         "truncated numpy print of the vector)",
                            "known": spec.get("known")}},
    )


def default_view_root(url: str, home: str | os.PathLike | None = None) -> Path:
    """Where the CLI keeps the view of a source: ``$MAJORTOM_HOME/released/<set>-<hash>``."""
    from majortom_assets.vectors.files import default_root

    shown = redact_url(os.fspath(url))
    if "://" not in shown:
        shown = str(Path(shown).expanduser().resolve())
    slug = (dataset_of(shown) or "source") + "-" + hashlib.sha256(shown.encode()).hexdigest()[:12]
    return Path(home if home is not None else default_root()) / "released" / slug


class ReleasedView(os.PathLike):
    """A storage root holding a released set as normalised Table 2 partitions (os.PathLike)."""

    def __init__(self, source: ReleasedSource, root: str | os.PathLike) -> None:
        from majortom_assets.layout import StorageLayout

        self.source = source
        self.layout = StorageLayout.at(root)
        self.root = self.layout.root

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"ReleasedView({self.source.url!r} -> {self.root})"

    @property
    def manifest_path(self) -> Path:
        return self.root / VIEW_MANIFEST

    def manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _write_manifest(self, data: dict) -> None:
        with geoparquet.atomic_output(self.manifest_path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, default=str))

    def refresh(self, rows: Sequence[str] | None = None, quirks: bool = True) -> list[str]:
        """Bring the view up to date for ``rows`` (all rows when None); returns the rows written.

        If any source file changed since the view was written, every partition is rewritten.
        Each partition is written atomically (`geoparquet.write_embeddings`).
        """
        from majortom_assets.layout import validate_row_key

        versions = self.source.versions()
        old = self.manifest()
        model_dir = self.layout.embeddings_dir(self.source.model)
        if old.get("versions") != versions or old.get("model") != self.source.model:
            if model_dir.exists():
                shutil.rmtree(model_dir)
            old = {}
        available = source_rows(self.source)
        wanted = list(available) if rows is None else [validate_row_key(r) for r in rows]
        unknown = [r for r in wanted if r not in available]
        if unknown:
            raise FileNotFoundError(f"released source {self.source.url} has no fragments in grid rows "
                                    f"{unknown}; it covers {len(available)} rows")
        done = set(old.get("rows", []))
        todo = [r for r in wanted if r not in done
                or not self.layout.embeddings_file(self.source.model, r).is_file()]
        for row in todo:
            self._write_row(row)
            done.add(row)
        report = old.get("quirks")
        if quirks and (report is None or todo):
            report = check_source(self.source).to_dict()
        self._write_manifest({"source": self.source.url, "dataset": self.source.dataset,
                              "model": self.source.model, "versions": versions,
                              "rows": sorted(done, key=grid.parse_row_name), "quirks": report})
        return todo

    def _write_row(self, row: str) -> Path:
        target = self.layout.embeddings_file(self.source.model, row)
        row_int = grid.parse_row_name(row)
        dim_holder: list[int] = []

        def tables() -> Iterator[pa.Table]:
            for path in self.source.files:
                for table in iter_normalised(self.source, path, rows=[row_int]):
                    if dim_holder and table.schema.field("embedding").type.list_size != dim_holder[0]:
                        raise ReleasedFormatError(f"{self.source.display(path)}: embeddings have "
                                                  f"{table.schema.field('embedding').type.list_size} values, "
                                                  f"other files {dim_holder[0]}")
                    yield table

        gen = tables()
        first = next(gen, None)
        if first is None:
            raise FileNotFoundError(f"no fragments of grid row {row} in {self.source.url}")
        dim_holder.append(first.schema.field("embedding").type.list_size)

        def chained() -> Iterator[pa.Table]:
            yield first
            yield from gen

        return geoparquet.write_embeddings(target, chained(), view_info(self.source, dim_holder[0]))

    def quirks(self) -> QuirksReport | None:
        data = self.manifest().get("quirks")
        if not data:
            return None
        data = dict(data)
        data["checks"] = [QuirkCheck(**c) for c in data["checks"]]
        return QuirksReport(**data)


def open_view(url: str | os.PathLike, root: str | os.PathLike | None = None, model: str | None = None,
              rows: Sequence[str] | None = None, storage_options: dict | None = None) -> ReleasedView:
    """Open a released set and bring its normalised view up to date (``rows`` only, if given)."""
    source = open_source(url, model=model, storage_options=storage_options)
    view = ReleasedView(source, root if root is not None else default_view_root(os.fspath(url)))
    view.refresh(rows)
    return view
