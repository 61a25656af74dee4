"""The Major TOM grid (Francis & Czerkawski, 2024) for any spacing, fully vectorised.

Rows are bands of latitude ``180/n`` degrees high (``n = ceil(pi*R/D)``); a row whose bottom edge is
at latitude ``phi`` is cut into ``m = ceil(2*pi*R*cos(phi)/D)`` columns of ``360/m`` degrees. Cells
are named ``<row>_<col>`` (``136U_496R``) and identified by their bottom-left corner.

Edge coordinates are computed with the same floating-point operations as the reference grid
(``np.linspace`` over [-90, 90) / [-180, 180), ``np.mod``, sort), so corners and point look-ups
agree with the published cells bit for bit, including points that lie exactly on an edge (they go
to the row / column below, as ``np.searchsorted(edges, x) - 1`` does in the reference).

Longitudes in [-180, 180] are used as given (others wrap modulo 360): -180 lies on or west of the
first column's west edge and therefore belongs to the east-most column (which, for rows with an
odd column count, straddles the antimeridian); 180 belongs to the column whose edges enclose it,
again as in the reference. Latitudes outside the grid's rows raise ``ValueError`` (use ``Grid.covers`` to
filter first).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import shapely

EARTH_RADIUS_KM = 6378.137

_ROW_RE = re.compile(r"(0|[1-9][0-9]*)([UD])")  # used with fullmatch (no '$' newline loophole)
_COL_RE = re.compile(r"(0|[1-9][0-9]*)([RL])")


# ----------------------------------------------------------------------------------------------
# edge arithmetic shared by rows and columns


def _edges(index: np.ndarray, divisions: np.ndarray | int, half_span: float) -> np.ndarray:
    """Edge ``index * (2*half_span/divisions)`` computed exactly as the reference computes it.

    The reference takes ``linspace(-h, h, d+1)[:-1]`` (``i*step + (-h)``), maps it with
    ``mod(., 2h) - h`` and sorts; edge ``i`` lands at signed index ``i`` (i < d/2) or ``i - d``.
    Branching on the sign of the signed index matches the reference's branch on the sign of
    ``i*step - h`` for every index in ``_index_range`` (which absorbs the one case where they differ).
    """
    index = np.asarray(index, dtype=np.int64)
    divisions = np.asarray(divisions, dtype=np.int64)
    step = (2.0 * half_span) / divisions
    north_or_east = index >= 0
    i = np.where(north_or_east, index, index + divisions).astype(np.float64)
    v = i * step + (-half_span)
    return np.where(north_or_east, (v + 2.0 * half_span) - half_span, v - half_span)


def _index_range(divisions: np.ndarray | int, half_span: float) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest signed index of the edges in [-h, h): -floor(d/2) .. ceil(d/2)-1.

    Reference quirk kept on purpose: for even d, edge d/2 is ``(d/2)*step - h``, which can round
    to a hair below zero; ``mod`` then sends it to ``+h - tiny`` and the reference names that
    column/row ``d/2`` east/north instead of ``d/2`` west/south (10 km row 800D runs 623L..624R).
    The published cell names follow that, so the whole index range shifts by one there.
    """
    divisions = np.asarray(divisions, dtype=np.int64)
    step = (2.0 * half_span) / divisions
    middle = (divisions // 2).astype(np.float64) * step + (-half_span)
    shift = ((divisions % 2 == 0) & (middle < 0)).astype(np.int64)
    return -(divisions // 2) + shift, -(-divisions // 2) - 1 + shift


def _lookup(values: np.ndarray, divisions: np.ndarray, half_span: float) -> np.ndarray:
    """Largest signed index whose edge is strictly below ``value`` (searchsorted 'left' minus one).

    Returns ``lo - 1`` where no edge lies below. The estimate from a division is off by at most
    one step near an edge; one comparison each way against the exact edges fixes it.
    """
    lo, hi = _index_range(divisions, half_span)
    step = (2.0 * half_span) / divisions
    est = np.ceil(values / step).astype(np.int64) - 1
    est = np.clip(est, lo - 1, hi)
    too_high = (est >= lo) & (_edges(est, divisions, half_span) >= values)
    est = est - too_high
    too_low = (est < hi) & (_edges(est + 1, divisions, half_span) < values)
    return est + too_low


def _as_int_array(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise TypeError(f"{what} must be integers, got {arr.dtype} values such as {arr.ravel()[:3]!r}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        bad = arr[~(np.isfinite(arr) & (arr == np.round(arr)))].ravel()[:5]
        raise ValueError(f"{what} must be whole numbers, got {bad.tolist()}")
    return arr.astype(np.int64)


def _maybe_scalar(arr: np.ndarray, scalar: bool) -> Any:
    return arr[()] if scalar else arr


# ----------------------------------------------------------------------------------------------
# the grid


class Grid:
    """Major TOM grid of spacing ``spacing_km`` restricted to rows with bottom edge in latitude_range.

    Immutable; per-row quantities (signed row, bottom latitude, column count) are cached as read-only
    numpy arrays, so every method is a handful of vectorised array operations.
    """

    __slots__ = (
        "_bottom",
        "_col_min",
        "_col_start",
        "_ncols",
        "_rows",
        "_top",
        "latitude_range",
        "max_row",
        "min_row",
        "n_meridian_divisions",
        "row_height_deg",
        "spacing_km",
    )

    def __init__(self, spacing_km: float = 10.0, latitude_range: tuple[float, float] = (-85.0, 85.0)) -> None:
        spacing = float(spacing_km)
        if not (math.isfinite(spacing) and spacing > 0):
            raise ValueError(f"spacing_km must be a positive number of kilometres, got {spacing_km!r}")
        lo, hi = (float(v) for v in latitude_range)
        if not (-90.0 <= lo <= hi <= 90.0):
            raise ValueError(f"latitude_range must satisfy -90 <= low <= high <= 90, got {latitude_range!r}")
        n = math.ceil(math.pi * EARTH_RADIUS_KM / spacing)
        k_lo, k_hi = (int(v) for v in _index_range(n, 90.0))
        all_rows = np.arange(k_lo, k_hi + 1, dtype=np.int64)
        bottoms = _edges(all_rows, n, 90.0)
        keep = (bottoms >= lo) & (bottoms <= hi)
        if not keep.any():
            raise ValueError(
                f"no grid row of the {spacing} km grid starts within latitudes {latitude_range!r}"
            )
        rows = all_rows[keep]
        bottom = bottoms[keep]
        # math.cos (not np.cos) on purpose: the column count is a ceil, and the reference's libm
        # cos is what decides it bit for bit; this is one call per row (~2,000), not per cell.
        circumference = [2 * math.pi * (EARTH_RADIUS_KM * math.cos(lat * math.pi / 180)) for lat in bottom]
        ncols = np.array([math.ceil(c / spacing) for c in circumference], dtype=np.int64)
        col_min, _ = _index_range(ncols, 180.0)
        col_start = np.concatenate([[0], np.cumsum(ncols)]).astype(np.int64)
        set_ = object.__setattr__
        set_(self, "spacing_km", spacing)
        set_(self, "latitude_range", (lo, hi))
        set_(self, "n_meridian_divisions", n)
        set_(self, "row_height_deg", 180.0 / n)
        set_(self, "min_row", int(rows[0]))
        set_(self, "max_row", int(rows[-1]))
        for name, arr in (
            ("_rows", rows),
            ("_bottom", bottom),
            ("_top", _edges(rows + 1, n, 90.0)),
            ("_ncols", ncols),
            ("_col_min", col_min),
            ("_col_start", col_start),
        ):
            arr = np.ascontiguousarray(arr)
            arr.flags.writeable = False
            set_(self, name, arr)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Grid is immutable; cannot set {name!r}")

    def __reduce__(self) -> tuple:
        return (Grid, (self.spacing_km, self.latitude_range))

    def __repr__(self) -> str:
        return (
            f"Grid(spacing_km={self.spacing_km}, latitude_range={self.latitude_range}, "
            f"rows={row_name(self.min_row)}..{row_name(self.max_row)}, cells={self.n_cells})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grid):
            return NotImplemented
        return (self.spacing_km, self.latitude_range) == (other.spacing_km, other.latitude_range)

    def __hash__(self) -> int:
        return hash((self.spacing_km, self.latitude_range))

    # -- per-row quantities -------------------------------------------------------------------

    @property
    def n_cells(self) -> int:
        return int(self._col_start[-1])

    def rows(self) -> np.ndarray:
        """All signed row ints of the grid, south to north (read-only)."""
        return self._rows

    def _row_index(self, row: Any) -> np.ndarray:
        r = _as_int_array(row, "row")
        bad = (r < self.min_row) | (r > self.max_row)
        if bad.any():
            names = np.atleast_1d(row_name(r[bad].ravel()[:5])).tolist()
            raise ValueError(
                f"row(s) {names} are not in this grid "
                f"({row_name(self.min_row)}..{row_name(self.max_row)}, spacing {self.spacing_km} km)"
            )
        return r - self.min_row

    def row_bottom_lat(self, row: Any) -> np.ndarray:
        return _maybe_scalar(self._bottom[self._row_index(row)], np.ndim(row) == 0)

    def row_top_lat(self, row: Any) -> np.ndarray:
        return _maybe_scalar(self._top[self._row_index(row)], np.ndim(row) == 0)

    def n_cols(self, row: Any) -> np.ndarray:
        """m = ceil(2*pi*R*cos(phi_bottom)/D) columns in each row."""
        return _maybe_scalar(self._ncols[self._row_index(row)], np.ndim(row) == 0)

    def col_width_deg(self, row: Any) -> np.ndarray:
        return _maybe_scalar(360.0 / self._ncols[self._row_index(row)], np.ndim(row) == 0)

    def col_range(self, row: Any) -> tuple[np.ndarray, np.ndarray]:
        """Westmost and eastmost signed column ints of each row: -floor(m/2) .. ceil(m/2)-1 (see _index_range)."""
        idx = self._row_index(row)
        scalar = np.ndim(row) == 0
        lo = self._col_min[idx]
        return _maybe_scalar(lo, scalar), _maybe_scalar(lo + self._ncols[idx] - 1, scalar)

    def cells_in_row(self, row: int) -> np.ndarray:
        """Signed column ints of one row, west to east (by bottom-left longitude)."""
        if np.ndim(row) != 0:
            raise ValueError(f"cells_in_row takes one row, got an array of shape {np.shape(row)}")
        i = int(self._row_index(row))
        return np.arange(self._col_min[i], self._col_min[i] + self._ncols[i], dtype=np.int64)

    def all_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of every cell, row by row south to north, each row west to east."""
        counts = self._ncols
        rows = np.repeat(self._rows, counts)
        cols = np.arange(self.n_cells, dtype=np.int64) - np.repeat(
            self._col_start[:-1] - self._col_min, counts
        )
        return rows, cols

    # -- cells ----------------------------------------------------------------------------------

    def _check_cells(self, row: Any, col: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row positions, signed cols and column counts, raising on cells not in the grid."""
        idx = self._row_index(row)
        c = _as_int_array(col, "col")
        idx, c = np.broadcast_arrays(idx, c)
        m = self._ncols[idx]
        lo = self._col_min[idx]
        bad = (c < lo) | (c >= lo + m)
        if bad.any():
            names = np.atleast_1d(cell_name(idx[bad] + self.min_row, c[bad]))[:5]
            raise ValueError(
                f"cell(s) {names.tolist()} are not in the {self.spacing_km} km grid (column out of range for the row)"
            )
        return idx, c, m

    def cell_corner(self, row: Any, col: Any) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) of each cell's bottom-left corner, as the reference computes them."""
        idx, c, m = self._check_cells(row, col)
        scalar = np.ndim(row) == 0 and np.ndim(col) == 0
        lat = self._bottom[idx]
        lon = _edges(c, m, 180.0)
        return _maybe_scalar(lat, scalar), _maybe_scalar(lon, scalar)

    def cell_bounds(self, row: Any, col: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(west, south, east, north) of each cell; east may exceed 180 for the antimeridian cell."""
        idx, c, m = self._check_cells(row, col)
        scalar = np.ndim(row) == 0 and np.ndim(col) == 0
        out = (_edges(c, m, 180.0), self._bottom[idx], _edges(c + 1, m, 180.0), self._top[idx])
        return tuple(_maybe_scalar(a, scalar) for a in out)  # type: ignore[return-value]

    def cell_centre(self, row: Any, col: Any) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) of each cell's centre, longitude wrapped into [-180, 180)."""
        west, south, east, north = (np.asarray(a) for a in self.cell_bounds(row, col))
        lon = (west + east) / 2.0
        lon = np.where(lon >= 180.0, lon - 360.0, lon)
        scalar = np.ndim(row) == 0 and np.ndim(col) == 0
        return _maybe_scalar((south + north) / 2.0, scalar), _maybe_scalar(lon, scalar)

    def cell_polygon(self, row: Any, col: Any, split_antimeridian: bool = False) -> Any:
        """Cell footprints as shapely boxes (one Polygon for scalars, an object array otherwise).

        The east-most cell of a row with an odd column count spans the antimeridian; by default its
        box runs past 180 (as the reference's); ``split_antimeridian=True`` returns it as a
        MultiPolygon of its two halves so it is valid in WGS84.
        """
        scalar = np.ndim(row) == 0 and np.ndim(col) == 0
        west, south, east, north = (np.atleast_1d(a) for a in self.cell_bounds(row, col))
        boxes = shapely.box(west, south, east, north)
        if split_antimeridian:
            cross = east > 180.0
            if cross.any():
                w, s, e, n = west[cross], south[cross], east[cross], north[cross]
                halves = np.concatenate([shapely.box(w, s, 180.0, n), shapely.box(-180.0, s, e - 360.0, n)])
                boxes = boxes.astype(object)
                boxes[cross] = shapely.multipolygons(halves, indices=np.tile(np.arange(w.size), 2))
        return boxes[0] if scalar else boxes

    def utm_epsg(self, row: Any, col: Any) -> np.ndarray:
        """EPSG code of each cell's UTM zone, from its bottom-left corner."""
        lat, lon = self.cell_corner(row, col)
        return utm_epsg_for_latlon(lat, lon)

    # -- look-ups ---------------------------------------------------------------------------------

    def _lookup_rows(self, lat: np.ndarray) -> np.ndarray:
        n = np.int64(self.n_meridian_divisions)
        return _lookup(lat, n, 90.0)

    def covers(self, lat: Any) -> np.ndarray:
        """True where a latitude falls inside one of this grid's rows (so latlon_to_cell accepts it)."""
        lat = np.asarray(lat, dtype=np.float64)
        ok = np.isfinite(lat) & (lat >= -90.0) & (lat <= 90.0)
        rows = self._lookup_rows(np.where(ok, lat, 0.0))
        return ok & (rows >= self.min_row) & (rows <= self.max_row)

    def latlon_to_cell(self, lat: Any, lon: Any) -> tuple[np.ndarray, np.ndarray]:
        """Signed (row, col) of the cell whose bottom-left corner is nearest below and left of each point.

        A point exactly on an edge goes to the row / column below (west). Longitudes outside
        [-180, 180] wrap modulo 360.
        Raises ValueError (quoting offending points) for non-finite input or latitudes outside the
        grid's rows.
        """
        scalar = np.ndim(lat) == 0 and np.ndim(lon) == 0
        lat, lon = np.broadcast_arrays(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))
        if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
            bad = ~(np.isfinite(lat) & np.isfinite(lon))
            raise ValueError(
                f"non-finite coordinates: {list(zip(lat[bad][:5].tolist(), lon[bad][:5].tolist()))}"
            )
        in_range = (lat >= -90.0) & (lat <= 90.0)
        rows = self._lookup_rows(np.where(in_range, lat, 0.0))
        ok = in_range & (rows >= self.min_row) & (rows <= self.max_row)
        if not ok.all():
            bad = lat[~ok].ravel()[:5].tolist()
            raise ValueError(
                f"{int((~ok).sum())} latitude(s) outside the grid rows {row_name(self.min_row)}.."
                f"{row_name(self.max_row)} (latitudes ({self._bottom[0]}, {self._top[-1]}]), e.g. {bad}"
            )
        lon = np.where((lon >= -180.0) & (lon <= 180.0), lon, np.mod(lon + 180.0, 360.0) - 180.0)
        idx = rows - self.min_row
        m = self._ncols[idx]
        cols = _lookup(lon, m, 180.0)
        lo = self._col_min[idx]
        cols = np.where(cols < lo, lo + m - 1, cols)  # west of the first edge: wraps to the east-most cell
        return _maybe_scalar(rows, scalar), _maybe_scalar(cols, scalar)

    def latlon_to_cell_name(self, lat: Any, lon: Any) -> Any:
        return cell_name(*self.latlon_to_cell(lat, lon))


def get_grid(spacing_km: float = 10.0, latitude_range: tuple[float, float] = (-85.0, 85.0)) -> Grid:
    """Shared Grid instance per (spacing, range); building one is cheap but not free."""
    lo, hi = latitude_range
    return _cached_grid(float(spacing_km), (float(lo), float(hi)))


@functools.lru_cache(maxsize=8)
def _cached_grid(spacing_km: float, latitude_range: tuple[float, float]) -> Grid:
    return Grid(spacing_km, latitude_range)


# ----------------------------------------------------------------------------------------------
# UTM zones


def utm_epsg_for_latlon(lat: Any, lon: Any) -> Any:
    """EPSG 326zz (lat >= 0) / 327zz of the UTM zone of each point, with the Norway and Svalbard zones."""
    scalar = np.ndim(lat) == 0 and np.ndim(lon) == 0
    lat, lon = np.broadcast_arrays(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))
    zone = np.mod(np.floor((lon + 180.0) / 6.0).astype(np.int64), 60) + 1
    zone = np.where((lat >= 56.0) & (lat < 64.0) & (lon >= 3.0) & (lon < 12.0), 32, zone)
    svalbard = (lat >= 72.0) & (lat < 84.0)
    for west, east, z in ((0.0, 9.0, 31), (9.0, 21.0, 33), (21.0, 33.0, 35), (33.0, 42.0, 37)):
        zone = np.where(svalbard & (lon >= west) & (lon < east), z, zone)
    epsg = np.where(lat >= 0.0, 32600, 32700) + zone
    return _maybe_scalar(epsg.astype(np.int64), scalar)


# ----------------------------------------------------------------------------------------------
# names


def _signed_names(values: Any, positive: str, negative: str, what: str) -> Any:
    """'<|v|><positive|negative>' for each int; a small lookup table over the value range keeps 1M names fast."""
    scalar = np.ndim(values) == 0
    v = _as_int_array(values, what)
    if scalar:
        x = int(v)
        return f"{abs(x)}{positive if x >= 0 else negative}"
    if v.size == 0:
        return np.empty(v.shape, dtype="<U2")
    lo, hi = int(v.min()), int(v.max())
    width = len(str(max(abs(lo), abs(hi)))) + 1
    if hi - lo <= 4 * v.size + 4096:
        table_values = np.arange(lo, hi + 1, dtype=np.int64)
        table = np.strings.add(
            np.abs(table_values).astype(f"<U{width}"), np.where(table_values >= 0, positive, negative)
        ).astype(f"<U{width}")
        return table[v - lo]
    return np.strings.add(np.abs(v).astype(f"<U{width}"), np.where(v >= 0, positive, negative)).astype(
        f"<U{width}"
    )


def row_name(row: Any) -> Any:
    """136 -> '136U', -12 -> '12D' (arrays give numpy string arrays)."""
    return _signed_names(row, "U", "D", "row")


def col_name(col: Any) -> Any:
    """496 -> '496R', -3 -> '3L' (arrays give numpy string arrays)."""
    return _signed_names(col, "R", "L", "col")


def cell_name(row: Any, col: Any) -> Any:
    """'136U_496R' for each (row, col)."""
    if np.ndim(row) == 0 and np.ndim(col) == 0:
        return f"{row_name(row)}_{col_name(col)}"
    r, c = np.broadcast_arrays(np.asarray(row), np.asarray(col))
    return np.strings.add(np.strings.add(row_name(r), "_"), col_name(c))


def _parse_signed(name: Any, pattern: re.Pattern, positive: str, what: str, example: str) -> int:
    if not isinstance(name, (str, np.str_)):
        raise TypeError(f"{what} name must be a string like {example!r}, got {name!r}")
    match = pattern.fullmatch(str(name))
    if match is None or (match.group(1) == "0" and match.group(2) != positive):
        raise ValueError(f"invalid {what} name {str(name)!r}: expected a form like {example!r}")
    value = int(match.group(1))
    return value if match.group(2) == positive else -value


def parse_row_name(name: str) -> int:
    """'136U' -> 136, '12D' -> -12; anything else (incl. '0D', '007U', path tricks) is a ValueError."""
    return _parse_signed(name, _ROW_RE, "U", "row", "136U")


def parse_col_name(name: str) -> int:
    """'496R' -> 496, '3L' -> -3."""
    return _parse_signed(name, _COL_RE, "R", "column", "496R")


def parse_cell_name(name: str) -> tuple[int, int]:
    """'136U_496R' -> (136, 496)."""
    if not isinstance(name, (str, np.str_)):
        raise TypeError(f"cell name must be a string like '136U_496R', got {name!r}")
    if str(name).count("_") != 1:
        raise ValueError(f"invalid cell name {str(name)!r}: expected a form like '136U_496R'")
    row_text, col_text = str(name).split("_")
    try:
        return parse_row_name(row_text), parse_col_name(col_text)
    except ValueError as err:
        raise ValueError(f"invalid cell name {str(name)!r}: {err}") from None


def _parse_listed(names: Iterable[Any], parse: Callable[[Any], Any], field: str, what: str) -> list[Any]:
    values = []
    for name in names:
        try:
            values.append(parse(name))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{field}: {name!r} is not a grid {what} ({exc})") from None
    return values


def parse_row_names(names: Iterable[Any], field: str = "rows") -> list[int]:
    """Rows of a user-given list (config, filter, CLI); one ValueError, for configs and filters
    alike, that quotes the bad name so a typo in a long list is found."""
    return _parse_listed(names, parse_row_name, field, "row name such as '136U' or '12D'")


def parse_cell_list(names: Iterable[Any], field: str = "cells") -> list[tuple[int, int]]:
    """(row, col) of a user-given list of cell names, with parse_row_names' error."""
    return _parse_listed(names, parse_cell_name, field, "cell name such as '136U_496R'")


def check_bbox(bbox: Sequence[float]) -> Sequence[float]:
    """A (min_lon, min_lat, max_lon, max_lat) filter box; min_lon > max_lon is allowed (it crosses
    the antimeridian), everything else out of range is a ValueError quoting the values."""
    min_lon, min_lat, max_lon, max_lat = bbox
    if not all(-180.0 <= v <= 180.0 for v in (min_lon, max_lon)):
        raise ValueError(f"bbox longitudes must lie in [-180, 180], got {min_lon}, {max_lon}")
    if not (-90.0 <= min_lat <= max_lat <= 90.0):
        raise ValueError(f"bbox latitudes must satisfy -90 <= min_lat <= max_lat <= 90, got {min_lat}, {max_lat}")
    return bbox


def _parse_signed_parts(parts: np.ndarray, positive: str, negative: str) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ``<digits><positive|negative>``: (signed values, valid mask) with parse_*_name's rules."""
    digits = np.strings.slice(parts, 0, -1)
    suffix = np.ascontiguousarray(np.strings.slice(parts, -1, None)).astype("<U1").view(np.uint32)
    n_digits = np.strings.str_len(digits)
    is_positive = suffix == ord(positive)
    is_negative = suffix == ord(negative)
    zero_first = np.strings.startswith(digits, "0")
    valid = (
        np.strings.isdecimal(digits)
        & (n_digits >= 1)
        & ~((n_digits > 1) & zero_first)
        & (is_positive | (is_negative & ~zero_first))
    )
    # decimal digits from the UCS-4 code points (str -> int casts are ~10x slower); invalid rows
    # are masked out by the caller, so their garbage values never escape
    width = digits.dtype.itemsize // 4
    codes = np.ascontiguousarray(digits).view(np.uint32).reshape(*digits.shape, width).astype(np.int64) - 48
    values = np.zeros(parts.shape, dtype=np.int64)
    for k in range(width):
        values = np.where(k < n_digits, values * 10 + codes[..., k], values)
    return np.where(is_negative, -values, values), valid


def parse_cell_names(names: Any) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised parse_cell_name for metadata columns (same rules; the first bad name is quoted)."""
    arr = np.asarray(names)
    if arr.size == 0:
        return np.empty(arr.shape, np.int64), np.empty(arr.shape, np.int64)
    if arr.dtype.kind == "O":
        if not all(isinstance(x, str) for x in arr.ravel()):
            bad = next(x for x in arr.ravel() if not isinstance(x, str))
            parse_cell_name(bad)  # raises TypeError quoting it
        arr = arr.astype(str)
    elif arr.dtype.kind != "U":
        raise TypeError(f"cell names must be strings like '136U_496R', got an array of {arr.dtype}")
    row_text, sep, col_text = np.strings.partition(arr, "_")
    rows, row_ok = _parse_signed_parts(row_text, "U", "D")
    cols, col_ok = _parse_signed_parts(col_text, "R", "L")
    # isdecimal also accepts non-ASCII digits, which the scalar parser rejects
    arr = np.ascontiguousarray(arr)
    ascii_only = arr.view(np.uint32).reshape(*arr.shape, -1).max(axis=-1) < 128
    ok = row_ok & col_ok & (sep == "_") & ascii_only
    if not ok.all():
        bad = arr[~ok].ravel()
        try:
            parse_cell_name(str(bad[0]))
        except ValueError as err:
            raise ValueError(f"{bad.size} invalid cell name(s); first: {err}") from None
        raise ValueError(f"{bad.size} invalid cell name(s), e.g. {bad[:3].tolist()}")
    return rows, cols


def valid_cells(names: Any, grid: Grid | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid mask, rows, cols) of a column of cell names, vectorised and never raising.

    A name is valid when it parses (parse_cell_name's rules: ``'136U_496R'``, no ``'0D'`` or
    leading zeros, ASCII only) and names a cell of ``grid`` (default: the 10 km grid): its row
    exists and its column lies in that row's range. Nulls, non-strings, ``''`` and text are
    invalid; their rows/cols are 0. Used to reject bad metadata rows and to verify files.
    """
    grid = grid or get_grid()
    arr = np.asarray(names, dtype=object) if not isinstance(names, np.ndarray) else names
    arr = np.atleast_1d(arr)
    n = arr.size
    rows = np.zeros(n, np.int64)
    cols = np.zeros(n, np.int64)
    if n == 0:
        return np.zeros(0, bool), rows, cols
    flat = arr.ravel()
    # anything that is not a string becomes its str() ('None', 'nan', '5', "b'..'"), which is
    # never a cell name: one C-level cast instead of an isinstance per row
    text = np.ascontiguousarray(flat if flat.dtype.kind == "U" else flat.astype(str))
    is_str = np.ones(n, bool)
    if text.dtype.itemsize == 0:   # every name empty
        return np.zeros(n, bool), rows, cols
    row_text, sep, col_text = np.strings.partition(text, "_")
    r, row_ok = _parse_signed_parts(row_text, "U", "D")
    c, col_ok = _parse_signed_parts(col_text, "R", "L")
    ascii_only = text.view(np.uint32).reshape(n, -1).max(axis=-1) < 128
    ok = is_str & row_ok & col_ok & (sep == "_") & ascii_only & (np.strings.str_len(text) <= 16)
    # inside the grid: the row exists and the column is within that row's range
    r = np.where(ok, r, grid.min_row)
    c = np.where(ok, c, 0)
    in_rows = (r >= grid.min_row) & (r <= grid.max_row)
    idx = np.clip(r - grid.min_row, 0, len(grid._ncols) - 1)
    lo = grid._col_min[idx]
    ok &= in_rows & (c >= lo) & (c < lo + grid._ncols[idx])
    rows[ok], cols[ok] = r[ok], c[ok]
    return ok, rows, cols
