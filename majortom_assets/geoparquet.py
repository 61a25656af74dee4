"""Table 2 embedding files: schema, fragment footprints, unique ids, atomic GeoParquet 1.1 I/O.

The file format is specified in docs/standard.md; this module is its only writer. Everything on
the per-fragment path is vectorised (numpy / shapely 2 / pyarrow); the only per-row Python loop is
the sha256 of the unique ids, which is C-level hashing over slices of one contiguous buffer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import socket
import stat
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata as _pkg_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import shapely
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from majortom_assets.remote import redact_url

STANDARD_VERSION = "majortom-embeddings/1.0"
GEOPARQUET_VERSION = "1.1.0"
RANDOM_WEIGHTS_WARNING = "EMBEDDINGS FROM RANDOMLY INITIALISED WEIGHTS - NOT FOR SCIENCE"
WGS84 = "OGC:CRS84"

META_INFO = b"majortom"
META_MODEL = b"majortom:model"
META_WEIGHTS = b"majortom:weights"
META_RANDOM = b"majortom:random_weights"
META_WARNING = b"majortom:warning"
META_GEO = b"geo"
META_CONTENT = b"majortom:content"   # row count + digest of the file's rows and provenance

# Columns whose values repeat a lot (dictionary encoding pays) and columns whose min/max
# statistics are useful for predicate push-down; the others would only bloat the footer.
_DICTIONARY_COLUMNS = ["unique_id", "grid_cell", "product_id", "utm_crs"]
_STATISTICS_COLUMNS = ["grid_cell", "grid_row_u", "grid_col_r", "product_id", "timestamp",
                       "centre_lat", "centre_lon"]
_HASHED_COLUMNS = ["unique_id", "geometry", "timestamp", "product_id", "embedding"]
_GEOMETRY_TYPE_NAMES = {0: "Point", 1: "LineString", 3: "Polygon", 4: "MultiPoint",
                        5: "MultiLineString", 6: "MultiPolygon", 7: "GeometryCollection"}
_U64 = struct.Struct("<Q")


# --------------------------------------------------------------------------------------- schema
def embedding_schema(dim: int) -> pa.Schema:
    """Table 2 as one Arrow schema; every column is required (non-null)."""
    if int(dim) <= 0:
        raise ValueError(f"embedding dimension must be positive, got {dim}")

    def req(name: str, typ: pa.DataType) -> pa.Field:
        return pa.field(name, typ, nullable=False)

    return pa.schema([
        req("unique_id", pa.string()),
        req("embedding", pa.list_(pa.float32(), int(dim))),
        req("grid_cell", pa.string()),
        req("grid_row_u", pa.int32()),
        req("grid_col_r", pa.int32()),
        req("product_id", pa.string()),
        req("timestamp", pa.timestamp("us", tz="UTC")),
        req("geometry", pa.binary()),
        req("utm_footprint", pa.string()),
        req("utm_crs", pa.string()),
        req("pixel_bbox", pa.list_(pa.int32(), 4)),
        req("centre_lat", pa.float64()),
        req("centre_lon", pa.float64()),
    ])


# ----------------------------------------------------------------------------------- footprints
@dataclass
class Footprints:
    """Per-fragment footprints, aligned with the input boxes."""

    geometry_wkb: np.ndarray  # object array of bytes: WGS84 (OGC:CRS84) ISO WKB, little-endian, 2D
    utm_wkt: np.ndarray       # object array of str: UTM rectangle, WKT, millimetre precision
    centre_lat: np.ndarray    # float64
    centre_lon: np.ndarray    # float64 in [-180, 180)


_thread_state = threading.local()


def _to_wgs84(crs: str) -> pyproj.Transformer:
    """One Transformer per CRS and thread (pyproj transformers are not thread-safe)."""
    cache = getattr(_thread_state, "transformers", None)
    if cache is None:
        cache = _thread_state.transformers = {}
    transformer = cache.get(crs)
    if transformer is None:
        try:
            transformer = pyproj.Transformer.from_crs(crs, WGS84, always_xy=True)
        except pyproj.exceptions.CRSError as exc:
            raise ValueError(f"unknown CRS {crs!r}: {exc}") from exc
        cache[crs] = transformer
    return transformer


def _pixel_to_map(transform: Sequence[float], rows: np.ndarray, cols: np.ndarray):
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    return c + a * cols + b * rows, f + d * cols + e * rows


def _ring_coords(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, 4) corners -> (N, 5, 2) closed rings."""
    ring = np.stack([x, y], axis=-1)
    return np.concatenate([ring, ring[:, :1]], axis=1)


def _split_antimeridian(rings: np.ndarray) -> np.ndarray:
    """Polygons for lon/lat rings; rings that jump across +-180 become two-part MultiPolygons.

    Fragments are at most a few km wide, so a longitude span > 180 degrees can only mean the
    ring crosses the antimeridian. Such a ring is unwrapped to [0, 360), cut at 180 and the
    eastern half shifted back by -360 (RFC 7946 section 3.1.9).
    """
    lon = rings[..., 0]
    crossing = (lon.max(axis=1) - lon.min(axis=1)) > 180.0
    polygons = shapely.polygons(rings)
    if not crossing.any():
        return polygons
    unwrapped = rings[crossing].copy()
    unwrapped[..., 0] = np.where(unwrapped[..., 0] < 0.0, unwrapped[..., 0] + 360.0, unwrapped[..., 0])
    whole = shapely.polygons(unwrapped)
    west = shapely.intersection(whole, shapely.box(0.0, -90.0, 180.0, 90.0))
    east = shapely.intersection(whole, shapely.box(180.0, -90.0, 360.0, 90.0))
    east = shapely.transform(east, lambda xy: xy - np.array([360.0, 0.0]))
    parts = np.stack([west, east], axis=1)
    # A ring that only touches 180 (a vertex exactly on it) leaves an empty or line-like half.
    keep = (shapely.get_type_id(parts) == 3) & (shapely.area(parts) > 0.0)
    split = np.empty(len(parts), dtype=object)
    both = keep.all(axis=1)
    split[both] = shapely.multipolygons(parts[both])
    single = keep.sum(axis=1) == 1
    split[single] = parts[single][keep[single]]
    polygons[crossing] = split
    return polygons


