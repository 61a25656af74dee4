"""Grid tests: expected values come from STANDARD.md §2 formulas evaluated here with `math`,
or from the reference's own construction recipe (linspace / mod / sort / searchsorted), never from
the helpers under test."""

import math
import pickle

import numpy as np
import pytest
import shapely

from majortom_assets.grid import (
    EARTH_RADIUS_KM,
    Grid,
    cell_name,
    check_bbox,
    col_name,
    get_grid,
    parse_cell_list,
    parse_cell_name,
    parse_cell_names,
    parse_col_name,
    parse_row_name,
    parse_row_names,
    row_name,
    utm_epsg_for_latlon,
)

R = 6378.137


@pytest.fixture(scope="module")
def grid() -> Grid:
    return Grid()


@pytest.fixture(scope="module")
def grid100() -> Grid:
    return Grid(100.0)


def n_divisions(d_km: float) -> int:
    return math.ceil(math.pi * R / d_km)


def expected_cols(lat_deg: float, d_km: float) -> int:
    return math.ceil(2 * math.pi * R * math.cos(math.radians(lat_deg)) / d_km)


def reference_row_edges(d_km: float) -> tuple[np.ndarray, np.ndarray]:
    """(signed rows, bottom latitudes) built the way the reference builds them."""
    n = n_divisions(d_km)
    lats = np.sort(np.mod(np.linspace(-90, 90, n + 1)[:-1], 180) - 90)
    zero = int(np.searchsorted(lats, 0))
    return np.arange(n) - zero, lats


def reference_col_edges(lat: float, d_km: float) -> tuple[np.ndarray, np.ndarray]:
    m = math.ceil(2 * math.pi * (R * math.cos(lat * math.pi / 180)) / d_km)
    lons = np.sort(np.mod(np.linspace(-180, 180, m + 1)[:-1], 360) - 180)
    zero = int(np.nonzero(lons == 0)[0][0])
    return np.arange(m) - zero, lons


# ---------------------------------------------------------------------------------------- rows


def test_constants_and_row_count(grid):
    assert EARTH_RADIUS_KM == R
    assert grid.n_meridian_divisions == n_divisions(10) == 2004
    assert grid.row_height_deg == pytest.approx(180 / 2004)
    kept = [k for k in range(-1002, 1002) if -85 <= k * 180 / 2004 <= 85]
    assert len(grid.rows()) == len(kept) == 1893
    assert (grid.min_row, grid.max_row) == (min(kept), max(kept)) == (-946, 946)
    assert np.array_equal(grid.rows(), np.arange(-946, 947))


def test_row_bottoms_match_reference_bit_for_bit(grid):
    rows, lats = reference_row_edges(10)
    keep = (lats >= -85) & (lats <= 85)
    assert np.array_equal(grid.rows(), rows[keep])
    assert np.array_equal(grid.row_bottom_lat(grid.rows()), lats[keep])  # exact, not approx


def test_rows_at_known_latitudes(grid):
    h = 180 / 2004
    # a point exactly on the equator lies on the edge between 1D and 0U and goes below (STANDARD §2)
    assert row_name(grid.latlon_to_cell(0.0, 10.0)[0]) == "1D"
    assert row_name(grid.latlon_to_cell(1e-9, 10.0)[0]) == "0U"
    assert row_name(grid.latlon_to_cell(-0.001, 10.0)[0]) == "1D"
    for lat, lon in [(41.9028, 12.4964), (59.9139, 10.7522), (-34.6037, -58.3816), (-33.8688, 151.2093)]:
        k = math.floor(lat / h)
        expected = f"{k}U" if k >= 0 else f"{-k}D"
        assert row_name(grid.latlon_to_cell(lat, lon)[0]) == expected
    assert row_name(grid.latlon_to_cell(41.9028, 12.4964)[0]) == "466U"  # Rome
    assert row_name(grid.latlon_to_cell(59.9139, 10.7522)[0]) == "667U"  # Oslo


