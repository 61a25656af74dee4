"""Reduced-precision, memory-mappable exports of a model's embeddings (paper §3.2).

Layout of an export directory (written atomically as a whole):

* ``embeddings.<dtype>.bin``  raw C-order (count, dim) matrix, little-endian, no header
* ``metadata.parquet``        one row per matrix row, same order: unique_id, grid_cell, grid_row_u,
  product_id, timestamp, centre_lat, centre_lon, pixel_bbox, source, source_row
* ``manifest.json``           dtype, dim, count, per-dimension scale/offset (int8), error bounds,
  source files with their sha256 and row counts

int8 codes are q = round((x - offset) / scale) clipped to [-127, 127] with offset = (max+min)/2
and scale = (max-min)/254 per dimension, so |x - (q·scale + offset)| <= scale/2 (plus float32
rounding of the dequantised value). float16 rounds to nearest: |x - x16| <= max(|x|·2⁻¹¹, 2⁻²⁵).
The GeoParquet stays the archive of record; this is a derived fast-read copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from majortom_assets.standard import EXPORT_PRECISIONS as PRECISIONS
from majortom_assets.standard import ExportPrecision as Precision
from majortom_assets.vectors import files

FORMAT = "majortom-flat-embeddings/1"
MANIFEST_FILE = "manifest.json"
METADATA_FILE = "metadata.parquet"
META_COLUMNS = ["unique_id", "grid_cell", "grid_row_u", "product_id", "timestamp", "centre_lat",
                "centre_lon", "pixel_bbox", "geometry"]
DECODING = "x = q * scale + offset (per dimension, in float32)"
_FP16_MAX = float(np.finfo(np.float16).max)


def _bin_name(precision: str) -> str:
    return f"embeddings.{precision}.bin"


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def _ranges(paths: list[Path], dim: int, batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.full(dim, np.inf, np.float32), np.full(dim, -np.inf, np.float32)
    for path in paths:
        for _, x, _ in files.iter_embeddings(path, batch_rows):
            if len(x):
                np.minimum(lo, x.min(axis=0), out=lo)
                np.maximum(hi, x.max(axis=0), out=hi)
    return lo, hi


def geo_metadata_table(table: pa.Table) -> pa.Table:
    """`table` whose ``geo`` key describes exactly the columns it has.

    Metadata copied from a Table 2 file says its geometry is a ``bbox``-covered column; once
    columns are selected that key may name columns that are gone (geopandas then refuses the
    file: "No geometry columns are included"). With a ``geometry`` column the key is kept with
    only that column and no covering, so the file is real GeoParquet; without one it is dropped.
    """
    meta = dict(table.schema.metadata or {})
    geo = meta.pop(b"geo", None)
    if geo is not None and "geometry" in table.column_names:
        doc = json.loads(geo)
        column = dict(doc.get("columns", {}).get("geometry", {}))
        column.pop("covering", None)
        meta[b"geo"] = json.dumps({**doc, "primary_column": "geometry", "columns": {"geometry": column}}).encode()
    return table.replace_schema_metadata(meta)


def _encoding_notes(precision: str) -> dict:
    """How to read the matrix without this package (issue 10 §2): dtype, byte order, formula."""
    notes = {"byte_order": "little-endian" if precision != "int8" else "n/a (1 byte)"}
    notes["decoding"] = DECODING if precision == "int8" else f"x = float32(q) ({precision} values as stored)"
    return notes


def int8_params(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (scale, offset) as float32; a constant dimension gets scale 1 (codes 0)."""
    lo64, hi64 = lo.astype(np.float64), hi.astype(np.float64)
    offset = ((hi64 + lo64) / 2).astype(np.float32)
    scale = np.where(hi64 > lo64, (hi64 - lo64) / 254.0, 1.0).astype(np.float32)
    return scale, offset


