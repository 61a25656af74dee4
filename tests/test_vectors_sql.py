"""DuckDB views over the partitions, spatial functions and the cosine macros."""

from __future__ import annotations

import os
import shutil

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from majortom_assets import geoparquet
from majortom_assets.layout import StorageLayout
from majortom_assets.vectors import sql, testdata


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sql")
    testdata.write_synthetic(root, "other-model", cells=testdata.cells_in_rows([2], 2), dim=8)
    return testdata.write_synthetic(root, "dinov2-rgb", cells=testdata.cells_in_rows([-3, 7], 3), dim=12)


def test_views_rows_and_spatial(data):
    con = sql.connect(data.root)
    models = con.sql("SELECT model, view, dim, partitions FROM majortom_models ORDER BY model").fetchall()
    assert models == [("dinov2-rgb", "dinov2_rgb", 12, 2), ("other-model", "other_model", 8, 1)]
    counts = dict(con.sql("SELECT row, count(*) FROM dinov2_rgb GROUP BY row").fetchall())
    expected = {p.parent.name.split("=")[1]: pq.read_metadata(p).num_rows for p in data.paths}
    assert counts == expected
    assert con.sql("SELECT typeof(embedding) FROM dinov2_rgb LIMIT 1").fetchone()[0] == "FLOAT[12]"
    area = con.sql("SELECT ST_Area(geometry), ST_GeometryType(geometry) FROM dinov2_rgb LIMIT 1").fetchone()
    assert area[0] > 0 and str(area[1]) == "POLYGON"


def test_cosine_macros_match_numpy(data):
    con = sql.connect(data.root, models=["dinov2-rgb"])
    table = pa.concat_tables([pq.read_table(p) for p in data.paths])
    x = geoparquet.embedding_matrix(table).astype(np.float64)
    ids = table.column("unique_id").to_numpy(zero_copy_only=False)
    uid = ids[4]
    got = con.sql(f"SELECT unique_id, similarity FROM dinov2_rgb_similar('{uid}', 5)").fetchall()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn[4]
    order = np.argsort(-sims)[:5]
    assert got[0][0] == uid
    np.testing.assert_allclose([s for _, s in got], sims[order], atol=1e-5)
    a, b = ids[0], ids[9]
    val = con.sql(f"SELECT cosine_sim(a.embedding, b.embedding) FROM dinov2_rgb a, dinov2_rgb b "
                  f"WHERE a.unique_id = '{a}' AND b.unique_id = '{b}'").fetchone()[0]
    assert val == pytest.approx(xn[0] @ xn[9], abs=1e-5)


def test_unknown_model_lists_known(data):
    with pytest.raises(ValueError, match="known models: dinov2-rgb, other-model"):
        sql.connect(data.root, models=["siglip"])
    assert sql.extension_directory().is_dir()


def _plain_client(path, root=None):
    """A DuckDB client that never loads spatial (and may not auto-load it)."""
    con = duckdb.connect(str(path), read_only=True,
                         config={"autoload_known_extensions": False, "autoinstall_known_extensions": False})
    if root is not None:
        con.execute(f"SET file_search_path = '{root}'")
    return con