def test_cells_at_known_places(grid):
    h = 180 / 2004
    for lat, lon in [(41.9028, 12.4964), (59.9139, 10.7522), (-34.6037, -58.3816), (64.1466, -21.9426)]:
        k = math.floor(lat / h)
        m = expected_cols(k * h, 10)
        j = math.floor(lon / (360 / m))
        row, col = grid.latlon_to_cell(lat, lon)
        assert (int(row), int(col)) == (k, j)
        assert (
            grid.latlon_to_cell_name(lat, lon)
            == f"{abs(k)}{'U' if k >= 0 else 'D'}_{abs(j)}{'R' if j >= 0 else 'L'}"
        )


# ------------------------------------------------------------------------------------- columns


def test_column_counts_per_row(grid):
    h = 180 / 2004
    expected = np.array([expected_cols(k * h, 10) for k in range(-946, 947)])
    assert np.array_equal(grid.n_cols(grid.rows()), expected)
    assert grid.n_cols(0) == math.ceil(2 * math.pi * R / 10) == 4008
    assert np.allclose(grid.col_width_deg(grid.rows()), 360 / expected)


def test_all_cells_count_and_order(grid):
    h = 180 / 2004
    total = sum(expected_cols(k * h, 10) for k in range(-946, 947))
    rows, cols = grid.all_cells()
    assert rows.shape == cols.shape == (total,)
    assert grid.n_cells == total
    assert np.all(np.diff(rows) >= 0)
    for k in (-946, -800, 0, 1, 500, 946):
        in_row = cols[rows == k]
        assert np.array_equal(in_row, grid.cells_in_row(k))
        assert in_row.size == expected_cols(k * h, 10)
        assert np.all(np.diff(in_row) == 1)


@pytest.mark.parametrize("row", [-946, -800, -502, -1, 0, 1, 321, 502, 800, 946])
def test_column_edges_match_reference_bit_for_bit(grid, row):
    ref_rows, ref_lats = reference_row_edges(10)
    lat = ref_lats[ref_rows == row][0]
    js, lons = reference_col_edges(lat, 10)
    assert np.array_equal(grid.cells_in_row(row), js)
    corner_lat, corner_lon = grid.cell_corner(np.full(js.size, row), js)
    assert np.all(corner_lat == lat)
    assert np.array_equal(corner_lon, lons)


def test_reference_quirk_row_800D_runs_623L_to_624R(grid):
    # (m/2)*(360/m) - 180 rounds just below zero there, so the reference names the column at the
    # antimeridian 624R instead of 624L; the published cell names follow it.
    ref_rows, ref_lats = reference_row_edges(10)
    js, _ = reference_col_edges(ref_lats[ref_rows == -800][0], 10)
    assert (js.min(), js.max()) == (-623, 624)
    lo, hi = grid.col_range(-800)
    assert (col_name(lo), col_name(hi)) == ("623L", "624R")


def test_lookups_match_reference_searchsorted_for_100km(grid100):
    ref_rows, ref_lats = reference_row_edges(100)
    keep = (ref_lats >= -85) & (ref_lats <= 85)
    ref_rows, ref_lats = ref_rows[keep], ref_lats[keep]
    rng = np.random.default_rng(7)
    lat = rng.uniform(ref_lats[0] + 1e-6, 85.0, 20000)
    lon = rng.uniform(-180, 180, 20000)
    # add points exactly on row and column edges
    pick = rng.integers(1, ref_lats.size, 200)
    lat = np.concatenate([lat, ref_lats[pick], ref_lats[pick] + 0.3])
    lon = np.concatenate([lon, rng.uniform(-180, 180, 200), np.zeros(200)])
    edge_lats = []
    edge_lons = []
    for k_idx in pick[:50]:
        _, lons = reference_col_edges(ref_lats[k_idx], 100)
        edge_lats.append(np.full(lons.size, ref_lats[k_idx] + 0.2))
        edge_lons.append(lons)
    lat = np.concatenate([lat, *edge_lats, [10.0, 10.0, -20.0]])
    lon = np.concatenate([lon, *edge_lons, [-180.0, 180.0, 180.0]])

    rows, cols = grid100.latlon_to_cell(lat, lon)
    ri = np.searchsorted(ref_lats, lat) - 1
    assert np.array_equal(rows, ref_rows[ri])
    for k in np.unique(rows):
        sel = rows == k
        js, lons = reference_col_edges(ref_lats[ref_rows == k][0], 100)
        assert np.array_equal(cols[sel], js[np.searchsorted(lons, lon[sel]) - 1])