def fragment_footprints(boxes: np.ndarray, transform: Sequence[float], crs: str) -> Footprints:
    """Footprints of pixel boxes [row_start, col_start, row_end, col_end] of one image.

    Corners map through the affine as x = c + a*col + b*row, y = f + d*col + e*row, so column
    offsets move east and row offsets south (the reference code swaps them). Rings keep only
    the four corners: a straight lon/lat edge departs from the true UTM edge by < 3 m for
    fragments up to 384 px anywhere within +-85 degrees latitude (docs/standard.md).
    """
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
    if len(tuple(transform)) < 6:
        raise ValueError(f"transform must be an affine (a, b, c, d, e, f), got {transform!r}")
    boxes = boxes.astype(np.float64)
    r0, c0, r1, c1 = boxes.T
    # bottom-left, bottom-right, top-right, top-left for a north-up image: CCW in map space.
    rows = np.stack([r1, r1, r0, r0], axis=1)
    cols = np.stack([c0, c1, c1, c0], axis=1)
    x, y = _pixel_to_map(transform, rows, cols)
    utm = shapely.orient_polygons(shapely.polygons(_ring_coords(x, y)), exterior_cw=False)

    transformer = _to_wgs84(crs)
    lon, lat = transformer.transform(x.ravel(), y.ravel())
    cx, cy = _pixel_to_map(transform, (r0 + r1) / 2.0, (c0 + c1) / 2.0)
    centre_lon, centre_lat = transformer.transform(cx, cy)
    lon = np.asarray(lon).reshape(x.shape)
    lat = np.asarray(lat).reshape(y.shape)
    centre_lon, centre_lat = np.asarray(centre_lon, np.float64), np.asarray(centre_lat, np.float64)
    if not (np.isfinite(lon).all() and np.isfinite(lat).all()):
        raise ValueError(f"fragment corners fall outside the valid area of {crs}")

    wgs84 = _split_antimeridian(_ring_coords(lon, lat))
    wgs84 = shapely.orient_polygons(wgs84, exterior_cw=False)
    return Footprints(
        geometry_wkb=shapely.to_wkb(wgs84, hex=False, output_dimension=2, byte_order=1,
                                    include_srid=False, flavor="iso"),
        utm_wkt=shapely.to_wkt(utm, rounding_precision=3, trim=True, output_dimension=2),
        centre_lat=centre_lat,
        centre_lon=(centre_lon + 180.0) % 360.0 - 180.0,
    )


# ----------------------------------------------------------------------------------- unique ids
def _utc_microseconds(values: Any, n: int) -> np.ndarray:
    """Any timestamp input (scalar or sequence; naive means UTC) -> datetime64[us] of length n."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        typ = values.type
        if pa.types.is_timestamp(typ) and typ.tz is None:
            values = values.cast(pa.timestamp(typ.unit, tz="UTC"))
        arr = values.cast(pa.timestamp("us", tz="UTC")).to_numpy(zero_copy_only=False)
        arr = arr.astype("datetime64[us]")
    elif isinstance(values, np.ndarray) and np.issubdtype(values.dtype, np.datetime64):
        arr = values.astype("datetime64[us]")  # numpy datetimes are naive: UTC by convention
    elif np.ndim(values) == 0:
        ts = pd.Timestamp(values)
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        arr = np.full(n, ts.tz_localize(None).to_datetime64(), dtype="datetime64[us]")
    else:
        index = pd.DatetimeIndex(pd.to_datetime(values, utc=True))
        arr = index.tz_localize(None).to_numpy().astype("datetime64[us]")
    if len(arr) != n:
        raise ValueError(f"expected {n} timestamps, got {len(arr)}")
    if np.isnat(arr).any():
        raise ValueError("timestamps must not be missing")
    return arr


def _iso_utc(us: np.ndarray) -> np.ndarray:
    return np.char.add(np.datetime_as_string(us, unit="us"), "+00:00")


def _as_sequence(values: Any, n: int, what: str) -> Sequence:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_pylist()
    elif isinstance(values, (str, bytes)):
        return [values] * n
    if len(values) != n:
        raise ValueError(f"expected {n} {what}, got {len(values)}")
    return values


def unique_ids(geometry_wkb, timestamps, product_ids, embeddings: np.ndarray) -> np.ndarray:
    """sha256 hex per row over length-prefixed fields (recipe in docs/standard.md).

    For each of geometry WKB, ISO-8601 UTC timestamp with microseconds, product_id (UTF-8) and the
    embedding as little-endian float32 bytes: 8-byte little-endian length, then the bytes. Scalar
    timestamps / product ids are broadcast.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, dim), got shape {emb.shape}")
    if emb.dtype != np.float32:
        raise ValueError(f"embeddings must be float32 (the stored dtype), got {emb.dtype}")
    n, dim = emb.shape
    flat = memoryview(np.ascontiguousarray(emb, dtype="<f4")).cast("B")
    row_bytes = dim * 4
    emb_len = _U64.pack(row_bytes)
    geoms = _as_sequence(geometry_wkb, n, "geometries")
    stamps = _iso_utc(_utc_microseconds(timestamps, n))
    products = _as_sequence(product_ids, n, "product ids")
    pack = _U64.pack
    out = np.empty(n, dtype=object)
    for i in range(n):
        geom = geoms[i]
        stamp = stamps[i].encode("ascii")
        product = products[i].encode("utf-8")
        h = hashlib.sha256(pack(len(geom)))
        h.update(geom)
        h.update(pack(len(stamp)))
        h.update(stamp)
        h.update(pack(len(product)))
        h.update(product)
        h.update(emb_len)
        h.update(flat[i * row_bytes:(i + 1) * row_bytes])
        out[i] = h.hexdigest()
    return out


# --------------------------------------------------------------------------------- sample table
def _parse_cell(grid_cell: str) -> tuple[int, int]:
    from majortom_assets.grid import parse_cell_name  # lazy: only needed when ints are not given

    return parse_cell_name(grid_cell)


