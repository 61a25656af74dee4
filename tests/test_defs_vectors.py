"""The change-score and SQL-catalog assets on a small synthetic S2L2A collection with two dates.

Two cells of one grid row, 384 px images, tiny DINOv2 with random weights: the embeddings are
meaningless but deterministic, which is all a comparison against an independent numpy
computation from the written embedding files needs.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster_helpers import local_resources, materialize, pipeline_assets

from majortom_assets import geoparquet, synthetic
from majortom_assets.defs import keys, vectors
from majortom_assets.vectors import sql

MODEL = "dinov2-rgb"
SIZE = 384
ROW = "195D"
CELLS = ["195D_1911L", "195D_1910R"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    synthetic.generate_collection(
        home / "collections" / "Core-S2L2A", "S2L2A", cells=CELLS, size=SIZE, timestamps=2, seed=5
    )
    assets = [
        *pipeline_assets("S2L2A", MODEL, products=False),
        vectors.build_change_asset(MODEL),
        vectors.build_sql_catalog_asset((MODEL,)),
    ]
    resources = local_resources(home, MODEL, SIZE)
    with dg.instance_for_test() as instance:
        assert materialize(assets, resources, instance, [keys.core_metadata_key("S2L2A")]).success
        assert materialize(assets, resources, instance, [a.key for a in assets[1:4]], ROW).success
        result = materialize(assets, resources, instance, [keys.change_key(MODEL), keys.SQL_CATALOG_KEY])
    assert result.success
    events = result.get_asset_materialization_events()
    metadata = {m.asset_key: m.metadata for m in (e.event_specific_data.materialization for e in events)}
    return home.resolve(), metadata


def _numpy_change(path: Path):
    """Per (cell, pixel box): cosine distances of consecutive dates, straight from the file."""
    table = pq.read_table(path)
    x = geoparquet.embedding_matrix(table).astype(np.float64)
    cells = table.column("grid_cell").to_pylist()
    boxes = [tuple(b) for b in table.column("pixel_bbox").to_pylist()]
    times = table.column("timestamp").to_pylist()
    groups: dict = {}
    for i, key in enumerate(zip(cells, boxes)):
        groups.setdefault(key, []).append(i)
    out = {}
    for key, idx in groups.items():
        idx = sorted(idx, key=lambda i: times[i])
        a, b = x[idx[:-1]], x[idx[1:]]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out[key] = 1.0 - cos
    return out


def test_change_scores_match_numpy_cosine_distances(run):
    home, metadata = run
    expected = _numpy_change(home / "embeddings" / MODEL / f"row={ROW}" / "embeddings.parquet")
    assert expected and all(len(d) == 1 for d in expected.values())  # two dates -> one pair each

    change = home / "reports" / MODEL / "change"
    assert sorted(p.relative_to(change).as_posix() for p in change.rglob("*.parquet")) == [
        f"cells/row={ROW}/cells.parquet", f"fragments/row={ROW}/fragments.parquet"]  # one file per row
    fragments = pq.read_table(change / "fragments").to_pandas()  # the hive dataset, row as a column
    assert set(fragments["row"]) == {ROW}
    got = {(c, tuple(b)): d for c, b, d in zip(fragments["grid_cell"], fragments["pixel_bbox"],
                                                fragments["cosine_distance"])}
    assert set(got) == set(expected)
    np.testing.assert_allclose([got[k] for k in expected], [d[0] for d in expected.values()], atol=1e-6)

    cells = pq.read_table(change / "cells").to_pandas()
    assert sorted(cells["grid_cell"]) == sorted(CELLS)
    for cell in CELLS:
        want = [d[0] for (c, _), d in expected.items() if c == cell]
        row = cells[cells["grid_cell"] == cell].iloc[0]
        assert row["fragments"] == len(want) and row["t0"] < row["t1"]
        assert row["cosine_distance"] == pytest.approx(np.mean(want), abs=1e-6)

    md = metadata[keys.change_key(MODEL)]
    assert md["cells"].value == 2 and md["cells with >=2 dates"].value == 2
    assert md["fragment series (>=2 dates)"].value == len(expected)
    assert md["max change"].value == pytest.approx(cells["cosine_distance"].max(), abs=1e-9)
    assert md["mean change"].value == pytest.approx(cells["cosine_distance"].mean(), abs=1e-9)
    top = cells.sort_values("cosine_distance", ascending=False)["grid_cell"].iloc[0]
    table = md["most changed cells"].value
    assert "RANDOM" in table and table.index(top) < table.index(next(c for c in CELLS if c != top))
    assert md["random weights"].value is True
    assert Path(md["path"].value) == change
    assert md["rows read"].value == 1 and md["rows unchanged"].value == 0


def test_sql_catalog_reopens_with_views_matching_the_parquet_rows(run):
    home, metadata = run
    path = home / "sql" / "majortom.duckdb"
    parquet_rows = sum(pq.read_metadata(p).num_rows for p in (home / "embeddings" / MODEL).glob("row=*/*.parquet"))

    # a plain DuckDB client: read-only, spatial loaded from the wheel's directory, paths under the root
    con = duckdb.connect(str(path), read_only=True, config={"extension_directory": str(sql.extension_directory())})
    con.execute("LOAD spatial")
    con.execute(f"SET file_search_path = '{home}'")
    try:
        assert con.sql("SELECT model, view FROM majortom_models").fetchall() == [(MODEL, "dinov2_rgb")]
        assert con.sql("SELECT count(*) FROM dinov2_rgb").fetchone()[0] == parquet_rows
        assert dict(con.sql("SELECT row, count(*) FROM dinov2_rgb GROUP BY row").fetchall()) == {ROW: parquet_rows}
        uid = con.sql("SELECT unique_id FROM dinov2_rgb ORDER BY unique_id LIMIT 1").fetchone()[0]
        best = con.sql(f"SELECT unique_id, similarity FROM dinov2_rgb_similar('{uid}', 1)").fetchone()
        assert best[0] == uid and best[1] == pytest.approx(1.0, abs=1e-5)
    finally:
        con.close()

    md = metadata[keys.SQL_CATALOG_KEY]
    assert md[f"rows: {MODEL}"].value == parquet_rows
    assert "dinov2_rgb_similar" in md["example query"].value and uid in md["example query"].value
    assert uid[:40] in md["example result"].value and "| 1 |" in md["example result"].value  # uid abbreviated
    assert "dinov2_rgb" in md["views"].value and md["random weights"].value is True
    assert Path(md["path"].value) == path and not list(path.parent.glob(".*"))  # no temp left behind