# ------------------------------------------------------------------------------ edges and poles


def test_points_exactly_on_edges_go_below_and_left(grid):
    h = 180 / 2004
    k = 300
    m = expected_cols(k * h, 10)
    lat_mid = (k + 0.5) * h
    # on a column edge (an exact multiple of 360/m that the reference also produces exactly)
    corner_lat, corner_lon = grid.cell_corner(k, 40)
    ref_rows, ref_lats = reference_row_edges(10)
    js, lons = reference_col_edges(ref_lats[ref_rows == k][0], 10)
    assert corner_lon == lons[js == 40][0] and corner_lat == ref_lats[ref_rows == k][0]
    assert tuple(map(int, grid.latlon_to_cell(lat_mid, corner_lon))) == (k, 39)
    assert tuple(map(int, grid.latlon_to_cell(lat_mid, corner_lon + 1e-9))) == (k, 40)
    # on a row edge: the point belongs to the row below, looked up with that row's columns
    lon = 40.5 * (360 / m)
    m_below = expected_cols((k - 1) * h, 10)
    assert tuple(map(int, grid.latlon_to_cell(corner_lat, lon))) == (k - 1, math.floor(lon / (360 / m_below)))
    # longitude 0 is the west edge of 0R, so it belongs to 1L
    assert int(grid.latlon_to_cell(lat_mid, 0.0)[1]) == -1


def test_antimeridian(grid):
    h = 180 / 2004
    k = 0
    m = expected_cols(0.0, 10)  # 4008 columns: 2004L .. 2003R, edges at exactly -180 and 180
    lat = 0.5 * h
    east = m // 2 - 1
    assert int(grid.latlon_to_cell(lat, 179.999)[1]) == east
    assert int(grid.latlon_to_cell(lat, 180.0)[1]) == east
    assert int(grid.latlon_to_cell(lat, -180.0)[1]) == east  # on the first edge: wraps to the east-most
    assert int(grid.latlon_to_cell(lat, -179.999)[1]) == -m // 2
    assert int(grid.latlon_to_cell(lat, 540.0)[1]) == east
    assert int(grid.latlon_to_cell(lat, 190.0)[1]) == math.floor(-170.0 / (360 / m))
    assert int(grid.latlon_to_cell(lat, -190.0)[1]) == math.floor(170.0 / (360 / m))
    w, _, e, _ = grid.cell_bounds(k, east)
    assert e == 180.0 and w == pytest.approx(180 - 360 / m)


