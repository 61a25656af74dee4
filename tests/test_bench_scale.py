"""The scale benchmark's synthetic archive: the row-size shape of Core, and derived rows that verify."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks import bench_scale
from majortom_assets import geoparquet
from majortom_assets.grid import get_grid
from majortom_assets.vectors import testdata


def test_row_sizes_follow_the_archive():
    sizes = bench_scale.row_sizes(62_000_000)  # ~2.25 M cells × 27.5 fragments: the whole of Core-S2L2A
    grid = get_grid()
    rows = np.array(list(sizes))
    cells = np.array(list(sizes.values()))
    assert 1_600 <= len(sizes) <= 1_750 < len(grid.rows())     # ~1,700 of the 1,893 rows populated
    assert 2.0e6 <= cells.sum() <= 2.5e6
    lat = grid.row_bottom_lat(rows)
    assert 2_000 <= cells.max() <= 4_000 and abs(lat[cells.argmax()]) < 70  # big rows at low/mid latitudes
    assert cells[lat > 80].max() < 300 and cells.min() >= 1                  # polar rows: a handful
    small = bench_scale.row_sizes(1_000_000)
    assert set(small) == set(sizes) and sum(small.values()) * 27.5 == pytest.approx(1e6, rel=0.05)


def test_expanded_row_has_more_dates_and_valid_ids(tmp_path):
    data = testdata.write_synthetic(tmp_path / "a", cells=testdata.cells_in_rows([5], 3), dim=8, seed=2)
    src = data.paths[0]
    # the generator names products SCALE_<cell>_<date>; give the source that form
    table = pq.read_table(src)
    assert table.num_rows
    names = [f"SCALE_{c}_0" for c in table.column("grid_cell").to_pylist()]

    table = table.set_column(table.schema.get_field_index("product_id"), "product_id", pa.array(names))
    ids = geoparquet.unique_ids(table.column("geometry").to_numpy(zero_copy_only=False),
                                table.column("timestamp"), names, geoparquet.embedding_matrix(table))
    table = table.set_column(table.schema.get_field_index("unique_id"), "unique_id", pa.array(ids, pa.string()))
    pq.write_table(table, tmp_path / "src.parquet")
    (tmp_path / "row=5U").mkdir()
    fixed = tmp_path / "row=5U" / "embeddings.parquet"
    geoparquet.write_embeddings(fixed, [table.cast(geoparquet.embedding_schema(8))], geoparquet.read_info(src))
    out = tmp_path / "b" / "row=5U" / "embeddings.parquet"
    _, n, _, _ = bench_scale._expand_row((str(fixed), str(out), "m", 4, 0))
    assert n == 4 * table.num_rows
    report = geoparquet.verify_file(out)
    assert not report.problems and not report.mismatched_ids
    dates = pq.read_table(out, columns=["timestamp"]).column("timestamp").to_pandas().nunique()
    assert dates == 4
