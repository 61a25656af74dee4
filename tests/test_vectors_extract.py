"""Embeddings at points and over areas (vectors/extract.py), checked against brute force.

The store has the engine's layout (row partitions sorted by column and time) with small row
groups, so the test can see row groups being skipped; every result is compared with a plain
shapely test of every fragment footprint in every file, and the bytes read are counted.
"""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely

from majortom_assets import geoparquet
from majortom_assets.vectors import extract, testdata
from majortom_assets.vectors.iocount import ByteCounter


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return testdata.write_synthetic(tmp_path_factory.mktemp("ext"), "ext", dim=128, timestamps=2, seed=2,
                                    cells=testdata.cells_in_rows([300, 301, 302], 16, first_col=40, step=1),
                                    row_group_size=100)


def _all(store) -> pd.DataFrame:
    t = pd.concat([pq.read_table(p).to_pandas() for p in store.paths], ignore_index=True)
    t["shape"] = shapely.from_wkb(t["geometry"].to_numpy())
    return t


def _brute(store, geoms, start=None, end=None) -> set:
    t = _all(store)
    if start is not None:
        t = t[t["timestamp"] >= pd.Timestamp(start, tz="UTC")]
    if end is not None:
        t = t[t["timestamp"] <= pd.Timestamp(end, tz="UTC")]
    return {(i, uid) for i, g in enumerate(geoms)
            for uid in t["unique_id"][shapely.intersects(t["shape"].to_numpy(), g)]}


def _pairs(result) -> set:
    return set(zip(result.table.column("place_id").to_pylist(), result.table.column("unique_id").to_pylist()))


