"""Fragment-grid GeoParquet: rows per Algorithm 1, footprints from the affine, round trip, skips."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import pytest
import shapely
from affine import Affine
from rasterio.io import MemoryFile

from majortom_assets import fragment_grid, synthetic
from majortom_assets.core import CoreCollection, SampleFailure
from majortom_assets.fragment import fragment_layout

SIZE = 120
FRAGMENT = 56
OVERLAP = 0.1


@pytest.fixture(scope="module")
def collections(tmp_path_factory) -> dict[str, CoreCollection]:
    base = tmp_path_factory.mktemp("fragment_grid")
    cells = synthetic.default_cells()   # includes cells at +-180 and in UTM exception zones
    out = {}
    for source in ("S2L2A", "S1RTC"):
        path = synthetic.generate_collection(base / source, source, cells=cells, size=SIZE, seed=4)
        out[source] = CoreCollection(str(path))
    return out


def _header(data: bytes):
    with MemoryFile(bytes(data)) as mem, mem.open() as ds:
        return ds.height, ds.width, tuple(ds.transform)[:6], ds.crs.to_string()


def test_sample_grid_reads_the_header_like_gdal(collections):
    for source, collection in collections.items():
        band = fragment_grid.REFERENCE_BAND[source]
        for _, row in collection.metadata().iterrows():
            raw = collection.read_raw(row.parquet_url, row.parquet_row, [band])[band]
            assert fragment_grid.sample_grid(raw) == _header(raw)
            assert fragment_grid.sample_grid(raw)[3] == row.crs


def test_sample_grid_without_a_crs_is_a_value_error():
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=8, height=8, count=1, dtype="uint16",
                      transform=Affine(10, 0, 0, 0, -10, 0)) as ds:
            ds.write(np.zeros((8, 8), np.uint16), 1)
        data = mem.read()
    with pytest.raises(ValueError, match="no CRS"):
        fragment_grid.sample_grid(data)


def _expected_footprints(transform, crs, boxes):
    """Corners and centres through the affine and pyproj, one fragment at a time."""
    to_wgs = pyproj.Transformer.from_crs(crs, "OGC:CRS84", always_xy=True)
    a, b, c, d, e, f = transform
    out = []
    for r0, c0, r1, c1 in boxes.tolist():
        corners = [(c + a * col + b * row, f + d * col + e * row) for row, col in
                   ((r1, c0), (r1, c1), (r0, c1), (r0, c0))]
        cx, cy = c + a * (c0 + c1) / 2 + b * (r0 + r1) / 2, f + d * (c0 + c1) / 2 + e * (r0 + r1) / 2
        lon, lat = to_wgs.transform(cx, cy)
        out.append((shapely.Polygon(corners), [to_wgs.transform(x, y) for x, y in corners], lat, lon))
    return out


def test_fragment_rows_follow_algorithm_1_and_the_affine(collections):
    collection = collections["S2L2A"]
    meta = collection.metadata()
    tables, skipped = fragment_grid.samples_fragment_rows(collection, meta, "S2L2A", FRAGMENT, OVERLAP)
    assert skipped == [] and len(tables) == len(meta)
    layout = fragment_layout(SIZE, SIZE, FRAGMENT, OVERLAP)
    for (_, row), table in zip(meta.iterrows(), tables):
        assert table.schema.equals(fragment_grid.FRAGMENT_SCHEMA)
        assert table.num_rows == layout.count
        frame = table.to_pandas()
        assert (frame["source"] == "S2L2A").all() and (frame["product_id"] == row.product_id).all()
        assert (frame["grid_cell"] == row.grid_cell).all()
        assert (frame[["grid_row_u", "grid_col_r"]] == (row.grid_row_u, row.grid_col_r)).all().all()
        assert (frame["timestamp"] == row.timestamp).all() and (frame["utm_crs"] == row.crs).all()
        boxes = np.stack(frame["pixel_bbox"].to_numpy()).astype(np.int64)
        np.testing.assert_array_equal(boxes, layout.boxes)
        np.testing.assert_array_equal(frame[["fragment_row", "fragment_col"]].to_numpy(), layout.index)
        raw = collection.read_raw(row.parquet_url, row.parquet_row, ["B04"])["B04"]
        _, _, transform, crs = _header(raw)
        for k, (utm, corners, lat, lon) in enumerate(_expected_footprints(transform, crs, layout.boxes)):
            assert shapely.from_wkt(frame["utm_footprint"][k]).equals_exact(utm, tolerance=1e-3)
            assert frame["centre_lat"][k] == pytest.approx(lat, abs=1e-9)
            assert (frame["centre_lon"][k] - lon + 180) % 360 - 180 == pytest.approx(0, abs=1e-9)
            geom = shapely.from_wkb(frame["geometry"][k])
            for x, y in corners:   # every corner lies on the WGS84 footprint (modulo the 360 wrap)
                point = shapely.Point((x + 180) % 360 - 180, y)
                if abs(point.x) > 179.999999:
                    continue
                assert geom.distance(point) < 1e-9


def test_written_grid_round_trips_through_pyarrow_and_geopandas(collections, tmp_path):
    tables = []
    for source, collection in collections.items():
        found, skipped = fragment_grid.samples_fragment_rows(
            collection, collection.metadata(), source, FRAGMENT, OVERLAP)
        assert not skipped
        tables += found
    path = tmp_path / "row=1U" / "fragments.parquet"
    n = fragment_grid.write_fragment_file(path, tables)
    assert n == sum(t.num_rows for t in tables)
    assert [p.name for p in path.parent.iterdir()] == ["fragments.parquet"]   # no temp files left
    back = pq.read_table(path)
    assert back.schema.equals(fragment_grid.FRAGMENT_SCHEMA) and back.equals(pa.concat_tables(tables))
    geo = json.loads(back.schema.metadata[b"geo"])
    column = geo["columns"]["geometry"]
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    assert column["encoding"] == "WKB" and pyproj.CRS.from_json_dict(column["crs"]).equals("OGC:CRS84")
    types = set(shapely.get_type_id(shapely.from_wkb(back.column("geometry").to_numpy(zero_copy_only=False))))
    assert sorted(column["geometry_types"]) == sorted({3: "Polygon", 6: "MultiPolygon"}[t] for t in types)
    assert "MultiPolygon" in column["geometry_types"]   # the default cells straddle +-180
    frame = gpd.read_parquet(path)
    assert frame.crs.equals("OGC:CRS84") and len(frame) == n
    assert frame.geometry.is_valid.all()
    centres = gpd.points_from_xy(frame["centre_lon"], frame["centre_lat"])
    assert frame.geometry.intersects(gpd.GeoSeries(centres, index=frame.index, crs=frame.crs)).all()


def test_empty_grid_file_keeps_the_schema(tmp_path):
    path = tmp_path / "fragments.parquet"
    assert fragment_grid.write_fragment_file(path, []) == 0
    back = pq.read_table(path)
    assert back.num_rows == 0 and back.schema.equals(fragment_grid.FRAGMENT_SCHEMA)
    assert json.loads(back.schema.metadata[b"geo"])["columns"]["geometry"]["geometry_types"] == []


def test_a_failed_write_leaves_the_previous_file(collections, tmp_path):
    collection = collections["S1RTC"]
    meta = collection.metadata()
    tables, _ = fragment_grid.samples_fragment_rows(collection, meta, "S1RTC", FRAGMENT, OVERLAP)
    path = tmp_path / "fragments.parquet"
    fragment_grid.write_fragment_file(path, tables[:1])
    before = path.read_bytes()
    broken = tables[1].set_column(10, "utm_footprint", pa.array([None] * tables[1].num_rows, pa.string()))
    with pytest.raises((pa.ArrowException, ValueError)):
        fragment_grid.write_fragment_file(path, [tables[0], broken.cast(broken.schema)])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["fragments.parquet"]


class _OneBadBand(CoreCollection):
    """Serves garbage for one product's reference band (fault injection via the read_raw hook)."""

    bad_product: str = ""

    def read_raw(self, parquet_url, parquet_row, columns, *, product_id=None, grid_cell=None):
        raw = super().read_raw(parquet_url, parquet_row, columns, product_id=product_id, grid_cell=grid_cell)
        if product_id == self.bad_product:
            raw = {k: b"II*\x00 broken" for k in raw}
        return raw


def test_unreadable_samples_are_skipped_and_the_rest_kept(collections):
    good = collections["S1RTC"]
    meta = good.metadata()
    broken = _OneBadBand(good.url)
    broken.bad_product = meta.product_id[1]
    tables, skipped = fragment_grid.samples_fragment_rows(broken, meta, "S1RTC", FRAGMENT, OVERLAP)
    assert len(tables) == len(meta) - 1
    assert [t.column("product_id")[0].as_py() for t in tables] == list(meta.product_id.drop(1))
    assert len(skipped) == 1
    entry = skipped[0]
    assert isinstance(entry, SampleFailure) and entry.stage == "fragment grid"
    assert (entry.source, entry.product_id, entry.grid_cell) == ("S1RTC", meta.product_id[1], meta.grid_cell[1])
    assert "undecodable GeoTIFF" in entry.reason
    assert "band=vv" in entry.reason and f"file={good.shard_path(meta.parquet_url[1])}" in entry.reason
    missing = meta.copy()
    missing.loc[0, "parquet_row"] = 999
    _, skipped = fragment_grid.samples_fragment_rows(good, missing, "S1RTC", FRAGMENT, OVERLAP)
    assert len(skipped) == 1 and "parquet_row 999" in skipped[0].reason
