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
                "centre_lon", "pixel_bbox"]
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


def error_bound(precision: str, x: np.ndarray, scale=None) -> np.ndarray:
    """Largest allowed |x - decode(encode(x))| per element (the documented guarantee)."""
    if precision == "float32":
        return np.zeros_like(x)
    if precision == "float16":
        return np.maximum(np.abs(x) * 2.0 ** -11, 2.0 ** -25)
    ulp = np.spacing(np.abs(x).astype(np.float32) + np.abs(scale) * 128)  # float32 dequant rounding
    return np.broadcast_to(scale / 2.0, x.shape) * (1 + 1e-6) + 2 * ulp


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
        pq.write_table(pa.concat_tables(meta_parts), tmp / METADATA_FILE, compression="zstd")
        manifest = {
            "format": FORMAT, "model": model, "precision": precision, "dtype": np.dtype(
                {"float32": "<f4", "float16": "<f2", "int8": "i1"}[precision]).str,
            "dim": dim, "count": n, "order": "C", "file": _bin_name(precision),
            "bytes": n * dim * np.dtype(precision).itemsize, "sources": sources, **extra,
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
        path = d / manifest["file"]
        shape = (int(manifest["count"]), int(manifest["dim"]))
        expected = shape[0] * shape[1] * np.dtype(manifest["dtype"]).itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, manifest implies {expected}")
        codes = np.memmap(path, dtype=np.dtype(manifest["dtype"]), mode="r", shape=shape, order="C") \
            if shape[0] else np.zeros(shape, np.dtype(manifest["dtype"]))
        return cls(d, manifest, codes)

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def dim(self) -> int:
        return self.codes.shape[1]

    def __getitem__(self, index) -> np.ndarray:
        return decode(np.asarray(self.codes[index]), self.precision, self.scale, self.offset)

    def iter_batches(self, batch_rows: int = 65_536) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self), batch_rows):
            yield start, self[start:start + batch_rows]

    def metadata(self, columns=None) -> pa.Table:
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
    for src in flat.manifest["sources"]:
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
                bound = error_bound(flat.precision, x, flat.scale)
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