def sample_table(
    embeddings: np.ndarray,
    *,
    grid_cell: str,
    product_id: str,
    timestamp: Any,
    crs: str,
    transform: Sequence[float],
    boxes: np.ndarray,
    grid_row_u: int | None = None,
    grid_col_r: int | None = None,
    expected_dim: int | None = None,
    check_finite: bool = True,
) -> pa.Table:
    """Table 2 rows for the N fragments of one sample (grid ints parsed from the name if omitted)."""
    where = f"cell {grid_cell} (product {product_id})"
    emb = np.asarray(embeddings)
    boxes = np.asarray(boxes)
    if emb.dtype != np.float32:
        raise ValueError(f"{where}: embeddings must be float32, got {emb.dtype}")
    if emb.ndim != 2:
        raise ValueError(f"{where}: embeddings must have shape (N, dim), got {emb.shape}")
    n, dim = emb.shape
    if expected_dim is not None and dim != expected_dim:
        raise ValueError(f"{where}: embedding dimension {dim} does not match the expected {expected_dim}")
    if boxes.shape != (n, 4):
        raise ValueError(f"{where}: {n} embeddings but pixel boxes of shape {boxes.shape}")
    if check_finite and not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb)).any(axis=1).sum())
        raise ValueError(f"{where}: {bad} of {n} embeddings contain NaN or infinity")
    try:
        named = _parse_cell(grid_cell)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: grid_cell is not a grid cell: {exc}") from None
    if grid_row_u is None or grid_col_r is None:
        grid_row_u, grid_col_r = named
    elif (int(grid_row_u), int(grid_col_r)) != named:
        raise ValueError(f"{where}: grid_row_u/grid_col_r ({grid_row_u}, {grid_col_r}) disagree with "
                         f"the cell's name (row {named[0]}, col {named[1]}); the sample would be filed "
                         f"under the wrong row")

    emb = np.ascontiguousarray(emb, dtype="<f4")
    stamp = _utc_microseconds(timestamp, n)
    try:
        feet = fragment_footprints(boxes, transform, crs)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    ids = unique_ids(feet.geometry_wkb, stamp, product_id, emb)
    columns = fragment_columns(boxes, feet, grid_cell=grid_cell, grid_row_u=grid_row_u,
                               grid_col_r=grid_col_r, product_id=product_id, timestamp=stamp, crs=crs)
    columns["unique_id"] = pa.array(ids, pa.string())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
    schema = embedding_schema(dim)
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def fragment_columns(boxes: np.ndarray, feet: Footprints, *, grid_cell: str, grid_row_u: int,
                     grid_col_r: int, product_id: str, timestamp: Any, crs: str) -> dict[str, pa.Array]:
    """The columns every per-fragment table shares (Table 2 and the fragment grid), by name.

    ``timestamp`` is one value for the sample or one per fragment (naive means UTC); the other
    sample-level values are repeated for each of the ``len(boxes)`` fragments.
    """
    n = len(boxes)

    def repeat(value, typ):
        return pa.array(np.full(n, value, dtype=object), typ)

    return {
        "grid_cell": repeat(grid_cell, pa.string()),
        "grid_row_u": pa.array(np.full(n, grid_row_u, np.int32)),
        "grid_col_r": pa.array(np.full(n, grid_col_r, np.int32)),
        "product_id": repeat(product_id, pa.string()),
        "timestamp": pa.array(_utc_microseconds(timestamp, n), pa.timestamp("us", tz="UTC")),
        "geometry": pa.array(feet.geometry_wkb, pa.binary()),
        "utm_footprint": pa.array(feet.utm_wkt, pa.string()),
        "utm_crs": repeat(str(crs), pa.string()),
        "pixel_bbox": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(boxes).astype(np.int32).reshape(-1)), 4),
        "centre_lat": pa.array(feet.centre_lat),
        "centre_lon": pa.array(feet.centre_lon),
    }