def test_catalog_file_reads_its_own_folder_after_a_copy_and_a_delete(data, tmp_path):
    catalog = sql.write_database(StorageLayout.at(data.root), ["dinov2-rgb", "other-model", "siglip-rgb"])
    assert catalog.path == data.root.resolve() / "sql" / "majortom.duckdb"
    assert catalog.missing == ("siglip-rgb",)
    expected = {"dinov2-rgb": sum(pq.read_metadata(p).num_rows for p in data.paths)}
    assert dict(zip(catalog.views["model"], catalog.views["rows"]))["dinov2-rgb"] == expected["dinov2-rgb"]
    assert not list(catalog.path.parent.glob("*.wal")) and not list(catalog.path.parent.glob(".*"))

    # the views name their files relative to the root: no absolute path is stored in the file
    con = sql.open_database(catalog.path)
    try:
        stored = " ".join(s for (s,) in con.sql("SELECT sql FROM duckdb_views() WHERE NOT internal").fetchall())
    finally:
        con.close()
    assert "embeddings/dinov2-rgb/row=*/embeddings.parquet" in stored and str(data.root.resolve()) not in stored

    # copy the data folder, move the copy elsewhere, delete the first copy: the moved one reads itself
    first = tmp_path / "first"
    shutil.copytree(data.root, first)
    moved = tmp_path / "elsewhere" / "data"
    moved.parent.mkdir()
    shutil.copytree(first, moved)
    victim = moved / "embeddings" / "dinov2-rgb"
    shutil.rmtree(first)
    dropped = min(victim.glob("row=*"))   # and the copy differs: one partition fewer
    left = sum(pq.read_metadata(p).num_rows for p in victim.glob("row=*/embeddings.parquet")) - \
        pq.read_metadata(dropped / "embeddings.parquet").num_rows
    shutil.rmtree(dropped)
    con = sql.open_database(moved / "sql" / "majortom.duckdb")
    try:
        assert con.sql("SELECT count(*) FROM dinov2_rgb").fetchone()[0] == left
        files = {f for (f,) in con.sql("SELECT DISTINCT filename FROM read_parquet("
                                       "'embeddings/*/row=*/embeddings.parquet', filename = true)").fetchall()}
        assert files and all(f.startswith(str(moved.resolve())) for f in files)
    finally:
        con.close()


def test_wkb_views_read_in_a_client_without_spatial(data):
    catalog = sql.write_database(StorageLayout.at(data.root), ["dinov2-rgb"])
    table = pa.concat_tables([pq.read_table(p, columns=["unique_id", "geometry"]) for p in data.paths])
    want = dict(zip(table.column("unique_id").to_pylist(), table.column("geometry").to_pylist()))

    con = _plain_client(catalog.path, root=data.root)
    try:
        loaded = {n for (n,) in con.sql("SELECT extension_name FROM duckdb_extensions() WHERE loaded").fetchall()}
        assert "spatial" not in loaded
        with pytest.raises(duckdb.Error):   # the spatial view needs the extension ...
            con.sql("SELECT geometry FROM dinov2_rgb LIMIT 1").fetchall()
        rows = con.sql("SELECT unique_id, geometry, typeof(geometry), typeof(embedding), row FROM dinov2_rgb_wkb")
        got = rows.fetchall()   # ... its _wkb twin does not
    finally:
        con.close()
    assert len(got) == len(want)
    assert all(t == "BLOB" and e == "FLOAT[12]" for _, _, t, e, _ in got)
    assert {u: bytes(g) for u, g, *_ in got} == want   # the file's own WKB, byte for byte
    assert shapely.from_wkb(got[0][1]).geom_type == "Polygon"

    # run from the storage root, a plain client needs no setting at all
    here = os.getcwd()
    os.chdir(data.root)
    try:
        con = _plain_client(catalog.path)
        assert con.sql("SELECT count(*) FROM dinov2_rgb_wkb").fetchone()[0] == len(want)
        con.close()
    finally:
        os.chdir(here)

    # and in a session with spatial (ours), the same view name gives the same bytes
    con = sql.open_database(catalog.path)
    try:
        spatial = dict(con.sql("SELECT unique_id, geometry FROM dinov2_rgb_wkb").fetchall())
        assert con.sql("SELECT typeof(geometry) FROM dinov2_rgb LIMIT 1").fetchone()[0] == "GEOMETRY"
    finally:
        con.close()
    assert {u: bytes(g) for u, g in spatial.items()} == want
    live = sql.connect(data.root, models=["dinov2-rgb"])
    assert {u: bytes(g) for u, g in live.sql("SELECT unique_id, geometry FROM dinov2_rgb_wkb").fetchall()} == want