def encode(x: np.ndarray, precision: str, scale=None, offset=None, where: str = "") -> np.ndarray:
    if precision == "float32":
        return np.ascontiguousarray(x, dtype="<f4")
    if precision == "float16":
        if np.abs(x).max(initial=0.0) > _FP16_MAX:
            raise ValueError(f"{where}: values beyond ±{_FP16_MAX} do not fit float16; use int8 or float32")
        return x.astype("<f2")
    q = np.rint((x.astype(np.float64) - offset) / scale)
    return np.clip(q, -127, 127).astype(np.int8)


def decode(codes: np.ndarray, precision: str, scale=None, offset=None) -> np.ndarray:
    if precision == "int8":
        return codes.astype(np.float32) * scale + offset
    return np.asarray(codes, dtype=np.float32)


def error_bound(precision: str, x: np.ndarray, scale=None, offset=None) -> np.ndarray:
    """Largest allowed |x - decode(encode(x))| per element (the documented guarantee).

    With `offset` (int8), a value outside the coded range [offset - 127·scale, offset + 127·scale]
    is clipped, and its bound grows by its distance outside the range (rows added after the range
    was fitted may hold a few such values; the manifest counts them per row).
    """
    if precision == "float32":
        return np.zeros_like(x)
    if precision == "float16":
        return np.maximum(np.abs(x) * 2.0 ** -11, 2.0 ** -25)
    ulp = np.spacing(np.abs(x).astype(np.float32) + np.abs(scale) * 128)  # float32 dequant rounding
    bound = np.broadcast_to(scale / 2.0, x.shape) * (1 + 1e-6) + 2 * ulp
    if offset is not None:
        lo, hi = offset - 127.0 * scale, offset + 127.0 * scale
        bound = bound + np.maximum(np.maximum(lo - x, x - hi), 0.0)
    return bound