# ------------------------------------------------------------------------------- file metadata
class EmbeddingFileInfo(BaseModel):
    """Provenance stored in every embedding file (JSON under the b"majortom" schema key)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    model: str = Field(min_length=1)
    weights: str = Field(min_length=1, description="weights name or source (path, URL, 'random')")
    weights_sha256: str | None = None
    random_weights: bool
    embedding_dim: int = Field(gt=0, validation_alias=AliasChoices("embedding_dim", "dim"))
    embedding_dtype: str = Field("float32", validation_alias=AliasChoices("embedding_dtype", "dtype"))
    fragment_size: int = Field(gt=0)
    target_overlap: float = Field(ge=0.0, lt=1.0)
    source_collection: str
    created_with: str = Field(default_factory=lambda: f"majortom-assets {_package_version()}")
    standard: str = STANDARD_VERSION
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("source_collection")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        """Files travel: a collection URL is stored without user info or secret query values."""
        return redact_url(value)

    @field_validator("embedding_dtype")
    @classmethod
    def _float32_only(cls, value: str) -> str:
        if value != "float32":
            raise ValueError(f"embedding files store float32 embeddings, got dtype {value!r}")
        return value

    @property
    def dim(self) -> int:
        return self.embedding_dim

    @property
    def dtype(self) -> str:
        return self.embedding_dtype

    def schema_metadata(self) -> dict[bytes, bytes]:
        meta = {
            META_INFO: self.model_dump_json().encode(),
            META_MODEL: self.model.encode(),
            META_WEIGHTS: self.weights.encode(),
            META_RANDOM: b"true" if self.random_weights else b"false",
        }
        if self.random_weights:
            meta[META_WARNING] = RANDOM_WEIGHTS_WARNING.encode()
        return meta


def _package_version() -> str:
    try:
        return _pkg_metadata.version("majortom-assets")
    except _pkg_metadata.PackageNotFoundError:
        return "unknown"


def _info_from_metadata(meta: Mapping[bytes, bytes] | None, path: str | os.PathLike) -> EmbeddingFileInfo:
    meta = meta or {}
    if META_INFO not in meta:
        raise ValueError(f"{path}: not a Major TOM embedding file (no {META_INFO.decode()!r} metadata)")
    return EmbeddingFileInfo.model_validate_json(meta[META_INFO])


def _geo_from_metadata(meta: Mapping[bytes, bytes] | None, path: str | os.PathLike) -> dict:
    meta = meta or {}
    if META_GEO not in meta:
        raise ValueError(f"{path}: no GeoParquet 'geo' metadata")
    return json.loads(meta[META_GEO])


def read_info(path: str | os.PathLike) -> EmbeddingFileInfo:
    return _info_from_metadata(pq.read_schema(path).metadata, path)


def read_geo_metadata(path: str | os.PathLike) -> dict:
    """The GeoParquet `geo` metadata as stored in the Parquet footer."""
    return _geo_from_metadata(pq.read_metadata(path).metadata, path)


# ------------------------------------------------------------------------------ atomic output
def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush `path` (a file, or with `directory` a directory's entries) to stable storage;
    best-effort where the platform or filesystem cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return  # some filesystems / platforms cannot open directories; durability is best-effort
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: A temp file of a writer we cannot check (another host) is stale once untouched this long;
#: live writers touch theirs every `_HEARTBEAT_S`, so this is far beyond any live file's age.
STALE_TEMP_AGE_S = 3600.0
_HEARTBEAT_S = 300.0
_log = logging.getLogger(__name__)


def _writer_tag() -> str:
    """12 hex digits naming this process's pid space: boot id + pid namespace + host name.

    Two processes with equal tags see the same pids, so a temp file's pid can be checked here.
    Containers on one host share the boot id but not the pid namespace; hosts sharing a volume
    differ in boot id (and usually name), so a foreign writer never looks like a dead local one.
    """
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(source).read_text().strip() if "boot_id" in source else os.readlink(source))
        except OSError:
            parts.append("?")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


_WRITER_TAG = (os.getpid(), _writer_tag())


def _own_tag() -> str:
    global _WRITER_TAG
    if _WRITER_TAG[0] != os.getpid():   # a forked or spawned child may live in another pid namespace
        _WRITER_TAG = (os.getpid(), _writer_tag())
    return _WRITER_TAG[1]


def temp_path(path: str | os.PathLike) -> Path:
    """``.<stem>.<writer tag>-<pid>-<uuid>.tmp<suffix>`` beside `path`: hidden, unique, and
    naming its writer so a later sweep can tell a crashed writer's file from a live one's."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{_own_tag()}-{os.getpid()}-{uuid.uuid4().hex}.tmp{path.suffix}")


def _temp_name_pattern(path: Path) -> re.Pattern:
    # the writer part is optional: files from before it existed are judged by age alone
    return re.compile(rf"^\.{re.escape(path.stem)}\.(?:(?P<tag>[0-9a-f]{{12}})-(?P<pid>\d+)-)?"
                      rf"[0-9a-f]{{32}}\.tmp{re.escape(path.suffix)}$")


def stale_reason(match: re.Match, mtime: float, tag: str, now: float, max_age_s: float) -> str | None:
    """Why a temp file or folder whose name matched a writer pattern (groups `tag`, `pid`) is
    stale, or None while it may still be written: a writer of this host whose pid has exited, or
    (another host's, or an unnamed one) untouched for longer than `max_age_s`. Shared by the file
    sweep here and the folder sweep of `vectors.files`."""
    pid = int(match["pid"]) if match["pid"] else 0
    if match["tag"] == tag and pid > 0:
        return None if _pid_alive(pid) else f"its writer, pid {pid} on this host, has exited"
    age = now - mtime
    if age <= max_age_s:
        return None
    return f"untouched for {age / 3600:.1f} h (limit {max_age_s / 3600:g} h)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # EPERM: it exists, owned by someone else
        return True
    return True


