"""Embeddings at points and over areas, reading only the Parquet row groups that can hold them.

TESSERA / AlphaEarth users ask for "the vectors at my 10 000 field points" without downloading
whole tiles. Here a place is matched to the fragments whose WGS84 footprint contains the point
(``points``) or intersects the area (``areas``), in any of the given embedding files, local or
fsspec (hf://, http(s)://, s3://).

What is read, per file:

1. the footer; a hive path ``row=<ROW>`` that no place can touch is skipped unopened;
2. row-group statistics select candidate row groups: ``grid_row_u`` / ``grid_col_r`` ranges
   against the candidate cells of the points (a point can lie in the image of its own cell or of
   a neighbour, since images are 10.68 km and anchored at the cell's south-west corner: the 3 x 3
   neighbourhood is the candidate set), else a GeoParquet 1.1 ``bbox`` covering column, else
   ``centre_lat`` / ``centre_lon`` widened by a fragment's half extent; and ``timestamp`` against
   ``start`` / ``end``;
3. the small columns of those row groups (cell, box, footprint, time, ids): exact footprint tests
   with a shapely STRtree;
4. the ``embedding`` column only of the row groups with a match.

Bytes: files written by the engine are sorted by row, column and time in row groups of 1024 rows
(`engine.EMBEDDING_ROW_GROUP_ROWS`), so clustered places touch few row groups. Places scattered
over the whole store still touch every row group: then the read is close to the whole file; the
benchmark (benchmarks/bench_extract.py, docs/benchmarks.md) measures both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from majortom_assets import geoparquet
from majortom_assets.vectors import files
from majortom_assets.vectors.iocount import ByteCounter, open_input

Kind = Literal["points", "areas"]
_META = ["unique_id", "grid_cell", "grid_row_u", "grid_col_r", "product_id", "timestamp", "pixel_bbox",
         "centre_lat", "centre_lon", "geometry"]
_ROW_IN_PATH = re.compile(r"(?:^|/)row=([^/]+)/[^/]+$")
_KM_PER_DEG = 111.32
NEIGHBOUR_KM = 2.0     # shift for the 3 x 3 candidate cells: the 680 m image overlap + UTM skew
MARGIN_KM = 6.0        # centre-statistics widening: half a fragment's diagonal (<= 2.7 km) with room
_LAT_NAMES = ("lat", "latitude", "y")
_LON_NAMES = ("lon", "lng", "long", "longitude", "x")


# ----------------------------------------------------------------------------------- places
@dataclass
class Places:
    """Points or areas in WGS84 lon/lat, with the user's own columns to carry into the result."""

    kind: Kind
    geometry: np.ndarray          # shapely geometries
    attributes: pd.DataFrame      # one row per place (place_id first)

    def __len__(self) -> int:
        return len(self.geometry)

    @classmethod
    def points(cls, lat: Sequence[float], lon: Sequence[float], attributes: pd.DataFrame | None = None) -> Places:
        lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
        if lat.shape != lon.shape or lat.ndim != 1:
            raise ValueError("lat and lon must be 1-d sequences of the same length")
        bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{int(bad.sum())} point(s) with invalid coordinates, first at place {i}: "
                             f"lat={lat[i]}, lon={lon[i]} (lat must be in [-90, 90], lon in [-180, 180])")
        attrs = _attributes(attributes, len(lat))
        return cls("points", shapely.points(lon, lat), attrs)

    @classmethod
    def areas(cls, geometry: Sequence, attributes: pd.DataFrame | None = None) -> Places:
        geoms = np.asarray(geometry, dtype=object)
        invalid = shapely.is_missing(geoms) | shapely.is_empty(geoms)
        if invalid.any():
            raise ValueError(f"{int(invalid.sum())} area(s) are empty or missing, first at place "
                             f"{int(np.flatnonzero(invalid)[0])}")
        return cls("areas", geoms, _attributes(attributes, len(geoms)))

    @property
    def lonlat(self) -> tuple[np.ndarray, np.ndarray]:
        """Representative coordinates (points: the points; areas: bounds centres)."""
        b = shapely.bounds(self.geometry)
        return (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2


def _attributes(attributes: pd.DataFrame | None, n: int) -> pd.DataFrame:
    attrs = pd.DataFrame(index=range(n)) if attributes is None else attributes.reset_index(drop=True).copy()
    if len(attrs) != n:
        raise ValueError(f"{len(attrs)} attribute rows for {n} places")
    attrs = attrs.drop(columns=[c for c in attrs.columns if c in ("geometry", "place_id")])
    attrs.insert(0, "place_id", np.arange(n, dtype=np.int64))
    return attrs


def _find(columns: Iterable[str], names: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def _read_geo(path: Path):
    import geopandas as gpd

    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            frame = gpd.read_parquet(path)
        else:
            frame = gpd.read_file(path)
    except Exception as exc:  # noqa: BLE001 - pyogrio / pyarrow errors: the file is the problem
        raise ValueError(f"cannot read places file {path}: {str(exc).splitlines()[0]}") from None
    if frame.crs is not None and not frame.crs.equals("OGC:CRS84") and frame.crs.to_epsg() != 4326:
        frame = frame.to_crs("OGC:CRS84")
    return frame


def read_points(path: str | os.PathLike) -> Places:
    """Points from a CSV (lat/lon columns: lat|latitude|y and lon|lng|long|longitude|x, any case),
    GeoJSON or GeoParquet (Point geometries; reprojected to lon/lat if they carry another CRS)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"points file {path} does not exist")
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        try:
            frame = pd.read_csv(path, sep=None, engine="python")
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise ValueError(f"cannot read points file {path}: {exc}") from None
        lat_col, lon_col = _find(frame.columns, _LAT_NAMES), _find(frame.columns, _LON_NAMES)
        if lat_col is None or lon_col is None:
            raise ValueError(f"points file {path} needs lat and lon columns (e.g. 'lat', 'lon'); "
                             f"it has {list(frame.columns)}")
        lat = pd.to_numeric(frame[lat_col], errors="coerce").to_numpy()
        lon = pd.to_numeric(frame[lon_col], errors="coerce").to_numpy()
        try:
            return Places.points(lat, lon, frame.drop(columns=[lat_col, lon_col]))
        except ValueError as exc:
            raise ValueError(f"points file {path}: {exc}") from None
    frame = _read_geo(path)
    types = set(frame.geometry.geom_type.dropna())
    if not types <= {"Point"}:
        raise ValueError(f"points file {path} holds {sorted(types)} geometries; points must be Point "
                         "(use --geometry for areas)")
    try:
        return Places.points(frame.geometry.y.to_numpy(), frame.geometry.x.to_numpy(),
                             pd.DataFrame(frame.drop(columns=frame.geometry.name)))
    except ValueError as exc:
        raise ValueError(f"points file {path}: {exc}") from None


def read_areas(path: str | os.PathLike) -> Places:
    """Areas (any geometry; typically polygons) from GeoJSON, GeoParquet or another OGR format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"geometry file {path} does not exist")
    frame = _read_geo(path)
    try:
        return Places.areas(frame.geometry.to_numpy(), pd.DataFrame(frame.drop(columns=frame.geometry.name)))
    except ValueError as exc:
        raise ValueError(f"geometry file {path}: {exc}") from None


# ----------------------------------------------------------------------------- candidates
def candidate_cells(places: Places) -> np.ndarray:
    """Sorted unique int64 keys (`_key`) of the cells whose images can hold a point."""
    from majortom_assets.grid import get_grid

    grid = get_grid()
    lon, lat = shapely.get_x(places.geometry), shapely.get_y(places.geometry)
    dlat = NEIGHBOUR_KM / _KM_PER_DEG
    dlon = NEIGHBOUR_KM / (_KM_PER_DEG * np.maximum(np.cos(np.radians(lat)), 0.01))
    keys = []
    for sy in (-1, 0, 1):
        for sx in (-1, 0, 1):
            la = np.clip(lat + sy * dlat, -89.999, 89.999)
            lo = (lon + sx * dlon + 180.0) % 360.0 - 180.0
            inside = grid.covers(la)
            if not inside.any():
                continue
            r, c = grid.latlon_to_cell(la[inside], lo[inside])
            keys.append(_key(np.asarray(r), np.asarray(c)))
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)