def test_odd_column_rows_straddle_the_antimeridian(grid):
    h = 180 / 2004
    k = next(k for k in range(900, 947) if expected_cols(k * h, 10) % 2 == 1)
    m = expected_cols(k * h, 10)
    lat = (k + 0.5) * h
    lo, hi = grid.col_range(k)
    assert (lo, hi) == (-(m - 1) // 2, (m - 1) // 2)
    # the first column's west edge is half a column east of -180; -180 belongs to the east-most cell
    assert int(grid.latlon_to_cell(lat, -180.0)[1]) == hi
    assert int(grid.latlon_to_cell(lat, -180 + 0.25 * 360 / m)[1]) == hi
    assert int(grid.latlon_to_cell(lat, 180.0)[1]) == hi
    poly = grid.cell_polygon(k, hi)
    assert poly.bounds[2] == pytest.approx(180 + 180 / m)
    split = grid.cell_polygon(k, hi, split_antimeridian=True)
    assert split.geom_type == "MultiPolygon" and len(split.geoms) == 2
    assert split.area == pytest.approx(poly.area)
    minx, _, maxx, _ = split.bounds
    assert minx == -180.0 and maxx == 180.0
    arr = grid.cell_polygon(np.array([k, k]), np.array([hi, 0]), split_antimeridian=True)
    assert [g.geom_type for g in arr] == ["MultiPolygon", "Polygon"]


def test_high_latitude_limits(grid):
    top = 946 * 180 / 2004
    assert row_name(grid.latlon_to_cell(85.0, 0.5)[0]) == "946U"
    assert row_name(grid.latlon_to_cell(-84.97, 0.5)[0]) == "946D"
    with pytest.raises(ValueError, match="outside the grid rows 946D..946U"):
        grid.latlon_to_cell(top + 180 / 2004 + 1e-6, 0.0)
    bottom = grid.row_bottom_lat(-946)
    with pytest.raises(ValueError, match="outside"):
        grid.latlon_to_cell(bottom, 0.0)  # on the bottom edge: the row below is not in the grid
    with pytest.raises(ValueError, match="outside"):
        grid.latlon_to_cell([10.0, 91.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        grid.latlon_to_cell(np.nan, 0.0)
    assert grid.covers([0.0, 85.0, 89.0, bottom, -84.97, np.nan]).tolist() == [
        True,
        True,
        False,
        False,
        True,
        False,
    ]


def test_full_latitude_range_grid():
    g = Grid(10.0, latitude_range=(-90.0, 90.0))
    assert len(g.rows()) == 2004
    assert row_name(g.latlon_to_cell(90.0, 0.0)[0]) == "1001U"
    assert row_name(g.latlon_to_cell(-89.99, 0.0)[0]) == "1002D"


# ------------------------------------------------------------------------------- round trips


def test_round_trips_for_random_cells(grid):
    rows, cols = grid.all_cells()
    rng = np.random.default_rng(0)
    pick = rng.choice(rows.size, 5000, replace=False)
    r, c = rows[pick], cols[pick]
    names = cell_name(r, c)
    for name, rr, cc in zip(names[:500].tolist(), r[:500].tolist(), c[:500].tolist()):
        assert parse_cell_name(name) == (rr, cc)
    pr, pc = parse_cell_names(names)
    assert np.array_equal(pr, r) and np.array_equal(pc, c)
    pr, pc = parse_cell_names(names[::2].astype(object))  # non-contiguous, object dtype (pandas columns)
    assert np.array_equal(pr, r[::2]) and np.array_equal(pc, c[::2])
    lat, lon = grid.cell_corner(r, c)
    back = grid.latlon_to_cell(lat + 1e-9, lon + 1e-9)
    assert np.array_equal(back[0], r) and np.array_equal(back[1], c)
    clat, clon = grid.cell_centre(r, c)
    back = grid.latlon_to_cell(clat, clon)
    assert np.array_equal(back[0], r) and np.array_equal(back[1], c)
    polys = grid.cell_polygon(r[:200], c[:200])
    assert shapely.contains_xy(polys, clon[:200], clat[:200]).all()


def test_another_spacing_100km(grid100):
    n = n_divisions(100)
    assert grid100.n_meridian_divisions == n == 201
    h = 180 / n
    kept = [k for k in range(-(n // 2), n - n // 2) if -85 <= k * h <= 85]
    assert np.array_equal(grid100.rows(), np.array(kept))
    expected = [expected_cols(k * h, 100) for k in kept]
    assert np.array_equal(grid100.n_cols(grid100.rows()), expected)
    assert grid100.all_cells()[0].size == sum(expected)
    k = math.floor(41.9028 / h)
    m = expected_cols(k * h, 100)
    assert grid100.latlon_to_cell_name(41.9028, 12.4964) == f"{k}U_{math.floor(12.4964 / (360 / m))}R"


# ------------------------------------------------------------------------------------------ UTM


@pytest.mark.parametrize(
    "lat, lon, epsg",
    [
        (41.9028, 12.4964, 32633),  # Rome
        (59.9139, 10.7522, 32632),  # Oslo
        (60.3913, 5.3221, 32632),  # Bergen: Norway exception (would be 31)
        (78.2232, 15.6267, 32633),  # Longyearbyen
        (78.9250, 11.9300, 32633),  # Ny-Alesund: Svalbard exception (would be 32)
        (80.0, 19.0, 32633),  # Svalbard exception (would be 34)
        (79.0, 27.0, 32635),
        (80.0, 35.0, 32637),  # Svalbard exception (would be 36)
        (-33.8688, 151.2093, 32756),  # Sydney
        (-34.6037, -58.3816, 32721),  # Buenos Aires
        (-33.9249, 18.4241, 32734),  # Cape Town
        (51.5072, -0.1276, 32630),  # London
    ],
)
def test_utm_epsg_known_places(grid, lat, lon, epsg):
    zone = math.floor((lon + 180) / 6) % 60 + 1
    if epsg % 100 != zone:  # only exceptions may differ from the plain 6-degree zone
        assert (56 <= lat < 64 and 3 <= lon < 12) or 72 <= lat < 84
    row, col = grid.latlon_to_cell(lat, lon)
    assert grid.utm_epsg(row, col) == epsg
    assert grid.utm_epsg(np.array([row]), np.array([col])).tolist() == [epsg]


def test_utm_zone_boundaries():
    assert utm_epsg_for_latlon(56.0, 3.0) == 32632
    assert utm_epsg_for_latlon(64.0, 5.0) == 32631
    assert utm_epsg_for_latlon(55.99, 5.0) == 32631
    assert utm_epsg_for_latlon(84.0, 5.0) == 32631
    assert utm_epsg_for_latlon(72.0, 9.0) == 32633
    assert utm_epsg_for_latlon(-0.0001, 0.5) == 32731
    assert utm_epsg_for_latlon(0.0, -180.0) == 32601
    assert utm_epsg_for_latlon(0.0, 179.99) == 32660


# ---------------------------------------------------------------------------------------- names


def test_names_scalar_and_vectorised():
    assert row_name(136) == "136U" and row_name(-12) == "12D" and row_name(0) == "0U"
    assert col_name(496) == "496R" and col_name(-3) == "3L"
    assert cell_name(136, 496) == "136U_496R"
    rng = np.random.default_rng(3)
    r = rng.integers(-946, 947, 1000)
    c = rng.integers(-2004, 2004, 1000)
    expected = [f"{abs(a)}{'U' if a >= 0 else 'D'}_{abs(b)}{'R' if b >= 0 else 'L'}" for a, b in zip(r, c)]
    assert cell_name(r, c).tolist() == expected
    assert row_name(np.array([5, -5])).tolist() == ["5U", "5D"]
    assert col_name(np.array([10**7, -1])).tolist() == ["10000000R", "1L"]  # wide value range path
    assert cell_name(np.array([1, 2]), 3).tolist() == ["1U_3R", "2U_3R"]
    assert parse_row_name("136U") == 136 and parse_row_name("12D") == -12 and parse_row_name("0U") == 0
    assert parse_col_name("3L") == -3 and parse_cell_name("1D_0R") == (-1, 0)


@pytest.mark.parametrize("bad", ["", "U", "12", "12X", "0D", "007U", "-3U", "1U ", "1U\n", "../1U", "1u"])
def test_parse_row_name_errors_quote_the_text(bad):
    with pytest.raises(ValueError) as err:
        parse_row_name(bad)
    assert repr(bad) in str(err.value)



def test_name_lists_parse_to_signed_numbers():
    assert parse_row_names(["136U", "12D", "0U"]) == [136, -12, 0]
    assert parse_cell_list(["136U_496R", "1D_3L"]) == [(136, 496), (-1, -3)]
    assert parse_row_names([]) == [] and parse_cell_list(()) == []


@pytest.mark.parametrize("bad", ["12X", "007U", "", 7, None])
def test_row_list_error_names_the_list_and_quotes_the_bad_entry(bad):
    with pytest.raises(ValueError) as err:  # a non-string (TypeError inside) surfaces as ValueError too
        parse_row_names(["136U", bad], field="filter rows")
    assert str(err.value).startswith(f"filter rows: {bad!r} is not a grid row name")


def test_cell_list_error_quotes_the_bad_entry():
    with pytest.raises(ValueError, match=r"^cells: '136U-496R' is not a grid cell name"):
        parse_cell_list(["1U_1R", "136U-496R"])


def test_check_bbox_accepts_antimeridian_boxes_and_names_the_bad_axis():
    assert check_bbox((179.0, -5.0, -179.0, 5.0)) == (179.0, -5.0, -179.0, 5.0)
    assert check_bbox([-180, -90, 180, 90]) == [-180, -90, 180, 90]
    with pytest.raises(ValueError, match="latitudes .* got 10, 5"):
        check_bbox((0, 10, 1, 5))
    with pytest.raises(ValueError, match="latitudes .* got -91, 0"):
        check_bbox((0, -91, 1, 0))
    with pytest.raises(ValueError, match=r"longitudes must lie in \[-180, 180\], got 0, 190"):
        check_bbox((0, 0, 190, 10))

BAD_CELLS = [
    "1U",
    "1U_",
    "_1R",
    "1U_2R_3L",
    "1U-2R",
    "1X_2R",
    "1U_0L",
    "0D_1R",
    "01U_1R",
    "1u_1R",
    "\u0663U_1R",
    " 1U_1R",
    "1U_1R\n",
]


@pytest.mark.parametrize("bad", BAD_CELLS)
def test_parse_cell_name_errors_quote_the_text(bad):
    with pytest.raises(ValueError) as err:
        parse_cell_name(bad)
    assert repr(bad) in str(err.value)
    with pytest.raises(ValueError) as err:
        parse_cell_names(["1U_1R", bad, "2D_3L"])
    assert repr(bad) in str(err.value)


def test_parse_rejects_non_strings():
    for parse in (parse_row_name, parse_col_name, parse_cell_name):
        with pytest.raises(TypeError, match="must be a string"):
            parse(12)


def test_parse_cell_names_reports_bad_entry():
    with pytest.raises(ValueError, match="'2U_x'"):
        parse_cell_names(["1U_1R", "2U_x"])


# --------------------------------------------------------------------------------- validation


def test_bad_arguments(grid):
    for bad in (0, -5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="spacing_km"):
            Grid(bad)
    with pytest.raises(ValueError, match="latitude_range"):
        Grid(10, latitude_range=(10, -10))
    with pytest.raises(ValueError, match="947U"):
        grid.cell_corner(947, 0)
    with pytest.raises(ValueError, match="0U_2004R"):
        grid.cell_corner(0, 2004)
    with pytest.raises(TypeError, match="integers"):
        grid.cell_corner("1U", 0)
    with pytest.raises(ValueError, match="whole numbers"):
        grid.n_cols(0.5)


def test_immutable_picklable_cached(grid):
    with pytest.raises(AttributeError):
        grid.spacing_km = 5.0
    with pytest.raises(ValueError):
        grid.rows()[0] = 3
    clone = pickle.loads(pickle.dumps(grid))
    assert clone == grid and clone.n_cells == grid.n_cells
    assert get_grid() is get_grid(10.0, (-85.0, 85.0))