def sweep_stale_temps(path: str | os.PathLike, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove temp files of `path` left by writers that died (killed runs); returns them.

    A file is stale when its writer ran in this pid space and its pid is gone, or, for a writer
    elsewhere (or a file without a writer in its name), when it has not been modified for
    `max_age_s`. A live writer's file is never removed: a local one's pid is alive, and any
    writer touches its file every few minutes (`temp_output`). Errors only log: sweeping must
    never fail the write that triggered it.
    """
    path = Path(path)
    pattern, tag, now = _temp_name_pattern(path), _own_tag(), time.time()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                continue
            why = stale_reason(match, info.st_mtime, tag, now, max_age_s)
            if why is None:
                continue
            Path(entry.path).unlink(missing_ok=True)
        except OSError as exc:
            _log.warning("could not remove temp file %s: %s", entry.path, exc)
            continue
        _log.warning("removed stale temp file %s: %s", entry.path, why)
        removed.append(Path(entry.path))
    return removed


class _Heartbeat:
    """Touches every open temp file of this process every `_HEARTBEAT_S` seconds, so a slow but
    live writer's file always looks fresh to a sweep running on another host."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[Path] = set()
        self._pid = -1

    def add(self, tmp: Path) -> None:
        with self._lock:
            if self._pid != os.getpid():   # after a fork the parent's thread and files are not ours
                self._paths, self._pid = set(), os.getpid()
                threading.Thread(target=self._run, name="majortom-temp-heartbeat", daemon=True).start()
            self._paths.add(tmp)

    def discard(self, tmp: Path) -> None:
        with self._lock:
            self._paths.discard(tmp)

    def _run(self) -> None:
        pid = os.getpid()
        while True:
            time.sleep(_HEARTBEAT_S)
            if os.getpid() != pid:
                return
            with self._lock:
                paths = list(self._paths)
            for tmp in paths:
                try:
                    os.utime(tmp)
                except OSError:
                    pass   # not created yet, or already renamed


_HEARTBEAT = _Heartbeat()


@contextmanager
def temp_output(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden temp path beside `path` for the caller to fill and move; whatever is left at it
    when the block ends (failed, or not moved) is removed. Stale temp files of `path` from
    killed writers are swept first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path)
    tmp = temp_path(path)
    _HEARTBEAT.add(tmp)
    try:
        yield tmp
    finally:
        _HEARTBEAT.discard(tmp)
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temp path beside `path`; it replaces `path` only if the block succeeds.

    The temp name keeps the suffix so format-sniffing writers (PIL, rasterio) still work.
    On any exception the temp file is removed and an existing `path` is left untouched; temp
    files that killed writers left behind are swept (`sweep_stale_temps`).
    """
    path = Path(path)
    with temp_output(path) as tmp:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {path}")
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)


# ------------------------------------------------------------------------------------- writer
class _GeoStats:
    """Geometry types and the (antimeridian-aware) bbox accumulated over all written rows."""

    def __init__(self) -> None:
        self.type_ids: set[int] = set()
        self.lon_intervals = np.empty((0, 2))  # merged, sorted, disjoint
        self.ymin, self.ymax = np.inf, -np.inf

    def add(self, wkb: pa.ChunkedArray | pa.Array) -> None:
        geoms = shapely.from_wkb(wkb.to_numpy(zero_copy_only=False))
        if shapely.is_missing(geoms).any():
            raise ValueError("geometry column contains nulls")
        self.type_ids.update(int(t) for t in np.unique(shapely.get_type_id(geoms)))
        parts = shapely.get_parts(geoms)
        parts = parts[~shapely.is_empty(parts)]
        if len(parts) == 0:
            return
        bounds = shapely.bounds(parts)
        self.ymin = min(self.ymin, float(bounds[:, 1].min()))
        self.ymax = max(self.ymax, float(bounds[:, 3].max()))
        self.lon_intervals = _merge_intervals(np.concatenate([self.lon_intervals, bounds[:, [0, 2]]]))

    def geometry_types(self) -> list[str]:
        return [_GEOMETRY_TYPE_NAMES.get(t, "Unknown") for t in sorted(self.type_ids)]

    def bbox(self) -> list[float] | None:
        """[west, south, east, north]; west > east when the tightest box crosses +-180."""
        iv = self.lon_intervals
        if len(iv) == 0:
            return None
        west, east = float(iv[0, 0]), float(iv[-1, 1])
        seam_gap = (west + 180.0) + (180.0 - east)
        if len(iv) > 1:
            gaps = iv[1:, 0] - iv[:-1, 1]
            k = int(np.argmax(gaps))
            if gaps[k] > seam_gap:  # leaving out an interior gap is tighter: wrap across 180
                west, east = float(iv[k + 1, 0]), float(iv[k, 1])
        return [west, self.ymin, east, self.ymax]


def _merge_intervals(iv: np.ndarray) -> np.ndarray:
    """Union of closed intervals, vectorised (sort, running max of ends, split at gaps)."""
    if len(iv) == 0:
        return iv
    iv = iv[np.argsort(iv[:, 0], kind="stable")]
    ends = np.maximum.accumulate(iv[:, 1])
    starts_new = np.concatenate([[True], iv[1:, 0] > ends[:-1]])
    last = np.concatenate([np.nonzero(starts_new)[0][1:] - 1, [len(iv) - 1]])
    return np.stack([iv[starts_new, 0], ends[last]], axis=1)


def geo_metadata(geometry_types: list[str], bbox: list[float] | None) -> dict:
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": geometry_types,
        "crs": pyproj.CRS(WGS84).to_json_dict(),
        "orientation": "counterclockwise",
        "edges": "planar",
    }
    if bbox is not None:
        column["bbox"] = bbox
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}


def wkb_geometry_types(wkb: pa.Array | pa.ChunkedArray) -> list[str]:
    """GeoParquet ``geometry_types`` of a WKB column, in type-id order."""
    type_ids = np.unique(shapely.get_type_id(shapely.from_wkb(wkb.to_numpy(zero_copy_only=False))))
    return [_GEOMETRY_TYPE_NAMES.get(int(t), "Unknown") for t in type_ids]


def write_geo_table(path: str | os.PathLike, table: pa.Table, compression: str = "zstd") -> Path:
    """One in-memory table with a WGS84 WKB ``geometry`` column as GeoParquet 1.1, atomically.

    For small derived files (the fragment grid); embedding files stream through ``write_embeddings``.
    The ``geo`` metadata names the geometry types and the CRS, without a bbox.
    """
    geo = geo_metadata(wkb_geometry_types(table.column("geometry")), None)
    table = table.replace_schema_metadata({META_GEO: json.dumps(geo).encode()})
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression=compression)
    return Path(path)


#: Columns whose bytes the content digest covers besides unique_id (which already hashes
#: geometry, timestamp, product_id and embedding): an edit of any of them changes the digest.
_DIGEST_COLUMNS = ["unique_id", "grid_cell", "grid_row_u", "grid_col_r", "utm_crs", "utm_footprint",
                   "pixel_bbox", "centre_lat", "centre_lon"]
_PROVENANCE_FIELDS = ("model", "weights", "weights_sha256", "random_weights", "embedding_dim",
                      "fragment_size", "target_overlap")


class ContentDigest:
    """sha256 over the rows' `_DIGEST_COLUMNS` in file order plus the file's provenance.

    Chunk-invariant: every column feeds its own hashers (values; for strings, lengths and
    bytes) in row order, so any split into batches gives the same digest; whole Arrow buffers
    are hashed, never row by row. Dropped, duplicated or reordered rows, an edited cell, row,
    box or centre, and a flipped ``random_weights`` flag all change it (docs/standard.md).
    """

    def __init__(self, info: EmbeddingFileInfo) -> None:
        self.rows = 0
        self._hashers = {name: (hashlib.sha256(), hashlib.sha256()) for name in _DIGEST_COLUMNS}
        provenance = {k: getattr(info, k) for k in _PROVENANCE_FIELDS}
        self._provenance = json.dumps(provenance, sort_keys=True).encode()

    def add(self, table: pa.Table | pa.RecordBatch) -> None:
        self.rows += table.num_rows
        for name in _DIGEST_COLUMNS:
            column = table.column(name)
            chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
            values, lengths = self._hashers[name]
            for chunk in chunks:
                _feed(chunk, values, lengths)

    def hexdigest(self) -> str:
        h = hashlib.sha256(self._provenance)
        h.update(_U64.pack(self.rows))
        for name in _DIGEST_COLUMNS:
            values, lengths = self._hashers[name]
            h.update(values.digest())
            h.update(lengths.digest())
        return h.hexdigest()

    def footer_json(self) -> bytes:
        return json.dumps({"rows": self.rows, "digest": self.hexdigest(),
                           "columns": _DIGEST_COLUMNS, "provenance": list(_PROVENANCE_FIELDS)}).encode()


def _feed(chunk: pa.Array, values: Any, lengths: Any) -> None:
    """An Arrow chunk's values (and string lengths) into the hashers, from its buffers."""
    typ = chunk.type
    if pa.types.is_dictionary(typ):
        chunk, typ = chunk.dictionary_decode(), typ.value_type
    if pa.types.is_fixed_size_list(typ):
        chunk = chunk.flatten()
        typ = chunk.type
    if pa.types.is_string(typ) or pa.types.is_binary(typ):
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset: chunk.offset + len(chunk) + 1]
        if len(offsets):
            lengths.update(np.diff(offsets).astype("<i8").tobytes())
            data = chunk.buffers()[2]
            if data is not None:
                values.update(memoryview(data)[int(offsets[0]): int(offsets[-1])])
        return
    array = chunk.to_numpy(zero_copy_only=False)
    values.update(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())


