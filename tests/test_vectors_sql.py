"""DuckDB views over the partitions, spatial functions and the cosine macros."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from majortom_assets import geoparquet
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