def export(
    paths, out_dir: str | os.PathLike, precision: Precision = "float16", model: str | None = None,
    batch_rows: int = files.DEFAULT_BATCH_ROWS, progress: bool = False,
) -> dict:
    """Stream the partitions into one flat matrix of the given precision; returns the manifest."""
    _check_precision(precision)
    paths = files.global_paths(paths)
    dim = files.common_dim(paths)
    n = files.row_count(paths)
    scale = offset = None
    extra: dict = {}
    if precision == "int8":
        lo, hi = _ranges(paths, dim, batch_rows)
        scale, offset = int8_params(lo, hi)
        extra = {"scale": scale.tolist(), "offset": offset.tolist(),
                 "max_abs_error": (scale / 2).tolist()}
    elif precision == "float16":
        extra = {"relative_error_bound": 2.0 ** -11, "absolute_error_floor": 2.0 ** -25}
    sources, meta_parts = [], []
    bar = tqdm(total=n, desc=f"export {precision}", unit="vec", disable=not progress)
    with files.atomic_directory(out_dir) as tmp:
        with open(tmp / _bin_name(precision), "wb") as fh:
            for si, path in enumerate(paths):
                rows = 0
                for offset_rows, x, meta in files.iter_embeddings(path, batch_rows, META_COLUMNS):
                    fh.write(encode(x, precision, scale, offset, where=str(path)).tobytes())
                    meta = meta.append_column("source", pa.array(np.full(len(x), si, np.int32)))
                    meta = meta.append_column("source_row", pa.array(
                        np.arange(offset_rows, offset_rows + len(x), dtype=np.int64)))
                    meta_parts.append(meta)
                    rows += len(x)
                    bar.update(len(x))
                sources.append({"path": str(path.resolve()), "rows": rows, "sha256": files.sha256_file(path)})
        bar.close()
        pq.write_table(geo_metadata_table(pa.concat_tables(meta_parts)), tmp / METADATA_FILE, compression="zstd")
        manifest = {
            "format": FORMAT, "model": model, "precision": precision, "dtype": np.dtype(
                {"float32": "<f4", "float16": "<f2", "int8": "i1"}[precision]).str,
            "dim": dim, "count": n, "order": "C", "file": _bin_name(precision),
            "bytes": n * dim * np.dtype(precision).itemsize, "sources": sources,
            **_encoding_notes(precision), **extra,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return manifest


class FlatEmbeddings:
    """Read-only, memory-mapped export; rows are dequantised to float32 only when asked for."""

    def __init__(self, directory: Path, manifest: dict, codes: np.ndarray) -> None:
        self.directory, self.manifest, self.codes = directory, manifest, codes
        self.precision: str = manifest["precision"]
        self.scale = np.asarray(manifest["scale"], np.float32) if self.precision == "int8" else None
        self.offset = np.asarray(manifest["offset"], np.float32) if self.precision == "int8" else None

    @classmethod
    def open(cls, directory: str | os.PathLike) -> FlatEmbeddings:
        d = Path(directory)
        if not (d / MANIFEST_FILE).is_file():
            raise FileNotFoundError(f"{d} is not an embedding export (no {MANIFEST_FILE})")
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        _check_precision(manifest.get("precision", "?"))
        if manifest.get("layout") == "rows":
            return cls._open_rows(d, manifest)
        path = d / manifest["file"]
        shape = (int(manifest["count"]), int(manifest["dim"]))
        expected = shape[0] * shape[1] * np.dtype(manifest["dtype"]).itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, manifest implies {expected}")
        codes = np.memmap(path, dtype=np.dtype(manifest["dtype"]), mode="r", shape=shape, order="C") \
            if shape[0] else np.zeros(shape, np.dtype(manifest["dtype"]))
        return cls(d, manifest, codes)

    @classmethod
    def _open_rows(cls, d: Path, manifest: dict) -> FlatEmbeddings:
        dtype, dim = np.dtype(manifest["dtype"]), int(manifest["dim"])
        parts = []
        for entry in manifest["rows"]:
            path = d / entry["file"]
            expected = int(entry["count"]) * dim * dtype.itemsize
            if path.stat().st_size != expected:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, manifest implies {expected}")
            parts.append(np.memmap(path, dtype=dtype, mode="r", shape=(int(entry["count"]), dim))
                         if entry["count"] else np.zeros((0, dim), dtype))
        return cls(d, manifest, _RowCodes(parts, dtype, dim))

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def sources(self) -> list[dict]:
        """(path, rows, sha256) of each source file in matrix order, for either layout."""
        if self.manifest.get("layout") == "rows":
            return [{"path": e["path"], "rows": e["count"], "sha256": e["sha256"]} for e in self.manifest["rows"]]
        return self.manifest["sources"]

    @property
    def dim(self) -> int:
        return self.codes.shape[1]

    def __getitem__(self, index) -> np.ndarray:
        return decode(np.asarray(self.codes[index]), self.precision, self.scale, self.offset)

    def iter_batches(self, batch_rows: int = 65_536) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self), batch_rows):
            yield start, self[start:start + batch_rows]

    def metadata(self, columns=None) -> pa.Table:
        if self.manifest.get("layout") == "rows":
            parts = [pq.read_table(self.directory / e["metadata"], columns=columns) for e in self.manifest["rows"]]
            return pa.concat_tables(parts) if parts else pa.table({})
        return pq.read_table(self.directory / METADATA_FILE, columns=columns)


@dataclass
class ExportCheck:
    rows: int = 0
    ok: bool = True
    max_abs_error: float = 0.0
    max_error_over_bound: float = 0.0  # <= 1 when within the stated bound
    problems: list[str] = field(default_factory=list)