def _reserved_content_json() -> bytes:
    """Space for the `majortom:content` value, whose row count is known only at the end."""
    widest = json.dumps({"rows": 10 ** 19, "digest": "0" * 64, "columns": _DIGEST_COLUMNS,
                         "provenance": list(_PROVENANCE_FIELDS)}).encode()
    placeholder = b'{"rows": null}'
    return placeholder + b" " * (len(widest) + 8 - len(placeholder))


def _reserved_geo_json() -> bytes:
    """A valid `geo` value padded with spaces to the longest length the final value can take."""
    widest = geo_metadata(list(_GEOMETRY_TYPE_NAMES.values()), [-1.2345678901234567e-100] * 4)
    size = len(json.dumps(widest).encode()) + 16
    placeholder = json.dumps(geo_metadata([], None)).encode()
    return placeholder + b" " * (size - len(placeholder))


def _patch_footer(path: Path, swaps: Sequence[tuple[bytes, bytes]]) -> None:
    """`_patch_footer_geo` for several reserved values in turn (each must stay unique)."""
    for reserved, final in swaps:
        _patch_footer_geo(path, reserved, final)


def _patch_footer_geo(path: Path, reserved: bytes, final: bytes) -> None:
    """Swap the reserved `geo` value for the final one in place, in both footer copies.

    pyarrow serialises the schema metadata (plain key/value and the base64 ARROW:schema blob)
    when the writer opens, before the bbox is known. Both copies hold `reserved`; replacing it
    with an equally long value keeps every length and offset in the footer valid, so no data is
    rewritten. Any surprise in the layout raises instead of producing an inconsistent file.
    """
    final = final + b" " * (len(reserved) - len(final))
    if len(final) != len(reserved):
        raise RuntimeError("footer metadata outgrew its reserved space")
    arrow_b64 = pq.read_metadata(path).metadata[b"ARROW:schema"]
    arrow_schema = base64.b64decode(arrow_b64)
    new_b64 = base64.b64encode(arrow_schema.replace(reserved, final))
    with open(path, "r+b") as fh:
        fh.seek(-8, os.SEEK_END)
        footer_len, magic = struct.unpack("<I4s", fh.read(8))
        if magic != b"PAR1":
            raise RuntimeError(f"{path}: not a plain Parquet file")
        start = fh.seek(-8 - footer_len, os.SEEK_END)
        footer = fh.read(footer_len)
        if (footer.count(reserved) != 1 or arrow_schema.count(reserved) != 1
                or footer.count(arrow_b64) != 1 or base64.b64encode(arrow_schema) != arrow_b64
                or len(new_b64) != len(arrow_b64)):
            raise RuntimeError(f"{path}: unexpected Parquet footer layout, cannot finalise geo metadata")
        footer = footer.replace(reserved, final).replace(arrow_b64, new_b64)
        fh.seek(start)
        fh.write(footer)


def write_embeddings(
    path: str | os.PathLike,
    tables: Iterable[pa.Table] | pa.Table,
    info: EmbeddingFileInfo,
    row_group_size: int = 4096,
    compression: str = "zstd",
) -> Path:
    """Stream Table 2 tables into one GeoParquet 1.1 file, atomically.

    Small per-sample tables are buffered into row groups of `row_group_size` rows. A table with
    the wrong schema aborts the write (naming its cell) and leaves any existing file untouched.
    """
    if row_group_size <= 0:
        raise ValueError(f"row_group_size must be positive, got {row_group_size}")
    if isinstance(tables, pa.Table):
        tables = [tables]
    path = Path(path)
    schema = embedding_schema(info.embedding_dim)
    reserved = _reserved_geo_json()
    reserved_content = _reserved_content_json()
    stats = _GeoStats()
    digest = ContentDigest(info)
    file_schema = schema.with_metadata({**info.schema_metadata(), META_GEO: reserved,
                                        META_CONTENT: reserved_content})
    with atomic_output(path) as tmp:
        writer = pq.ParquetWriter(
            tmp, file_schema, compression=compression, use_dictionary=_DICTIONARY_COLUMNS,
            write_statistics=_STATISTICS_COLUMNS, store_schema=True,
        )
        try:
            pending: list[pa.Table] = []
            pending_rows = 0
            for table in tables:
                _check_table(table, schema, path)
                if table.num_rows == 0:
                    continue
                stats.add(table.column("geometry"))
                digest.add(table)
                pending.append(table.replace_schema_metadata(None))
                pending_rows += table.num_rows
                if pending_rows >= row_group_size:
                    full = pending_rows - pending_rows % row_group_size
                    merged = pa.concat_tables(pending)
                    writer.write_table(merged.slice(0, full), row_group_size=row_group_size)
                    rest = merged.slice(full)
                    pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
            if pending_rows:
                writer.write_table(pa.concat_tables(pending), row_group_size=row_group_size)
        finally:
            writer.close()
        final = json.dumps(geo_metadata(stats.geometry_types(), stats.bbox())).encode()
        _patch_footer(tmp, [(reserved, final), (reserved_content, digest.footer_json())])
    return path