def _points_in(store, n, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    lab = store.labels
    lat = rng.uniform(lab.centre_lat.min() - 0.1 * spread, lab.centre_lat.max() + 0.1 * spread, n)
    lon = rng.uniform(lab.centre_lon.min() - 0.1 * spread, lab.centre_lon.max() + 0.1 * spread, n)
    return lat, lon


def test_points_match_brute_force_with_and_without_time(store):
    lat, lon = _points_in(store, 400, 0)
    places = extract.Places.points(lat, lon)
    result = extract.extract(store.paths, places)
    assert _pairs(result) == _brute(store, places.geometry)
    assert result.places_matched > 200 and result.table.num_rows > result.places_matched  # overlaps, 2 dates
    later = extract.extract(store.paths, places, start="2021-01-15")
    assert _pairs(later) == _brute(store, places.geometry, start="2021-01-15")
    assert set(later.table.column("timestamp").to_pandas().dt.strftime("%F")) == {"2021-01-31"}
    # every row carries the fragment's embedding, exactly as stored
    full = _all(store).set_index("unique_id")
    uid = result.table.column("unique_id")[0].as_py()
    np.testing.assert_array_equal(geoparquet.embedding_matrix(result.table.column("embedding"))[0],
                                  np.asarray(full.loc[uid, "embedding"], np.float32))


def test_areas_match_brute_force(store):
    lab = store.labels
    c = lab.iloc[20]
    areas = [shapely.box(c.centre_lon - 0.02, c.centre_lat - 0.01, c.centre_lon + 0.03, c.centre_lat + 0.02),
             shapely.Point(lab.iloc[3].centre_lon, lab.iloc[3].centre_lat).buffer(0.05),
             shapely.box(0, -80, 1, -79)]                       # nowhere near the store
    places = extract.Places.areas(areas, pd.DataFrame({"name": ["field", "lake", "far"]}))
    result = extract.extract(store.paths, places)
    assert _pairs(result) == _brute(store, places.geometry) and result.places_matched == 2
    assert set(result.table.column("name").to_pylist()) == {"field", "lake"}


def test_clustered_points_read_only_their_row_groups(store):
    cell = store.labels.iloc[5]             # row 300U
    rng = np.random.default_rng(3)
    lat = cell.centre_lat + rng.uniform(-0.01, 0.01, 50)
    lon = cell.centre_lon + rng.uniform(-0.01, 0.01, 50)
    places = extract.Places.points(lat, lon)
    counter = ByteCounter()
    result = extract.extract(store.paths, places, counter=counter)
    assert _pairs(result) == _brute(store, places.geometry)
    assert result.places_matched == 50
    opened = [p for p in result.plans if not p.skipped]
    assert len(opened) == 1 and sum(p.skipped for p in result.plans) == 2   # other rows: not even opened
    plan = opened[0]
    assert plan.candidate_groups <= 3 < plan.row_groups
    store_bytes = sum(p.stat().st_size for p in store.paths)
    assert counter.bytes_read < 0.15 * store_bytes, counter.summary()
    # scattered points: everything is a candidate, and the counter says so
    scattered = ByteCounter()
    extract.extract(store.paths, extract.Places.points(*_points_in(store, 300, 4)), counter=scattered)
    assert scattered.bytes_read > 0.8 * store_bytes


def test_places_files_csv_geojson_geoparquet(store, tmp_path):
    lat, lon = _points_in(store, 30, 5)
    pd.DataFrame({"Name": [f"p{i}" for i in range(30)], "Latitude": lat, "LON": lon}).to_csv(tmp_path / "p.csv",
                                                                                            index=False)
    frame = gpd.GeoDataFrame({"Name": [f"p{i}" for i in range(30)]}, geometry=gpd.points_from_xy(lon, lat),
                             crs="EPSG:4326")
    frame.to_file(tmp_path / "p.geojson", driver="GeoJSON")
    frame.to_crs("EPSG:3857").to_parquet(tmp_path / "p.parquet")          # reprojected back on read
    results = [extract.extract(store.paths, extract.read_points(tmp_path / f)) for f in
               ("p.csv", "p.geojson", "p.parquet")]
    for r in results[1:]:
        assert _pairs(r) == _pairs(results[0])
    assert results[0].table.column("Name").to_pylist()[0].startswith("p")
    extract.write_result(results[0], tmp_path / "out.parquet")
    out = gpd.read_parquet(tmp_path / "out.parquet")
    assert out.crs.equals("OGC:CRS84") and set(out.geom_type) == {"Polygon"}
    assert isinstance(out["place_geometry"], gpd.GeoSeries) and set(out["place_geometry"].geom_type) == {"Point"}
    assert out["place_geometry"].within(out.geometry.buffer(1e-9)).all()
    meta = json.loads(pq.read_schema(tmp_path / "out.parquet").metadata[b"majortom:extract"])
    assert meta["places"] == 30 and meta["bytes_read"] > 0
    assert pq.read_schema(tmp_path / "out.parquet").metadata[geoparquet.META_RANDOM] == b"true"


def test_bad_places_files_name_the_problem(tmp_path):
    (tmp_path / "a.csv").write_text("name,x1,y1\na,1,2\n")
    with pytest.raises(ValueError, match=r"a.csv needs lat and lon columns.*'x1'"):
        extract.read_points(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("lat,lon\n10,20\n95,20\nabc,3\n")
    with pytest.raises(ValueError, match=r"b.csv: 2 point\(s\) with invalid coordinates, first at place 1: lat=95"):
        extract.read_points(tmp_path / "b.csv")
    gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:4326").to_file(tmp_path / "c.geojson")
    with pytest.raises(ValueError, match=r"c.geojson holds \['Polygon'\].*--geometry"):
        extract.read_points(tmp_path / "c.geojson")
    (tmp_path / "d.geojson").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read places file"):
        extract.read_areas(tmp_path / "d.geojson")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        extract.read_points(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="nope.parquet does not exist"):
        extract.extract([tmp_path / "nope.parquet"], extract.Places.points([1.0], [2.0]))


def test_west_and_south_cells_are_found(tmp_path):
    """Negative rows (D) and columns (L) around the prime meridian and the equator's south."""
    west = testdata.write_synthetic(tmp_path, "west", dim=16, seed=6, row_group_size=64,
                                    cells=testdata.cells_in_rows([-200, -199, -1, 0], 6, first_col=-3, step=1))
    assert any("L" in c for c in west.labels.grid_cell) and any("D" in c for c in west.labels.grid_cell)
    lat, lon = _points_in(west, 300, 7, spread=0.3)
    lat = np.concatenate([lat, west.labels.centre_lat.to_numpy()])
    lon = np.concatenate([lon, west.labels.centre_lon.to_numpy()])
    places = extract.Places.points(lat, lon)
    result = extract.extract(west.paths, places)
    assert _pairs(result) == _brute(west, places.geometry)
    assert set(west.labels.grid_cell) <= set(result.table.column("grid_cell").to_pylist())
    one = west.labels.iloc[0]              # a point in row 200D only: the other rows stay unopened
    single = extract.extract(west.paths, extract.Places.points([one.centre_lat], [one.centre_lon]))
    assert single.places_matched == 1 and sum(p.skipped for p in single.plans) >= 2