def verify_export(directory: str | os.PathLike, check_sha256: bool = True,
                  batch_rows: int = files.DEFAULT_BATCH_ROWS) -> ExportCheck:
    """Re-read the source GeoParquet and compare row by row: ids aligned, values within bounds."""
    flat = FlatEmbeddings.open(directory)
    ids = flat.metadata(["unique_id"]).column("unique_id").to_numpy(zero_copy_only=False)
    out = ExportCheck()
    start = 0
    for src in flat.sources:
        path = Path(src["path"])
        if check_sha256 and files.sha256_file(path) != src["sha256"]:
            out.problems.append(f"{path}: sha256 differs from the export's manifest (source changed)")
        for _, x, meta in files.iter_embeddings(path, batch_rows, ["unique_id"]):
            stop = start + len(x)
            if stop > len(flat):
                out.problems.append(f"{path}: more rows than the export holds")
                break
            if not np.array_equal(meta.column("unique_id").to_numpy(zero_copy_only=False), ids[start:stop]):
                out.problems.append(f"{path}: unique_id order differs from the export in rows {start}..{stop - 1}")
            if flat.precision == "float32":
                if np.asarray(flat.codes[start:stop]).tobytes() != np.ascontiguousarray(x, "<f4").tobytes():
                    out.problems.append(f"{path}: float32 rows {start}..{stop - 1} are not bit-identical")
            else:
                err = np.abs(flat[start:stop].astype(np.float64) - x)
                bound = error_bound(flat.precision, x, flat.scale, flat.offset)
                out.max_abs_error = max(out.max_abs_error, float(err.max(initial=0.0)))
                ratio = float((err / bound).max(initial=0.0))
                out.max_error_over_bound = max(out.max_error_over_bound, ratio)
                if ratio > 1:
                    out.problems.append(f"{path}: rows {start}..{stop - 1} exceed the {flat.precision} error bound")
            start = stop
    out.rows = start
    if start != len(flat):
        out.problems.append(f"sources hold {start} rows, the export {len(flat)}")
    out.ok = not out.problems
    return out


# ------------------------------------------------------------------ per-row exports (incremental)
ROWS_FORMAT = "majortom-flat-embeddings-rows/1"
#: int8 ranges are widened by this fraction of their span on each side when fitted, so rows added
#: later mostly fall inside them and are encoded without touching any other row.
RANGE_MARGIN = 0.05
#: A new row may exceed the fitted int8 range by this fraction of its span before it forces a refit.
CLIP_TOLERANCE = 0.25


def _row_dir(out: Path, row: str) -> Path:
    from majortom_assets.layout import validate_row_key

    return out / "rows" / f"row={validate_row_key(row)}"