def _check_table(table: pa.Table, schema: pa.Schema, path: Path) -> None:
    if table.schema.equals(schema, check_metadata=False):
        return
    cell = table.column("grid_cell")[0].as_py() if ("grid_cell" in table.column_names
                                                     and table.num_rows) else "?"
    if table.schema.names != schema.names:
        raise ValueError(f"{path}: table for cell {cell} has columns {table.schema.names}, "
                         f"expected {schema.names}")
    for got, want in zip(table.schema, schema):
        if not got.equals(want):
            raise ValueError(f"{path}: table for cell {cell}: column {want.name} is {got.type} "
                             f"(nullable={got.nullable}), expected {want.type} (nullable={want.nullable})")


# ------------------------------------------------------------------------------------- reading
def read_table(path: str | os.PathLike, columns: Sequence[str] | None = None, filters=None) -> pa.Table:
    """Read through ONE open handle: pyarrow opens a path several times (footer, then row groups),
    so a partition atomically replaced in between would be read half old, half new."""
    with pa.OSFile(os.fspath(path)) as source:
        return pq.read_table(source, columns=list(columns) if columns is not None else None,
                             filters=filters)


def embedding_matrix(data: pa.Table | pa.RecordBatch | pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(N, dim) float32 view/copy of an embedding column, without a per-row loop.

    Zero-copy for a single chunk without nulls; several chunks are copied once into one array.
    """
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        data = data.column("embedding")
    chunks = data.chunks if isinstance(data, pa.ChunkedArray) else [data]
    typ = data.type
    if not pa.types.is_fixed_size_list(typ) or not pa.types.is_float32(typ.value_type):
        raise TypeError(f"embedding column must be fixed_size_list<float32>, got {typ}")
    dim = typ.list_size
    if data.null_count:
        raise ValueError(f"embedding column has {data.null_count} null rows")
    mats = [chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) for chunk in chunks]
    if len(mats) == 1:
        return mats[0]
    if not mats:
        return np.empty((0, dim), np.float32)
    return np.concatenate(mats, axis=0)


@dataclass
class VerifyReport:
    """Outcome of recomputing every unique_id of a file."""

    path: str
    rows: int
    mismatched_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # file-level: schema, metadata

    @property
    def bad_ids(self) -> list[str]:
        return self.mismatched_ids

    @property
    def ok(self) -> bool:
        return not self.mismatched_ids and not self.problems


#: Tolerances of the consistency checks: centres are computed from the same corners in float64
#: (sub-millimetre agreement), UTM footprints are stored to the millimetre.
_CENTRE_TOLERANCE_DEG = 1e-6
_FOOTPRINT_TOLERANCE_M = 0.01
_PIXEL_M = 10.0


def verify_file(path: str | os.PathLike, batch_size: int = 8192) -> VerifyReport:
    """What a file-level verification guarantees (docs/standard.md, "Verification"), streaming
    batch by batch (memory bounded by `batch_size`):

    * provenance and schema: the `majortom` footer parses, the schema is Table 2 for its dim,
      the `geo` metadata is GeoParquet 1.1, and the ``random_weights`` flag agrees across the
      info JSON, the ``majortom:random_weights`` key, the warning and the weights name;
    * every ``unique_id`` recomputes from geometry, timestamp, product_id and embedding;
    * content: the ``majortom:content`` footer's row count and digest (`ContentDigest`) match
      the rows, so a dropped, duplicated or edited row or a flipped flag is found;
    * each row's ``grid_cell`` is a cell of the grid and ``grid_row_u``/``grid_col_r`` are its
      row and column; ``pixel_bbox`` is a ``fragment_size`` square whose size matches its UTM
      footprint at 10 m; ``centre_lat``/``centre_lon`` are the centre of that footprint.

    Problems are reported with the rows they concern; the function never raises on content.
    """
    from majortom_assets import grid  # lazy: geoparquet stays importable without the grid tables

    report = VerifyReport(path=str(path), rows=0)
    with pq.ParquetFile(path) as pf:   # one handle: schema, footer metadata and batches
        footer = pf.metadata.metadata or {}
        info: EmbeddingFileInfo | None = None
        try:
            info = _info_from_metadata(footer, path)
            expected = embedding_schema(info.embedding_dim)
            if not pf.schema_arrow.equals(expected, check_metadata=False):
                report.problems.append(f"schema differs from Table 2 with dim {info.embedding_dim}")
        except ValueError as exc:
            report.problems.append(str(exc))
        try:
            geo = _geo_from_metadata(footer, path)
            if geo.get("version") != GEOPARQUET_VERSION or "geometry" not in geo.get("columns", {}):
                report.problems.append("geo metadata is not GeoParquet 1.1 for column 'geometry'")
        except ValueError as exc:
            report.problems.append(str(exc))
        if info is not None:
            report.problems.extend(_flag_problems(info, footer))
        content = _content_from_metadata(footer, report)
        missing = [c for c in dict.fromkeys(_HASHED_COLUMNS + _DIGEST_COLUMNS) if c not in pf.schema_arrow.names]
        if missing:
            report.problems.append(f"missing columns {missing}")
            return report
        digest = ContentDigest(info) if info is not None else None
        read = list(dict.fromkeys(_HASHED_COLUMNS + _DIGEST_COLUMNS))
        for batch in pf.iter_batches(batch_size=batch_size, columns=read):
            first = report.rows
            report.rows += batch.num_rows
            where = f"rows {first}..{report.rows - 1}"
            if digest is not None:
                digest.add(batch)
            stored = np.asarray(batch.column("unique_id").to_pylist(), dtype=object)
            try:
                fresh = unique_ids(batch.column("geometry"), batch.column("timestamp"),
                                   batch.column("product_id"), embedding_matrix(batch.column("embedding")))
            except (ValueError, TypeError) as exc:
                report.problems.append(f"{where}: {exc}")
                continue
            bad = stored != fresh
            report.mismatched_ids.extend(str(s) for s in stored[bad])
            report.problems.extend(_row_problems(batch, info, first, grid))
        if pf.metadata.num_rows != report.rows:
            report.problems.append(f"the footer counts {pf.metadata.num_rows} rows, {report.rows} were read")
        if content is not None and digest is not None:
            if content.get("rows") != report.rows:
                report.problems.append(f"row count {report.rows} differs from the {content.get('rows')} rows "
                                       f"the writer recorded (rows dropped or added after writing)")
            elif content.get("digest") != digest.hexdigest():
                report.problems.append("content digest differs from the writer's: rows were edited, "
                                       "reordered or duplicated, or the provenance (weights, random_weights) changed")
    return report


def _content_from_metadata(footer: Mapping[bytes, bytes], report: VerifyReport) -> dict | None:
    if META_CONTENT not in footer:
        report.problems.append(f"no {META_CONTENT.decode()!r} footer: row count and content cannot be "
                               f"verified (written by an older version; re-create the file)")
        return None
    try:
        content = json.loads(footer[META_CONTENT])
    except ValueError as exc:
        report.problems.append(f"{META_CONTENT.decode()!r} footer is not valid JSON ({exc})")
        return None
    if not isinstance(content, dict):
        report.problems.append(f"{META_CONTENT.decode()!r} footer is not a JSON object")
        return None
    return content


def _flag_problems(info: EmbeddingFileInfo, footer: Mapping[bytes, bytes]) -> list[str]:
    """The random-weights flag is stated four times; they must agree (a flipped copy is a forgery)."""
    problems = []
    stated = footer.get(META_RANDOM)
    if stated not in (b"true", b"false"):
        problems.append(f"{META_RANDOM.decode()!r} footer is {stated!r}, expected true or false")
    elif (stated == b"true") != info.random_weights:
        problems.append(f"random_weights is {info.random_weights} in the provenance but "
                        f"{stated.decode()} in {META_RANDOM.decode()!r}")
    if info.random_weights != (META_WARNING in footer):
        problems.append(f"random_weights is {info.random_weights} but the random-weights warning is "
                        f"{'missing' if info.random_weights else 'present'}")
    if info.weights == "random" and not info.random_weights:
        problems.append("weights are 'random' but random_weights is false")
    return problems


def _row_problems(batch: pa.RecordBatch, info: EmbeddingFileInfo | None, first: int, grid: Any) -> list[str]:
    """Cell names, row/col ints, pixel boxes and centres of one batch against each other."""
    problems: list[str] = []

    def report(what: str, bad: np.ndarray, value: Any) -> None:
        """`value(i)` describes row i; called only for the (at most 3) rows shown."""
        idx = np.flatnonzero(bad)
        if len(idx):
            shown = ", ".join(f"row {first + i}: {value(i)!r}" for i in idx[:3])
            problems.append(f"{len(idx)} row(s) {what} ({shown}{', ...' if len(idx) > 3 else ''})")

    cells = batch.column("grid_cell").to_numpy(zero_copy_only=False)
    ok, rows, cols = grid.valid_cells(cells)
    report("with a grid_cell that is not a grid cell", ~ok, lambda i: cells[i])
    row_u = batch.column("grid_row_u").to_numpy(zero_copy_only=False)
    col_r = batch.column("grid_col_r").to_numpy(zero_copy_only=False)
    report("whose grid_row_u/grid_col_r disagree with grid_cell", ok & ((row_u != rows) | (col_r != cols)),
           lambda i: f"{cells[i]} vs ({row_u[i]}, {col_r[i]})")
    boxes = batch.column("pixel_bbox").flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, 4)
    height, width = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = info.fragment_size if info is not None else height
    report(f"with a pixel_bbox that is not a {side} px fragment",
           (boxes[:, :2] < 0).any(axis=1) | (height != side) | (width != side), lambda i: boxes[i].tolist())
    utm = shapely.from_wkt(batch.column("utm_footprint").to_numpy(zero_copy_only=False), on_invalid="ignore")
    readable = ~shapely.is_missing(utm)
    report("with an unreadable utm_footprint", ~readable, lambda i: batch.column("utm_footprint")[i].as_py())
    if not readable.any():
        return problems
    x0, y0, x1, y1 = shapely.bounds(utm).T
    size_off = readable & ((np.abs((x1 - x0) - width * _PIXEL_M) > _FOOTPRINT_TOLERANCE_M)
                           | (np.abs((y1 - y0) - height * _PIXEL_M) > _FOOTPRINT_TOLERANCE_M))
    report("whose pixel_bbox size differs from their UTM footprint at 10 m", size_off, lambda i: boxes[i].tolist())
    lat = batch.column("centre_lat").to_numpy(zero_copy_only=False)
    lon = batch.column("centre_lon").to_numpy(zero_copy_only=False)
    crs = batch.column("utm_crs").to_numpy(zero_copy_only=False)
    want_lat = np.full(len(lat), np.nan)
    want_lon = np.full(len(lat), np.nan)
    for code in np.unique(crs[readable]):
        sel = readable & (crs == code)
        try:
            tlon, tlat = _to_wgs84(str(code)).transform((x0[sel] + x1[sel]) / 2.0, (y0[sel] + y1[sel]) / 2.0)
        except ValueError as exc:
            problems.append(f"utm_crs {code!r}: {exc}")
            continue
        want_lat[sel], want_lon[sel] = tlat, tlon
    dlon = (lon - want_lon + 180.0) % 360.0 - 180.0
    off = readable & np.isfinite(want_lat) & ~((np.abs(lat - want_lat) <= _CENTRE_TOLERANCE_DEG)
                                                & (np.abs(dlon) <= _CENTRE_TOLERANCE_DEG))
    report("whose centre_lat/centre_lon is not the centre of their footprint", off,
           lambda i: f"({lat[i]:.6f}, {lon[i]:.6f})")
    return problems
