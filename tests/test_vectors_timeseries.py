"""Time series of aligned fragments and change scores, against numpy cosine distances."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from majortom_assets import geoparquet
from majortom_assets.vectors import testdata, timeseries


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cells = testdata.cells_in_rows([3, 4], 5)
    return testdata.write_synthetic(tmp_path_factory.mktemp("ts"), cells=cells, dim=16, timestamps=4,
                                    changed_fraction=0.3, change_scale=2.0, seed=9)


def test_series_aligned_and_ordered(data):
    cell = data.labels.grid_cell[0]
    series = timeseries.series_for(list(reversed(data.paths)), cell)
    assert len(series) == 25 and all(len(s) == 4 for s in series)
    for s in series:
        assert (np.diff(s.timestamps.astype("int64")) > 0).all()
        assert s.grid_cell == cell
    t = pq.read_table(data.paths[0])
    mask = (np.asarray(t.column("grid_cell").to_pylist()) == cell)
    boxes = np.asarray(t.column("pixel_bbox").to_pylist())
    one = series[7]
    rows = mask & (boxes == one.pixel_bbox).all(axis=1)
    emb = geoparquet.embedding_matrix(t)[rows]
    ts = t.column("timestamp").cast(pa.int64()).to_numpy()[rows]
    np.testing.assert_array_equal(one.embeddings, emb[np.argsort(ts)])
    only = timeseries.series_for(data.paths, cell, pixel_bbox=one.pixel_bbox)
    assert len(only) == 1 and only[0].pixel_bbox == one.pixel_bbox


def test_change_scores_find_changed_cells(data):
    assert data.changed_cells, "the synthetic data must hold cells with a change for this test to mean anything"
    assert set(data.changed_cells) < set(data.labels.grid_cell)   # and cells without one
    checked = 0
    for cell in data.labels.grid_cell:
        series = timeseries.series_for(data.paths, cell)
        per_fragment, per_cell = timeseries.change_scores(series)
        assert len(per_fragment) == 25 * 3 and len(per_cell) == 3
        s = series[3]
        a = s.embeddings[:-1] / np.linalg.norm(s.embeddings[:-1], axis=1, keepdims=True)
        b = s.embeddings[1:] / np.linalg.norm(s.embeddings[1:], axis=1, keepdims=True)
        mine = per_fragment[per_fragment.pixel_bbox.map(tuple) == s.pixel_bbox].cosine_distance.to_numpy()
        np.testing.assert_allclose(mine, 1 - np.sum(a * b, axis=1), atol=1e-6)
        assert (per_cell.fragments == 25).all()
        top = int(per_cell.cosine_distance.to_numpy().argmax())
        if cell in data.changed_cells:
            assert top == data.changed_cells[cell] - 1  # the jump is between dates idx-1 and idx
            assert per_cell.cosine_distance.max() > 5 * np.median(per_cell.cosine_distance)
            checked += 1
    assert checked == len(data.changed_cells)


def test_partition_scores_and_errors(data):
    _, per_cell = timeseries.partition_change_scores(data.paths[0])
    cells = set(pq.read_table(data.paths[0], columns=["grid_cell"]).column("grid_cell").to_pylist())
    assert set(per_cell.grid_cell) == cells and len(per_cell) == 3 * len(cells)
    with pytest.raises(KeyError, match="3U_1R"):
        timeseries.series_for(data.paths, "3U_1R")
    with pytest.raises(ValueError):
        timeseries.series_for(data.paths, "nonsense")
    with pytest.raises(KeyError, match="pixel_bbox"):
        timeseries.series_for(data.paths, data.labels.grid_cell[0], pixel_bbox=(1, 2, 3, 4))


def test_row_files_match_the_series_computation(data, tmp_path):
    """The vectorised per-row writer gives the same pairs and scores as series -> change_scores."""
    path = data.paths[0]
    want_fragments, want_cells = timeseries.partition_change_scores(path)
    summary = timeseries.write_change_files(path, tmp_path / "cells.parquet", tmp_path / "fragments.parquet")
    got = pq.read_table(tmp_path / "fragments.parquet").to_pandas()
    assert len(got) == len(want_fragments) > 0
    key = ["grid_cell", "t0", "box"]
    for frame in (got, want_fragments):
        frame["box"] = frame["pixel_bbox"].map(tuple)
    merged = got.merge(want_fragments, on=key, suffixes=("", "_ref"))
    assert len(merged) == len(got)
    np.testing.assert_allclose(merged["cosine_distance"], merged["cosine_distance_ref"], rtol=0, atol=1e-12)
    assert (merged["product_t1"] == merged["product_t1_ref"]).all() and (merged["t1"] == merged["t1_ref"]).all()
    cells = pq.read_table(tmp_path / "cells.parquet").to_pandas()
    np.testing.assert_allclose(cells.sort_values(["grid_cell", "t0"])["cosine_distance"],
                               want_cells.sort_values(["grid_cell", "t0"])["cosine_distance"], atol=1e-12)
    assert summary["pairs"] == len(want_cells) and summary["series"] == len(set(zip(got["grid_cell"], got["box"])))
    assert summary["max"] == pytest.approx(want_cells["cosine_distance"].max())
    assert summary["top"][0]["cosine_distance"] == pytest.approx(want_cells["cosine_distance"].max())