def _file_range(path: Path, dim: int, batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
    return _ranges([path], dim, batch_rows)


def _encode_row(path: Path, out: Path, row: str, tag: str, precision: str, scale, offset,
                batch_rows: int) -> dict:
    """One row's codes and GeoParquet metadata under versioned names (readers of the previous
    manifest keep reading the previous files until the new manifest replaces it)."""
    from majortom_assets import geoparquet

    d = _row_dir(out, row)
    d.mkdir(parents=True, exist_ok=True)
    bin_path, meta_path = d / f"embeddings-{tag}.{precision}.bin", d / f"metadata-{tag}.parquet"
    parts, rows, clipped = [], 0, 0
    with geoparquet.atomic_output(bin_path) as tmp, open(tmp, "wb") as fh:
        for offset_rows, x, meta in files.iter_embeddings(path, batch_rows, META_COLUMNS):
            fh.write(encode(x, precision, scale, offset, where=str(path)).tobytes())
            if precision == "int8":
                clipped += int((np.abs(x.astype(np.float64) - offset) > 127.5 * scale).sum())
            parts.append(meta.append_column("source_row", pa.array(
                np.arange(offset_rows, offset_rows + len(x), dtype=np.int64))))
            rows += len(x)
    table = pa.concat_tables(parts) if parts else pa.table({})
    with geoparquet.atomic_output(meta_path) as tmp:
        pq.write_table(geo_metadata_table(table), tmp, compression="zstd")
    return {"row": row, "count": rows, "clipped": clipped, "file": str(bin_path.relative_to(out)),
            "metadata": str(meta_path.relative_to(out)), "path": str(path.resolve()),
            "sha256": files.sha256_file(path)}


def update_export(
    paths, out_dir: str | os.PathLike, precision: Precision = "float16", model: str | None = None, *,
    refresh: bool = False, range_margin: float = RANGE_MARGIN, clip_tolerance: float = CLIP_TOLERANCE,
    batch_rows: int = files.DEFAULT_BATCH_ROWS,
) -> dict:
    """Bring a per-row export up to date with the row files `paths`: O(changed rows).

    Layout: ``manifest.json`` (format, dtype, byte order, decoding formula, int8 scale/offset, and
    per row its code file, metadata file, count and first matrix row) and ``rows/row=<ROW>/`` with
    ``embeddings-<tag>.<precision>.bin`` (C-order (count, dim), no header) and
    ``metadata-<tag>.parquet`` (GeoParquet, same row order). Rows whose embedding file kept its
    stamp (`rowcache`) are not opened. int8 scale/offset are fitted once from the per-row ranges
    (widened by `range_margin`); a new row inside them, or beyond them by less than `clip_tolerance`
    of the span (its few outliers clipped, counted per row in the manifest, the error bound of a
    clipped value growing by its distance outside), is encoded alone; a row further out refits the
    scale from the recorded ranges and re-encodes every row (reported as such).
    Returns the manifest plus what the update did. `FlatEmbeddings.open` reads it as one matrix.
    """
    from majortom_assets.vectors import rowcache

    _check_precision(precision)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path, ranges_path = out / "state.json", out / "ranges.npz"
    state = {} if refresh else rowcache.load_state(state_path)
    if state and (state.get("precision") != precision or not (out / MANIFEST_FILE).is_file()):
        state = {}
    current = rowcache.current_rows(paths)
    if not current:
        raise ValueError("no embedding files given")
    diff = rowcache.diff(current, state.get("rows", {}))
    entries: dict = {e["row"]: e for e in state.get("entries", [])}
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if precision == "int8" and ranges_path.is_file() and state:
        with np.load(ranges_path, allow_pickle=False) as z:
            ranges = {str(r): (lo, hi) for r, lo, hi in zip(z["rows"], z["lo"], z["hi"])}
    dim = state.get("dim")
    for row in diff.to_read:
        d = files.file_dim(current[row][0])
        if dim is not None and d != dim:
            raise ValueError(f"{current[row][0]}: embeddings of dimension {d}, the export's other rows have {dim}")
        dim = d
    for row in diff.removed:
        entries.pop(row, None)
        ranges.pop(row, None)
    scale = offset = None
    reencode = list(diff.to_read)
    refit = False
    if precision == "int8":
        for row in diff.to_read:
            ranges[row] = _file_range(current[row][0], dim, batch_rows)
        lo = np.min([r[0] for r in ranges.values()], axis=0)
        hi = np.max([r[1] for r in ranges.values()], axis=0)
        fitted = state.get("int8_range")
        if fitted is not None:
            flo, fhi = np.asarray(fitted[0], np.float32), np.asarray(fitted[1], np.float32)
        # a row beyond the fitted range by less than `clip_tolerance` of its span is clipped (the
        # manifest counts its clipped values); beyond that the range is refitted and all re-encoded
        if fitted is not None:
            slack = (fhi.astype(np.float64) - flo) * clip_tolerance
        refit = fitted is None or bool((lo < flo - slack).any() or (hi > fhi + slack).any())
        if refit:
            span = (hi.astype(np.float64) - lo) * range_margin
            flo, fhi = (lo - span).astype(np.float32), (hi + span).astype(np.float32)
            reencode = sorted(current, key=rowcache._row_order)
        scale, offset = int8_params(flo, fhi)
    written = []
    for row in reencode:
        tag = hashlib_tag(current[row][1], precision, scale)
        entries[row] = _encode_row(current[row][0], out, row, tag, precision, scale, offset, batch_rows)
        written.append(row)
    ordered = [entries[r] for r in sorted(current, key=rowcache._row_order)]
    start = 0
    for e in ordered:
        e["start"] = start
        start += e["count"]
    extra: dict = {}
    if precision == "int8":
        extra = {"scale": scale.tolist(), "offset": offset.tolist(), "max_abs_error": (scale / 2).tolist(),
                 "range_margin": range_margin}
    elif precision == "float16":
        extra = {"relative_error_bound": 2.0 ** -11, "absolute_error_floor": 2.0 ** -25}
    manifest = {
        "format": ROWS_FORMAT, "layout": "rows", "model": model, "precision": precision,
        "dtype": np.dtype({"float32": "<f4", "float16": "<f2", "int8": "i1"}[precision]).str,
        "dim": dim, "count": start, "order": "C", "bytes": start * dim * np.dtype(precision).itemsize,
        "rows": ordered, **_encoding_notes(precision), **extra,
    }
    from majortom_assets import geoparquet

    with geoparquet.atomic_output(out / MANIFEST_FILE) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=1))
    if precision == "int8":
        names = sorted(ranges, key=rowcache._row_order)
        with geoparquet.atomic_output(ranges_path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, rows=np.array(names), lo=np.stack([ranges[r][0] for r in names]),
                     hi=np.stack([ranges[r][1] for r in names]))
    rowcache.save_state(state_path, {
        "precision": precision, "dim": dim, "rows": {r: current[r][1] for r in current}, "entries": ordered,
        "int8_range": [flo.tolist(), fhi.tolist()] if precision == "int8" else None,
    })
    _remove_unlisted(out, ordered)
    return {**manifest, "update": {**diff.summary(), "rows read": len(diff.to_read), "rows encoded": len(written),
                                   "scale refit": refit, "clipped values": sum(e.get("clipped", 0) for e in ordered)}}


