"""Similarity search against numpy brute force, with filters, query kinds and persistence."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from majortom_assets import geoparquet
from majortom_assets.fragment import fragment_layout
from majortom_assets.grid import get_grid
from majortom_assets.vectors import files, search, testdata

K = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # cells on both sides of the antimeridian: row 0U's first and last columns
    cells = testdata.cells_in_rows([-30, 0, 1, 700], 10) + ["0U_2004L", "0U_2003R"]
    return testdata.write_synthetic(tmp_path_factory.mktemp("search"), cells=cells, dim=32, timestamps=2,
                                    n_classes=5, seed=11)


@pytest.fixture(scope="module")
def truth(data):
    table = pa.concat_tables([pq.read_table(p) for p in data.paths])
    x = geoparquet.embedding_matrix(table)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return table, xn


def _brute(xn, q, allowed=None, k=K):
    q = q / np.linalg.norm(q)
    s = xn @ q
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    order = np.argsort(-s, kind="stable")[: min(k, int(np.isfinite(s).sum()))]
    return order, s[order]


@pytest.fixture(scope="module")
def indexes(data, tmp_path_factory):
    base = tmp_path_factory.mktemp("idx")
    out = {}
    for name in ("flat", "ivffp16", "ivfsq8", "ivfpq", "ivfpq-refined", "hnsw"):
        kind, _, refined = name.partition("-")
        cfg = search.IndexConfig(nlist=16, nprobe=1, pq_m=8, pq_nbits=4, train_size=2000,
                                 refine="fp16" if refined else "none")
        search.build_index(data.paths, base / name, kind=kind, config=cfg, model=data.model)
        out[name] = search.SearchIndex.load(base / name)
    return out


def test_flat_is_exact(indexes, truth):
    _, xn = truth
    idx = indexes["flat"]
    rng = np.random.default_rng(0)
    for q in rng.standard_normal((5, 32)):
        res = idx.query(q, k=K)
        ids, sims = _brute(xn, q)
        np.testing.assert_array_equal(np.sort(res["id"].to_numpy()), np.sort(ids))
        np.testing.assert_allclose(res["similarity"].to_numpy(), sims, atol=1e-5)
        np.testing.assert_allclose(res["distance"], 1 - res["similarity"])


@pytest.mark.parametrize("kind", ["ivffp16", "ivfsq8", "ivfpq-refined", "hnsw"])
def test_approximate_recall(indexes, truth, kind):
    """Recall, plus the true similarity of what is returned: synthetic fragments of one cell at two
    dates are near-ties finer than 8-bit codes resolve, so a swapped near-tie is not an error."""
    _, xn = truth
    queries = xn[::97][:30]
    hits, gaps = 0, []
    for q in queries:
        res = indexes[kind].query(q, k=K, nprobe=4)
        assert len(res) == K
        ids, sims = _brute(xn, q)
        hits += len(set(res["id"]) & set(ids))
        got = np.sort(xn[res["id"].to_numpy()] @ q)[::-1]
        gaps.append(np.max(sims - got))
    assert hits / (K * len(queries)) >= 0.6
    assert np.mean(gaps) < 0.01


@pytest.mark.parametrize("kind", ["flat", "ivffp16", "ivfsq8", "ivfpq", "ivfpq-refined", "hnsw"])
def test_selective_filters_return_k_correct_results(indexes, truth, data, kind):
    table, xn = truth
    # one grid row, second date only, in a bbox: only a few dozen fragments qualify
    cell = data.labels.grid_cell[12]
    lat, lon = data.labels.centre_lat[12], data.labels.centre_lon[12]
    flt = search.SearchFilter(bbox=(lon - 0.5, lat - 0.5, lon + 0.5, lat + 0.5), start=data.timestamps[1],
                              rows=[cell.split("_")[0]])
    t = table.column("timestamp").cast(pa.int64()).to_numpy()
    start_us = data.timestamps[1].value // 1000
    clat, clon = table.column("centre_lat").to_numpy(), table.column("centre_lon").to_numpy()
    rows = table.column("grid_row_u").to_numpy()
    allowed = ((t >= start_us) & (np.abs(clat - lat) <= 0.5) & (np.abs(clon - lon) <= 0.5)
               & (rows == int(get_grid().latlon_to_cell(lat, lon)[0])))
    assert 0 < allowed.sum() < 200
    q = xn[0]  # a vector far from the allowed region: naive post-filtering would find nothing
    for k in (K, int(allowed.sum()) + 5):
        res = indexes[kind].query(q, k=k, filters=flt)
        assert len(res) == min(k, allowed.sum())
        assert allowed[res["id"].to_numpy()].all()
    if kind == "ivfpq":  # 4-bit PQ without re-ranking: only count and filter are guaranteed
        return
    res = indexes[kind].query(q, k=K, filters=flt)
    ids, _ = _brute(xn, q, allowed)
    assert len(set(res["id"]) & set(ids)) >= 0.8 * K


def test_antimeridian_bbox(indexes, truth):
    table, xn = truth
    lon = table.column("centre_lon").to_numpy()
    res = indexes["flat"].query(xn[5], k=1000, filters=search.SearchFilter(bbox=(179.0, -5, -179.0, 5)))
    expected = (lon >= 179.0) | (lon <= -179.0)
    assert expected.sum() > 0 and len(res) == expected.sum()
    assert set(res["id"]) == set(np.flatnonzero(expected))


def test_query_by_cell_latlon_and_unique_id(indexes, truth, data):
    table, xn = truth
    idx = indexes["flat"]
    cell = data.labels.grid_cell[3]
    layout = fragment_layout(1068, 1068, 224)
    boxes = np.asarray(table.column("pixel_bbox").to_pylist())
    cells = table.column("grid_cell").to_numpy(zero_copy_only=False)
    in_cell = cells == cell
    central = in_cell & (boxes == layout.boxes[layout.central]).all(axis=1)
    q_central = xn[central].mean(axis=0)
    ids, _ = _brute(xn, q_central)
    res = idx.query(cell=cell, k=K)
    assert set(res["id"]) == set(ids)
    q_mean = xn[in_cell].mean(axis=0)
    assert set(idx.query(cell=cell, k=K, cell_mode="mean")["id"]) == set(_brute(xn, q_mean)[0])
    by_place = idx.query(latlon=(data.labels.centre_lat[3], data.labels.centre_lon[3]), k=K)
    assert set(by_place["id"]) == set(ids)
    excl = idx.query(cell=cell, k=K, exclude_query=True)
    assert not (excl["grid_cell"] == cell).any() and len(excl) == K

    uid = table.column("unique_id")[7].as_py()
    res = idx.query(unique_id=uid, k=3)
    assert res["unique_id"].iloc[0] == uid and res["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert uid not in set(idx.query(unique_id=uid, k=3, exclude_query=True)["unique_id"])
    # metadata is aligned with faiss ids: the stored row's own vector reproduces the similarity
    for _, row in res.iterrows():
        np.testing.assert_allclose(xn[row["id"]] @ xn[7], row["similarity"], atol=1e-5)
        assert table.column("unique_id")[int(row["id"])].as_py() == row["unique_id"]
    assert {"grid_cell", "geometry", "timestamp", "similarity", "distance"} <= set(res.columns)


def test_errors(indexes, data):
    idx = indexes["flat"]
    with pytest.raises(KeyError, match="1U_77R"):
        idx.query(cell="1U_77R")
    with pytest.raises(ValueError, match="exactly one"):
        idx.query(np.zeros(32), cell=data.labels.grid_cell[0])
    with pytest.raises(ValueError, match="dimension"):
        idx.query(np.zeros(5))
    with pytest.raises(ValueError, match="latitudes"):
        search.SearchFilter(bbox=(0, 10, 1, 5))
    with pytest.raises(ValueError, match="9X"):
        search.SearchFilter(rows=["9X"])
    with pytest.raises(FileNotFoundError, match="not a search index"):
        search.SearchIndex.load(data.root)


def test_rebuild_replaces_directory_atomically(data, tmp_path):
    out = tmp_path / "idx"
    search.build_index(data.paths[:1], out, kind="flat")
    first = search.SearchIndex.load(out)
    manifest = search.build_index(data.paths, out, kind="auto")
    assert manifest["kind"] == "flat" and len(search.SearchIndex.load(out)) > len(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp dirs left


def test_query_by_cell_after_a_partition_changed_asks_for_a_rebuild(tmp_path):
    cells = testdata.cells_in_rows([0, 1], 3)
    data = testdata.write_synthetic(tmp_path / "emb", cells=cells, dim=16, seed=1)
    search.build_index(data.paths, tmp_path / "idx", kind="flat", model=data.model)
    idx = search.SearchIndex.load(tmp_path / "idx")
    assert len(idx.query(cell=cells[0], k=3)) == 3
    testdata.write_synthetic(tmp_path / "emb", cells=cells, dim=16, seed=2)   # same rows, new vectors
    with pytest.raises(ValueError, match=r"changed since .* indexed.*majortom index"):
        idx.query(cell=cells[0], k=3)


def test_atomic_directory_restores_old_when_swap_fails(tmp_path, monkeypatch):
    out = tmp_path / "idx"
    with files.atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".idx.tmp-"):   # the second rename: new directory into place
            raise OSError("simulated failure renaming the new directory into place")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"), files.atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp or old dirs left


def test_atomic_directory_recovers_after_crash_between_renames(tmp_path):
    out = tmp_path / "idx"
    with files.atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("old")
    # a crash after moving the old directory aside, before the new one was renamed in
    aside = tmp_path / ".idx.old-crashed"
    aside.mkdir()
    os.replace(out, aside / "idx")
    files.recover_directory(out)
    assert (out / "a.txt").read_text() == "old" and not aside.exists()
    # the next write also recovers first, then replaces
    aside.mkdir()
    os.replace(out, aside / "idx")
    with files.atomic_directory(out) as tmp:
        assert (out / "a.txt").read_text() == "old"
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_exact_search_reference(data, truth):
    _, xn = truth
    q = xn[[1, 50, 300]]
    s, i = search.exact_search(data.paths, q, k=K, batch_rows=77)
    for row in range(3):
        ids, sims = _brute(xn, q[row])
        np.testing.assert_allclose(s[row], sims, atol=1e-5)
        assert set(i[row]) == set(ids)