_COL_OFFSET = 1 << 31   # columns are signed (L = west): offset them so the low 32 bits stay >= 0


def _key(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """One sortable int64 per cell: row in the high 32 bits, offset column in the low 32 bits."""
    return (np.asarray(row, np.int64) << 32) + (np.asarray(col, np.int64) + _COL_OFFSET)


def _unkey(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return keys >> 32, (keys & 0xFFFFFFFF) - _COL_OFFSET


# ------------------------------------------------------------------------- row-group stats
def _stats(md: pq.FileMetaData, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per row group (min, max) of a column, or None when any row group lacks them."""
    names = [md.schema.column(j).path for j in range(md.num_columns)]
    if name not in names:
        return None
    j = names.index(name)
    lo, hi = [], []
    for i in range(md.num_row_groups):
        st = md.row_group(i).column(j).statistics
        if st is None or not st.has_min_max:
            return None
        lo.append(st.min)
        hi.append(st.max)
    return np.asarray(lo), np.asarray(hi)


def _boxes(md: pq.FileMetaData) -> np.ndarray | None:
    """(G, 4) lon/lat boxes (W, S, E, N) of each row group's fragments, from a bbox covering column
    or from the fragment centres widened by a fragment's half extent."""
    cover = [_stats(md, f"bbox.{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
    if all(c is not None for c in cover):
        return np.stack([cover[0][0], cover[1][0], cover[2][1], cover[3][1]], axis=1).astype(np.float64)
    lat, lon = _stats(md, "centre_lat"), _stats(md, "centre_lon")
    if lat is None or lon is None:
        return None
    s, n = lat[0].astype(np.float64), lat[1].astype(np.float64)
    m_lat = MARGIN_KM / _KM_PER_DEG
    m_lon = MARGIN_KM / (_KM_PER_DEG * np.maximum(np.cos(np.radians(np.maximum(np.abs(s), np.abs(n)))), 0.01))
    return np.stack([lon[0] - m_lon, s - m_lat, lon[1] + m_lon, n + m_lat], axis=1)


def _utc(value) -> pd.Timestamp:
    t = pd.Timestamp(value)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _time_groups(md: pq.FileMetaData, start, end) -> np.ndarray:
    keep = np.ones(md.num_row_groups, bool)
    if start is None and end is None:
        return keep
    st = _stats(md, "timestamp")
    if st is None:
        return keep
    lo = np.array([_utc(v) for v in st[0]])
    hi = np.array([_utc(v) for v in st[1]])
    if start is not None:
        keep &= hi >= _utc(start)
    if end is not None:
        keep &= lo <= _utc(end)
    return keep


def _cell_groups(md: pq.FileMetaData, keys: np.ndarray) -> np.ndarray | None:
    """Row groups whose grid_row_u x grid_col_r ranges hold a candidate cell (None: no statistics)."""
    rows, cols = _stats(md, "grid_row_u"), _stats(md, "grid_col_r")
    if rows is None or cols is None:
        return None
    r0, r1 = rows[0].astype(np.int64), rows[1].astype(np.int64)
    c0, c1 = cols[0].astype(np.int64), cols[1].astype(np.int64)
    keep = np.zeros(md.num_row_groups, bool)
    for g in range(md.num_row_groups):
        if r0[g] == r1[g]:     # the usual case: a row partition; keys of one row are contiguous
            a, b = np.searchsorted(keys, [_key(r0[g], c0[g]), _key(r0[g], c1[g])], side="left")
            hit = b > a or (b < len(keys) and keys[b] == _key(r0[g], c1[g]))
        else:
            kr, kc = _unkey(keys)
            hit = bool(np.any((kr >= r0[g]) & (kr <= r1[g]) & (kc >= c0[g]) & (kc <= c1[g])))
        keep[g] = hit
    return keep


def _box_groups(md: pq.FileMetaData, places: Places) -> np.ndarray | None:
    boxes = _boxes(md)
    if boxes is None:
        return None
    pb = shapely.bounds(places.geometry)
    keep = np.zeros(md.num_row_groups, bool)
    for g, (w, s, e, n) in enumerate(boxes):
        keep[g] = bool(np.any((pb[:, 0] <= e) & (pb[:, 2] >= w) & (pb[:, 1] <= n) & (pb[:, 3] >= s)))
    return keep


# -------------------------------------------------------------------------------- reading
@dataclass
class FilePlan:
    """What was decided for one file (reported by the CLI and the benchmark)."""

    location: str
    row_groups: int
    candidate_groups: int = 0
    embedding_groups: int = 0
    matches: int = 0
    skipped: bool = False


def _row_of(location: str) -> str | None:
    m = _ROW_IN_PATH.search(str(location).replace(os.sep, "/"))
    return m.group(1) if m else None


def _candidate_rows(keys: np.ndarray) -> set[str]:
    from majortom_assets.grid import row_name

    return {str(row_name(int(r))) for r in np.unique(_unkey(keys)[0])}


def _extract_file(location: str, places: Places, keys: np.ndarray | None, start, end,
                  counter: ByteCounter | None, plan: FilePlan) -> pa.Table | None:
    with open_input(location, counter) as handle:
        pf = pq.ParquetFile(handle)
        md = pf.metadata
        plan.row_groups = md.num_row_groups
        keep = _time_groups(md, start, end)
        spatial = _cell_groups(md, keys) if keys is not None else None
        if spatial is None:
            spatial = _box_groups(md, places)
        if spatial is not None:
            keep &= spatial
        groups = np.flatnonzero(keep)
        plan.candidate_groups = len(groups)
        if not len(groups):
            return None
        offsets = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        columns = [c for c in _META if c in pf.schema_arrow.names]
        meta = pf.read_row_groups(groups.tolist(), columns=columns)
        positions = np.concatenate([np.arange(offsets[g], offsets[g + 1]) for g in groups])
        mask = np.ones(meta.num_rows, bool)
        if start is not None or end is not None:
            t = files.timestamps_ns(meta.column("timestamp"))
            if start is not None:
                mask &= t >= _utc(start).tz_localize(None).to_datetime64()
            if end is not None:
                mask &= t <= _utc(end).tz_localize(None).to_datetime64()
        if keys is not None and "grid_row_u" in columns and "grid_col_r" in columns:
            mask &= np.isin(_key(meta.column("grid_row_u").to_numpy(), meta.column("grid_col_r").to_numpy()), keys)
        rows = np.flatnonzero(mask)
        if not len(rows):
            return None
        footprints = shapely.from_wkb(meta.column("geometry").take(pa.array(rows)).to_numpy(zero_copy_only=False))
        tree = shapely.STRtree(footprints)
        place_i, frag_j = tree.query(places.geometry, predicate="intersects")
        if not len(place_i):
            return None
        hit = rows[frag_j]
        plan.matches = len(hit)
        # pass 2: embeddings of the row groups that hold a match, and nothing else
        hit_pos = positions[hit]
        emb_groups = np.unique(np.searchsorted(offsets, hit_pos, side="right") - 1)
        plan.embedding_groups = len(emb_groups)
        emb_table = pf.read_row_groups(emb_groups.tolist(), columns=["embedding"])
        emb_pos = np.concatenate([np.arange(offsets[g], offsets[g + 1]) for g in emb_groups])
        vectors = geoparquet.embedding_matrix(emb_table.column("embedding"))
        x = vectors[np.searchsorted(emb_pos, hit_pos)]
        info = _file_info(pf)
    out = meta.take(pa.array(hit))
    out = out.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]))
    out = out.append_column("place_id", pa.array(place_i.astype(np.int64)))
    out = out.append_column("source", pa.array(np.full(len(hit), plan.location, dtype=object), pa.string()))
    return out.replace_schema_metadata({b"random_weights": b"1" if info and info.random_weights else b"0",
                                        b"model": (info.model if info else "").encode()})


def _file_info(pf: pq.ParquetFile):
    meta = pf.schema_arrow.metadata or {}
    if geoparquet.META_INFO not in meta:
        return None
    try:
        return geoparquet._info_from_metadata(meta, "embedding file")
    except ValueError:
        return None


@dataclass
class ExtractResult:
    table: pa.Table               # one row per (place, fragment) match
    plans: list[FilePlan]
    counter: ByteCounter
    places: int
    random_weights: bool

    @property
    def places_matched(self) -> int:
        return len(np.unique(self.table.column("place_id").to_numpy())) if self.table.num_rows else 0


def extract(sources: Sequence[str | os.PathLike], places: Places, *, start=None, end=None,
            counter: ByteCounter | None = None) -> ExtractResult:
    """Every (place, fragment) match over the given embedding files (local paths or URLs).

    Points match fragments whose footprint contains them (boundary included); areas match
    fragments whose footprint intersects them. ``start`` / ``end`` bound the acquisition time
    (inclusive; dates or timestamps, naive = UTC).
    """
    if not len(places):
        raise ValueError("no places given")
    if start is not None and end is not None and _utc(end) < _utc(start):
        raise ValueError(f"end {end} is before start {start}")
    counter = counter if counter is not None else ByteCounter()
    keys = candidate_cells(places) if places.kind == "points" else None
    rows = _candidate_rows(keys) if keys is not None else None
    plans, parts, random_weights = [], [], False
    from majortom_assets.remote import redact_url

    for src in sources:
        location = str(src)
        plan = FilePlan(redact_url(location), 0)    # what is shown and stored: never credentials
        plans.append(plan)
        row = _row_of(location)
        if rows is not None and row is not None and row not in rows:
            plan.skipped = True     # a row partition no point can reach: not even its footer is read
            continue
        part = _extract_file(location, places, keys, start, end, counter, plan)
        if part is not None:
            random_weights |= part.schema.metadata.get(b"random_weights") == b"1"
            parts.append(part.replace_schema_metadata(None))
    table = _assemble(parts, places)
    return ExtractResult(table, plans, counter, len(places), random_weights)


def _assemble(parts: list[pa.Table], places: Places) -> pa.Table:
    if not parts:
        empty = places.attributes.iloc[:0]
        return pa.Table.from_pandas(empty, preserve_index=False)
    frag = pa.concat_tables(parts, promote_options="permissive")
    ids = frag.column("place_id").to_numpy()
    attrs = places.attributes.iloc[ids].reset_index(drop=True)
    place_cols = pa.Table.from_pandas(attrs, preserve_index=False)
    if places.kind == "points":
        pts = places.geometry[ids]
        place_cols = place_cols.append_column("point_lat", pa.array(shapely.get_y(pts)))
        place_cols = place_cols.append_column("point_lon", pa.array(shapely.get_x(pts)))
    place_cols = place_cols.append_column(
        "place_geometry", pa.array(shapely.to_wkb(places.geometry[ids]), pa.binary()))
    out = place_cols
    for name in frag.column_names:
        if name != "place_id":
            out = out.append_column(frag.field(name), frag.column(name))
    order = np.lexsort((files.timestamps_ns(out.column("timestamp")), out.column("grid_cell").to_numpy(
        zero_copy_only=False), ids))
    return out.take(pa.array(order))


def write_result(result: ExtractResult, path: str | os.PathLike) -> Path:
    """The matches as GeoParquet 1.1 (geometry = fragment footprint, place_geometry = the place),
    atomically; readable with ``geopandas.read_parquet``."""
    import json

    table = result.table
    geo = geoparquet.geo_metadata(["Polygon", "MultiPolygon"], None) if table.num_rows else None
    meta = {b"majortom:extract": json.dumps({"places": result.places, "matches": table.num_rows,
                                             "places_matched": result.places_matched,
                                             **result.counter.summary()}).encode()}
    if result.random_weights:
        meta[geoparquet.META_WARNING] = geoparquet.RANDOM_WEIGHTS_WARNING.encode()
        meta[geoparquet.META_RANDOM] = b"true"
    if geo is not None:
        place = dict(geo["columns"]["geometry"])
        place["geometry_types"] = geoparquet.wkb_geometry_types(table.column("place_geometry"))
        geo["columns"]["geometry"]["geometry_types"] = geoparquet.wkb_geometry_types(table.column("geometry"))
        geo["columns"]["place_geometry"] = place
        meta[geoparquet.META_GEO] = json.dumps(geo).encode()
    table = table.replace_schema_metadata(meta)
    with geoparquet.atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)