def hashlib_tag(stamp: str, precision: str, scale) -> str:
    """Version tag of a row's files: its source stamp and (int8) the scale it was encoded with."""
    import hashlib

    h = hashlib.sha256(f"{stamp}|{precision}".encode())
    if scale is not None:
        h.update(np.ascontiguousarray(scale, np.float32).tobytes())
    return h.hexdigest()[:12]


def _remove_unlisted(out: Path, entries: list[dict]) -> None:
    """Delete row files the manifest no longer names (after it was replaced), and empty row dirs."""
    keep = {out / e["file"] for e in entries} | {out / e["metadata"] for e in entries}
    base = out / "rows"
    if not base.is_dir():
        return
    for d in base.iterdir():
        for f in d.iterdir():
            if f.is_file() and f not in keep and not f.name.startswith("."):
                f.unlink()
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


class _RowCodes:
    """Row-wise concatenation of per-row memmaps that indexes like one (count, dim) array."""

    def __init__(self, parts: list[np.ndarray], dtype: np.dtype, dim: int) -> None:
        self.parts, self.dtype = parts, dtype
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), dim)
        self.itemsize = dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.shape[1]), self.dtype)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][idx[sel] - self.starts[p]]
        return out

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):
            return self[index[0]][(slice(None), *index[1:])]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                pieces = []
                for p, part in enumerate(self.parts):
                    lo, hi = max(start, self.starts[p]), min(stop, self.starts[p + 1])
                    if lo < hi:
                        pieces.append(np.asarray(part[lo - self.starts[p]:hi - self.starts[p]]))
                return np.concatenate(pieces) if pieces else np.empty((0, self.shape[1]), self.dtype)
            return self._rows(np.arange(start, stop, step))
        if np.ndim(index) == 0:
            i = int(index) + (len(self) if int(index) < 0 else 0)
            return self._rows(np.array([i]))[0]
        return self._rows(np.asarray(index, np.int64))

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)
