"""Table 2 GeoParquet files: values are checked against independent computations (pyproj, hashlib)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import pytest
import shapely

from majortom_assets import geoparquet as gp

UTM33 = "EPSG:32633"
TRANSFORM33 = (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
STAMP = pd.Timestamp("2020-08-15T10:20:31.024Z")
STAMP_ISO = "2020-08-15T10:20:31.024000+00:00"


def standard_boxes(image=1068, frag=224, overlap=0.1):
    """Algorithm 1 boxes from STANDARD.md section 3 (n + 1 offsets, border shift), row-major."""
    n = max(1, round((image - frag) / (frag - frag * overlap)))
    stride = frag - math.ceil(frag - (image - frag) / n)
    offsets = [i * stride for i in range(n + 1)]
    offsets[-1] = image - frag
    return np.array([[r, c, r + frag, c + frag] for r in offsets for c in offsets]), len(offsets)


def random_embeddings(n, dim=2048, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def make_info(dim=2048, random_weights=True, **kw):
    return gp.EmbeddingFileInfo(model="ssl4eo-s2", weights="random" if random_weights else "torchgeo:dino",
                                weights_sha256=None if random_weights else "ab" * 32,
                                random_weights=random_weights, embedding_dim=dim, fragment_size=224,
                                target_overlap=0.1, source_collection="synthetic-S2L1C", **kw)


@pytest.fixture(scope="module")
def sample():
    boxes, _ = standard_boxes()
    emb = random_embeddings(len(boxes))
    table = gp.sample_table(emb, grid_cell="451U_122R", grid_row_u=451, grid_col_r=122, product_id="S2A_PROD",
                            timestamp=STAMP, crs=UTM33, transform=TRANSFORM33, boxes=boxes)
    return boxes, emb, table


@pytest.fixture(scope="module")
def written(sample, tmp_path_factory):
    _, _, table = sample
    path = tmp_path_factory.mktemp("emb") / "row=451U" / "embeddings.parquet"
    gp.write_embeddings(path, [table.slice(0, 10), table.slice(10)], make_info(), row_group_size=16)
    return path


def duckdb_with_spatial() -> duckdb.DuckDBPyConnection:
    ext_dir = Path(duckdb.__file__).resolve().parent.parent / "duckdb_ext" / "extensions"
    con = duckdb.connect(config={"extension_directory": str(ext_dir)})
    con.execute("LOAD spatial")
    return con


# ----------------------------------------------------------------------------------- schema
def test_schema_is_table_2_exactly():
    schema = gp.embedding_schema(1152)
    expected = [
        ("unique_id", pa.string()), ("embedding", pa.list_(pa.float32(), 1152)), ("grid_cell", pa.string()),
        ("grid_row_u", pa.int32()), ("grid_col_r", pa.int32()), ("product_id", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")), ("geometry", pa.binary()), ("utm_footprint", pa.string()),
        ("utm_crs", pa.string()), ("pixel_bbox", pa.list_(pa.int32(), 4)), ("centre_lat", pa.float64()),
        ("centre_lon", pa.float64()),
    ]
    assert [(f.name, f.type) for f in schema] == expected
    assert not any(f.nullable for f in schema)
    with pytest.raises(ValueError):
        gp.embedding_schema(0)


# ------------------------------------------------------------------------------- footprints
def test_footprints_match_independent_pyproj_corners(sample):
    boxes, _, table = sample
    # EPSG:4326 with authority axis order returns (lat, lon): an independent path from the module's.
    to_latlon = pyproj.Transformer.from_crs(UTM33, "EPSG:4326")
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    utm = shapely.from_wkt(table.column("utm_footprint").to_numpy(zero_copy_only=False))
    for k, (r0, c0, r1, c1) in enumerate(boxes):
        xs = np.array([500000 + 10 * c for c in (c0, c1, c1, c0)], float)
        ys = np.array([5000000 - 10 * r for r in (r1, r1, r0, r0)], float)
        lat, lon = to_latlon.transform(xs, ys)
        got = shapely.get_coordinates(geoms[k])[:-1]
        assert geoms[k].geom_type == "Polygon" and len(got) == 4
        np.testing.assert_allclose(np.sort(got, axis=0), np.sort(np.c_[lon, lat], axis=0), atol=1e-9)
        assert utm[k].equals(shapely.box(xs.min(), ys.min(), xs.max(), ys.max()))
        clat, clon = to_latlon.transform(500000 + 5 * (c0 + c1), 5000000 - 5 * (r0 + r1))
        assert table["centre_lat"][k].as_py() == pytest.approx(clat, abs=1e-9)
        assert table["centre_lon"][k].as_py() == pytest.approx(clon, abs=1e-9)
    assert table["pixel_bbox"].to_pylist() == boxes.tolist()
    assert set(table["utm_crs"].to_pylist()) == {UTM33}


def test_column_offsets_go_east_and_row_offsets_go_south(sample):
    boxes, _, table = sample
    _, per_axis = standard_boxes()
    lat, lon = table["centre_lat"].to_numpy(), table["centre_lon"].to_numpy()
    origin, east, south = 0, 1, per_axis  # (0, 0), (0, 1), (1, 0) in row-major order
    assert list(boxes[east][:2]) == [0, 211] and list(boxes[south][:2]) == [211, 0]
    assert lon[east] > lon[origin] and abs(lat[east] - lat[origin]) < 1e-3
    assert lat[south] < lat[origin] and abs(lon[south] - lon[origin]) < 1e-3
    # 211 px * 10 m along the axis, measured on the ellipsoid
    geod = pyproj.Geod(ellps="WGS84")
    assert geod.inv(lon[origin], lat[origin], lon[east], lat[east])[2] == pytest.approx(2110, abs=2)
    assert geod.inv(lon[origin], lat[origin], lon[south], lat[south])[2] == pytest.approx(2110, abs=2)


def exterior_rings(geom):
    return [p.exterior for p in getattr(geom, "geoms", [geom])]


def test_rings_are_counterclockwise_even_for_south_up_transform():
    boxes, _ = standard_boxes()
    for transform in (TRANSFORM33, (10.0, 0.0, 500000.0, 0.0, 10.0, 4989320.0)):
        feet = gp.fragment_footprints(boxes, transform, UTM33)
        for geom in list(shapely.from_wkb(feet.geometry_wkb)) + list(shapely.from_wkt(feet.utm_wkt)):
            assert all(ring.is_ccw for ring in exterior_rings(geom))


def crossing_transform(epsg: str, lat: float):
    """10 m north-up transform whose 1068 px image has the 180 degree meridian at ~column 600."""
    x, y = pyproj.Transformer.from_crs("OGC:CRS84", epsg, always_xy=True).transform(180.0, lat)
    return (10.0, 0.0, x - 6000.0, 0.0, -10.0, y + 5000.0)


@pytest.mark.parametrize("epsg, lat", [("EPSG:32660", 60.0), ("EPSG:32601", -45.0), ("EPSG:32660", 0.5)])
def test_antimeridian_fragments_split_into_valid_multipolygons(epsg, lat):
    boxes, _ = standard_boxes()
    transform = crossing_transform(epsg, lat)
    feet = gp.fragment_footprints(boxes, transform, epsg)
    geoms = shapely.from_wkb(feet.geometry_wkb)
    assert shapely.is_valid(geoms).all()
    # independent unwrapped footprint of every box, longitudes shifted into [0, 360)
    to_lonlat = pyproj.Transformer.from_crs(epsg, "OGC:CRS84", always_xy=True)
    crossing = 0
    for (r0, c0, r1, c1), geom in zip(boxes, geoms):
        xs = [transform[2] + 10 * c for c in (c0, c1, c1, c0)]
        ys = [transform[5] - 10 * r for r in (r1, r1, r0, r0)]
        lon, lat_ = to_lonlat.transform(xs, ys)
        lon = np.mod(lon, 360.0)
        unwrapped = shapely.Polygon(np.c_[lon, lat_])
        minx, _, maxx, _ = shapely.bounds(geom)
        assert minx >= -180.0 and maxx <= 180.0
        if lon.min() < 180.0 < lon.max():
            crossing += 1
            assert geom.geom_type == "MultiPolygon" and len(geom.geoms) == 2
            west, east = sorted(geom.geoms, key=lambda p: -p.bounds[0])
            assert west.bounds[0] == pytest.approx(lon.min()) and west.bounds[2] == pytest.approx(180.0)
            assert east.bounds[0] == pytest.approx(-180.0) and east.bounds[2] == pytest.approx(lon.max() - 360)
            assert west.area + east.area == pytest.approx(unwrapped.area, rel=1e-9)
            assert (west.bounds[2] - west.bounds[0]) + (east.bounds[2] - east.bounds[0]) < 0.2
        else:
            assert geom.geom_type == "Polygon" and maxx - minx < 0.2
            assert geom.area == pytest.approx(unwrapped.area, rel=1e-9)
        assert all(ring.is_ccw for ring in exterior_rings(geom))
    assert crossing == 5  # one column of fragments straddles the meridian
    assert ((feet.centre_lon >= -180.0) & (feet.centre_lon < 180.0)).all()


def test_footprint_input_errors_are_clear():
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        gp.fragment_footprints(np.zeros((3, 3)), TRANSFORM33, UTM33)
    with pytest.raises(ValueError, match="unknown CRS"):
        gp.fragment_footprints(np.zeros((1, 4)), TRANSFORM33, "EPSG:999999")


# ------------------------------------------------------------------------------- unique ids
def independent_id(wkb: bytes, iso: str, product: str, vec: np.ndarray) -> str:
    h = hashlib.sha256()
    for part in (wkb, iso.encode(), product.encode(), vec.astype("<f4").tobytes()):
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.hexdigest()


def test_unique_id_follows_the_documented_recipe(sample):
    _, emb, table = sample
    wkb = table["geometry"].to_pylist()
    expected = [independent_id(w, STAMP_ISO, "S2A_PROD", e) for w, e in zip(wkb, emb)]
    assert table["unique_id"].to_pylist() == expected
    assert len(set(expected)) == len(expected)
    # naive timestamps mean UTC; other time zones are converted
    same = gp.unique_ids(wkb[:2], pd.Timestamp("2020-08-15 12:20:31.024+02:00"), "S2A_PROD", emb[:2])
    naive = gp.unique_ids(wkb[:2], [np.datetime64("2020-08-15T10:20:31.024")] * 2, ["S2A_PROD"] * 2, emb[:2])
    assert list(same) == list(naive) == expected[:2]


def test_unique_id_protects_every_embedding_element():
    vec = random_embeddings(1)
    changed = vec.copy()
    changed[0, 1000] += 1e-3
    # the reference hashed numpy's printed array, which elides the middle of long vectors
    assert str(vec) == str(changed)
    ids = gp.unique_ids([b"\x01"] * 2, STAMP, "P", np.concatenate([vec, changed]))
    assert ids[0] != ids[1]
    assert ids[0] == independent_id(b"\x01", STAMP_ISO, "P", vec[0])


def test_unique_ids_reject_non_float32():
    with pytest.raises(ValueError, match="float32"):
        gp.unique_ids([b""], STAMP, "P", np.zeros((1, 4)))


# ------------------------------------------------------------------------------ sample_table
def test_sample_table_validation_names_the_cell():
    boxes, _ = standard_boxes()
    kwargs = {"grid_cell": "3D_7L", "product_id": "P1", "timestamp": STAMP, "crs": UTM33,
              "transform": TRANSFORM33, "boxes": boxes}
    with pytest.raises(ValueError, match="cell 3D_7L.*float32"):
        gp.sample_table(np.zeros((25, 8)), **kwargs)
    with pytest.raises(ValueError, match="cell 3D_7L.*dimension 8.*2048"):
        gp.sample_table(np.zeros((25, 8), np.float32), expected_dim=2048, **kwargs)
    with pytest.raises(ValueError, match="cell 3D_7L.*pixel boxes"):
        gp.sample_table(np.zeros((24, 8), np.float32), **kwargs)
    bad = np.zeros((25, 8), np.float32)
    bad[[2, 5], 3] = np.nan
    with pytest.raises(ValueError, match="cell 3D_7L.*2 of 25 embeddings contain NaN"):
        gp.sample_table(bad, **kwargs)
    assert gp.sample_table(bad, check_finite=False, **kwargs).num_rows == 25
    ok = gp.sample_table(np.zeros((25, 8), np.float32), **kwargs)  # grid ints parsed from the name
    assert set(ok["grid_row_u"].to_pylist()) == {-3} and set(ok["grid_col_r"].to_pylist()) == {-7}
    assert set(ok["timestamp"].to_pylist()) == {STAMP.to_pydatetime()}


def test_sample_table_embedding_column_is_zero_copy():
    boxes, _ = standard_boxes()
    emb = random_embeddings(25, dim=64)
    table = gp.sample_table(emb, grid_cell="0U_0R", product_id="P", timestamp=STAMP, crs=UTM33,
                            transform=TRANSFORM33, boxes=boxes)
    mat = gp.embedding_matrix(table)
    assert np.shares_memory(mat, emb)
    np.testing.assert_array_equal(gp.embedding_matrix(table.slice(3, 5)), emb[3:8])


# ---------------------------------------------------------------------------------- writing
def test_pyarrow_round_trip(sample, written):
    _, emb, table = sample
    back = gp.read_table(written)
    assert back.schema.equals(gp.embedding_schema(2048), check_metadata=False)
    assert back.equals(table)
    np.testing.assert_array_equal(gp.embedding_matrix(back), emb)
    assert [pq.ParquetFile(written).metadata.row_group(i).num_rows for i in range(2)] == [16, 9]
    only = gp.read_table(written, columns=["unique_id", "centre_lat"], filters=[("centre_lat", ">", 45.1)])
    assert only.num_rows == int((table["centre_lat"].to_numpy() > 45.1).sum()) > 0
    assert pq.ParquetFile(written).metadata.row_group(0).column(1).compression == "ZSTD"


def test_geoparquet_metadata(sample, written):
    _, _, table = sample
    geo = gp.read_geo_metadata(written)
    # pyarrow's schema metadata (from the ARROW:schema copy) carries the same finished value
    assert json.loads(pq.read_schema(written).metadata[b"geo"]) == geo
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    col = geo["columns"]["geometry"]
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
    assert col["orientation"] == "counterclockwise" and col["edges"] == "planar"
    assert col["crs"]["id"] == {"authority": "OGC", "code": "CRS84"}
    assert pyproj.CRS.from_json_dict(col["crs"]) == pyproj.CRS("OGC:CRS84")
    bounds = shapely.total_bounds(shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False)))
    assert col["bbox"] == pytest.approx(list(bounds), abs=0)


def test_geopandas_reads_crs_and_valid_polygons(sample, written):
    _, _, table = sample
    gdf = gpd.read_parquet(written)
    assert gdf.crs == pyproj.CRS("OGC:CRS84") and gdf.crs.equals("EPSG:4326", ignore_axis_order=True)
    assert len(gdf) == table.num_rows and gdf.geometry.is_valid.all()
    assert (gdf.geom_type == "Polygon").all()
    np.testing.assert_allclose(shapely.get_y(shapely.centroid(gdf.geometry.values)), gdf["centre_lat"], atol=1e-4)


def test_duckdb_reads_embeddings_and_geometry(sample, written):
    _, emb, _ = sample
    con = duckdb_with_spatial()
    query = emb[7]
    rows = con.execute(
        "SELECT unique_id, array_cosine_similarity(embedding::FLOAT[2048], ?::FLOAT[2048]), "
        "ST_Area(geometry), ST_GeometryType(geometry) FROM read_parquet(?) ORDER BY pixel_bbox",
        [query.tolist(), str(written)]).fetchall()
    order = np.lexsort(sample[0].T[::-1])
    expected_cos = emb[order] @ query / (np.linalg.norm(emb[order], axis=1) * np.linalg.norm(query))
    np.testing.assert_allclose([r[1] for r in rows], expected_cos, rtol=1e-5, atol=1e-6)
    geoms = shapely.from_wkb(sample[2]["geometry"].to_numpy(zero_copy_only=False))[order]
    np.testing.assert_allclose([r[2] for r in rows], shapely.area(geoms), rtol=1e-12)
    assert {r[3] for r in rows} == {"POLYGON"}
    # without GeoParquet conversion the column is the raw WKB blob
    con.execute("SET enable_geoparquet_conversion = false")
    area = con.execute("SELECT sum(ST_Area(ST_GeomFromWKB(geometry))) FROM read_parquet(?)",
                       [str(written)]).fetchone()[0]
    assert area == pytest.approx(shapely.area(geoms).sum(), rel=1e-12)


def test_random_weights_are_flagged_loudly(sample, tmp_path):
    _, _, table = sample
    meta = pq.read_schema(gp.write_embeddings(tmp_path / "r.parquet", table, make_info())).metadata
    assert meta[b"majortom:random_weights"] == b"true"
    assert meta[b"majortom:warning"] == b"EMBEDDINGS FROM RANDOMLY INITIALISED WEIGHTS - NOT FOR SCIENCE"
    assert meta[b"majortom:model"] == b"ssl4eo-s2" and meta[b"majortom:weights"] == b"random"
    info = gp.read_info(tmp_path / "r.parquet")
    assert info.random_weights and info.dim == 2048 and info.dtype == "float32"
    real = pq.read_schema(gp.write_embeddings(tmp_path / "p.parquet", table, make_info(random_weights=False)))
    assert real.metadata[b"majortom:random_weights"] == b"false" and b"majortom:warning" not in real.metadata
    assert gp.read_info(tmp_path / "p.parquet") == make_info(random_weights=False).model_copy(
        update={"created_with": info.created_with})


def test_file_info_validation():
    short = gp.EmbeddingFileInfo(model="dinov2-rgb", weights="w", random_weights=False, dim=768, dtype="float32",
                                 fragment_size=224, target_overlap=0.1, source_collection="c")
    assert short.embedding_dim == short.dim == 768
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        make_info(colour="blue")
    with pytest.raises(ValueError, match="float32"):
        make_info(embedding_dtype="float16")
    with pytest.raises(ValueError):
        make_info(dim=0)


def test_verify_file_detects_tampering(sample, written, tmp_path):
    _, emb, table = sample
    report = gp.verify_file(written, batch_size=7)
    assert report.ok and report.rows == table.num_rows and report.bad_ids == []
    tampered = emb.copy()
    tampered[4, 1000] *= 1.0001
    col = pa.FixedSizeListArray.from_arrays(pa.array(tampered.reshape(-1)), 2048)
    forged = table.set_column(1, table.schema.field(1), col)
    path = tmp_path / "forged.parquet"
    pq.write_table(forged.replace_schema_metadata(pq.read_schema(written).metadata), path)
    report = gp.verify_file(path, batch_size=7)
    assert not report.ok and report.rows == table.num_rows
    assert report.mismatched_ids == [table["unique_id"][4].as_py()]
    plain = tmp_path / "plain.parquet"
    pq.write_table(table, plain)
    assert any("not a Major TOM embedding file" in p for p in gp.verify_file(plain).problems)


def test_failed_write_leaves_nothing_and_keeps_the_old_file(sample, tmp_path):
    _, _, table = sample
    target = tmp_path / "e.parquet"

    def failing():
        yield table
        raise RuntimeError("inference crashed")

    with pytest.raises(RuntimeError, match="inference crashed"):
        gp.write_embeddings(target, failing(), make_info(), row_group_size=4)
    assert list(tmp_path.iterdir()) == []
    gp.write_embeddings(target, table, make_info())
    before = target.read_bytes()
    with pytest.raises(ValueError, match="cell 451U_122R: column embedding"):
        gp.write_embeddings(target, [table, table.cast(gp.embedding_schema(2048)).set_column(
            1, "embedding", pa.array(table["embedding"].to_pylist(), pa.list_(pa.float32())))], make_info())
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["e.parquet"]


def test_empty_input_writes_a_valid_empty_file(tmp_path):
    path = gp.write_embeddings(tmp_path / "empty.parquet", [], make_info(dim=768))
    table = gp.read_table(path)
    assert table.num_rows == 0 and table.schema.equals(gp.embedding_schema(768), check_metadata=False)
    geo = gp.read_geo_metadata(path)["columns"]["geometry"]
    assert geo["geometry_types"] == [] and "bbox" not in geo
    assert gp.read_info(path).dim == 768 and gp.verify_file(path).ok
    assert gp.embedding_matrix(table).shape == (0, 768)
    assert len(gpd.read_parquet(path)) == 0


def test_bbox_crosses_antimeridian_only_when_tighter(tmp_path):
    boxes, _ = standard_boxes()
    transform = crossing_transform("EPSG:32660", 60.0)
    emb = random_embeddings(len(boxes), dim=16)
    table = gp.sample_table(emb, grid_cell="667U_0R", grid_row_u=667, grid_col_r=0, product_id="P",
                            timestamp=STAMP, crs="EPSG:32660", transform=transform, boxes=boxes)
    path = gp.write_embeddings(tmp_path / "am.parquet", table, make_info(dim=16))
    col = gp.read_geo_metadata(path)["columns"]["geometry"]
    assert col["geometry_types"] == ["Polygon", "MultiPolygon"]
    west, south, east, north = col["bbox"]
    parts = shapely.get_parts(shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False)))
    b = shapely.bounds(parts)
    assert west == b[b[:, 0] > 0, 0].min() and east == b[b[:, 2] < 0, 2].max()
    assert west > 179.0 and east < -179.0 and (south, north) == (b[:, 1].min(), b[:, 3].max())
    assert gpd.read_parquet(path).geometry.is_valid.all()
    # with data at 15 E too, the largest empty arc is (-180 + 0.1, 15): the box runs 15 E -> 180 -> east
    far = gp.sample_table(emb, grid_cell="451U_122R", grid_row_u=451, grid_col_r=122, product_id="P",
                          timestamp=STAMP, crs=UTM33, transform=TRANSFORM33, boxes=boxes)
    path = gp.write_embeddings(tmp_path / "both.parquet", [table, far], make_info(dim=16))
    far_west = shapely.total_bounds(shapely.from_wkb(far["geometry"].to_numpy(zero_copy_only=False)))[0]
    assert gp.read_geo_metadata(path)["columns"]["geometry"]["bbox"][::2] == [far_west, east]
    # without the seam-crossing cell the largest empty arc is the one across 180: a plain box
    mid = gp.sample_table(emb, grid_cell="0U_100L", grid_row_u=0, grid_col_r=-100, product_id="P",
                          timestamp=STAMP, crs="EPSG:32614", transform=(10.0, 0, 500000.0, 0, -10.0, 100000.0),
                          boxes=boxes)
    path = gp.write_embeddings(tmp_path / "plain.parquet", [far, mid], make_info(dim=16))
    both = shapely.from_wkb(pa.concat_tables([far, mid])["geometry"].to_numpy(zero_copy_only=False))
    assert gp.read_geo_metadata(path)["columns"]["geometry"]["bbox"] == list(shapely.total_bounds(both))


def test_longitude_interval_union_handles_nested_and_touching_intervals():
    iv = np.array([[20.0, 21.0], [0.0, 10.0], [2.0, 3.0], [5.0, 12.0], [12.0, 13.0], [-5.0, -4.0]])
    assert gp._merge_intervals(iv).tolist() == [[-5.0, -4.0], [0.0, 13.0], [20.0, 21.0]]


def test_atomic_output_for_other_files(tmp_path):
    target = tmp_path / "maps" / "pca.png"
    with gp.atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"
    with pytest.raises(KeyError), gp.atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyError("boom")
    assert target.read_bytes() == b"png" and os.listdir(target.parent) == ["pca.png"]


# ------------------------------------------------------------------------ stale temp files
def _age(path, hours: float) -> None:
    then = time.time() - hours * 3600
    os.utime(path, (then, then))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


def test_stale_temp_files_are_swept_and_live_writers_kept(tmp_path, caplog):
    target = tmp_path / "row=7U" / "embeddings.parquet"
    target.parent.mkdir()
    here = gp._own_tag()
    elsewhere = "0123456789ab" if here != "0123456789ab" else "ba9876543210"

    def temp(tag, pid, hours=0.0):
        middle = f"{tag}-{pid}-" if tag else ""
        path = target.parent / f".embeddings.{middle}{uuid.uuid4().hex}.tmp.parquet"
        path.write_bytes(b"partial")
        _age(path, hours)
        return path

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed_here = temp(here, _dead_pid())                      # a killed run on this host: gone at once
        live_here_old = temp(here, sleeper.pid, hours=5)           # a live local writer: kept, however old
        mine = temp(here, os.getpid())                             # this process's own open write
        fresh_elsewhere = temp(elsewhere, 4242, hours=0.5)         # another host's writer, recently touched
        old_elsewhere = temp(elsewhere, 4242, hours=2)             # another host's writer, silent for 2 h
        old_unnamed = temp(None, None, hours=2)                    # a pre-writer-tag temp file, old
        fresh_unnamed = temp(None, None, hours=0.1)
        other_target = target.parent / f".failures.{here}-{_dead_pid()}-{uuid.uuid4().hex}.tmp.parquet"
        other_target.write_bytes(b"x")
        target.write_bytes(b"complete")
        with caplog.at_level(logging.WARNING, logger="majortom_assets.geoparquet"):
            removed = gp.sweep_stale_temps(target)
        assert sorted(removed) == sorted([killed_here, old_elsewhere, old_unnamed])
        left = {p.name for p in target.parent.iterdir()}
        assert left == {p.name for p in (live_here_old, mine, fresh_elsewhere, fresh_unnamed, other_target, target)}
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert f"removed stale temp file {killed_here}" in logged and "has exited" in logged
        assert f"removed stale temp file {old_elsewhere}" in logged and "untouched for 2.0 h" in logged

        # every atomic write of the target sweeps first; the live writer's file survives that too
        old_again = temp(elsewhere, 1, hours=3)
        with gp.atomic_output(target) as tmp:
            assert tmp.name.startswith(f".embeddings.{here}-{os.getpid()}-") and tmp.name.endswith(".tmp.parquet")
            tmp.write_bytes(b"new")
        assert not old_again.exists() and live_here_old.exists() and target.read_bytes() == b"new"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert gp.sweep_stale_temps(target) == [live_here_old]   # its writer is gone now


def test_heartbeat_keeps_a_slow_writers_temp_file_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(gp, "_HEARTBEAT_S", 0.05)
    heartbeat = gp._Heartbeat()
    tmp = gp.temp_path(tmp_path / "embeddings.parquet")
    tmp.write_bytes(b"slow")
    _age(tmp, 5)
    heartbeat.add(tmp)
    try:
        deadline = time.time() + 10
        while time.time() - tmp.stat().st_mtime > 60:
            assert time.time() < deadline, "the heartbeat never touched the open temp file"
            time.sleep(0.02)
    finally:
        heartbeat.discard(tmp)
    assert tmp.exists()
