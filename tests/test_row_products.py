"""Global products that grow by the row: adding, replacing or removing one row opens only that row.

Every read of a file is counted (pyarrow's ParquetFile / read_table / read_schema / read_metadata /
OSFile and Python's open), so "O(row)" is checked as the number of embedding files a product
update touches, not inferred from timings. Results after an update are compared with a from-scratch
build of the same rows.
"""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from majortom_assets import geoparquet
from majortom_assets.vectors import pca_update, quantize, rowcache, testdata, timeseries
from majortom_assets.vectors.pca import PCAMoments, StreamingPCA

ROWS = [-40, -3, 12, 57]


class Reads:
    """Paths of every file opened while active (a monkeypatch of the readers the library uses)."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        record = self.paths.append

        def wrap(fn):
            def inner(source, *args, **kwargs):
                if isinstance(source, (str, os.PathLike)):
                    record(os.fspath(source))
                return fn(source, *args, **kwargs)
            return inner

        real_pf = pq.ParquetFile

        class CountingParquetFile(real_pf):
            def __init__(self, source, *args, **kwargs):
                if isinstance(source, (str, os.PathLike)):
                    record(os.fspath(source))
                super().__init__(source, *args, **kwargs)

        monkeypatch.setattr(pq, "ParquetFile", CountingParquetFile)
        for name in ("read_table", "read_schema", "read_metadata"):
            monkeypatch.setattr(pq, name, wrap(getattr(pq, name)))
        monkeypatch.setattr(pa, "OSFile", wrap(pa.OSFile))
        monkeypatch.setattr(builtins, "open", wrap(builtins.open))

    def embedding_files(self) -> set[str]:
        return {str(Path(p).resolve()) for p in self.paths if Path(p).name == "embeddings.parquet"}

    def clear(self) -> None:
        self.paths.clear()


@pytest.fixture()
def data(tmp_path):
    cells = testdata.cells_in_rows(ROWS, 12)
    return testdata.write_synthetic(tmp_path / "home", cells=cells, dim=16, n_classes=4, timestamps=2,
                                    class_scale=5.0, changed_fraction=0.2, seed=3)


def _by_row(paths):
    return {Path(p).parent.name.removeprefix("row="): Path(p) for p in paths}


def _replace_row(path: Path, shift: float) -> None:
    """Rewrite a row file with its embeddings moved (a re-embedded row), atomically."""
    table = pq.read_table(path)
    x = geoparquet.embedding_matrix(table) + np.float32(shift)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    table = table.set_column(table.schema.get_field_index("embedding"), "embedding", col)
    tmp = path.with_name(".replace.parquet")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def test_stamps_diff_names_added_changed_removed(tmp_path):
    files = []
    for row in ("3U", "10D", "7U"):
        p = tmp_path / f"row={row}" / "embeddings.parquet"
        p.parent.mkdir()
        p.write_bytes(b"x")
        files.append(p)
    current = rowcache.current_rows(files)
    recorded = {"10D": current["10D"][1], "7U": "0:0", "99U": "1:1"}
    d = rowcache.diff(current, recorded)
    assert (d.added, d.changed, d.removed, d.unchanged) == (["3U"], ["7U"], ["99U"], ["10D"])
    assert d.to_read == ["3U", "7U"] and d.to_drop == ["7U", "99U"] and d.dirty
    with pytest.raises(ValueError, match="row=<ROW>"):
        rowcache.current_rows([tmp_path / "loose.parquet"])


def test_moments_subtract_inverts_merge():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3.0, 1.0, (500, 8)), rng.normal(-1.0, 2.0, (300, 8))
    total = PCAMoments.of(a).merge(PCAMoments.of(b))
    back = total.subtract(PCAMoments.of(b))
    ref = PCAMoments.of(a)
    assert back.count == 500
    np.testing.assert_allclose(back.mean, ref.mean, atol=1e-10)
    np.testing.assert_allclose(back.scatter, ref.scatter, rtol=1e-9, atol=1e-7)
    with pytest.raises(ValueError, match="cannot subtract"):
        PCAMoments.of(b).subtract(total)


def test_pca_map_adding_a_row_reads_only_that_row(data, tmp_path, monkeypatch):
    rows = _by_row(data.paths)
    last = max(rows, key=rowcache._row_order)
    first = [p for r, p in rows.items() if r != last]
    out = tmp_path / "map"
    full = pca_update.update_pca_map(first, out)
    assert full["basis refit"] and full["refit reason"] == "first build" and full["rows read"] == 3
    before = pq.read_table(out / "pca.parquet").to_pandas().set_index("grid_cell")

    reads = Reads(monkeypatch)
    added = pca_update.update_pca_map(data.paths, out)
    assert reads.embedding_files() == {str(rows[last].resolve())}       # O(row): one embedding file
    assert added["rows read"] == 1 and added["rows unchanged"] == 3
    assert not added["basis refit"], added["refit reason"]              # same classes: no drift
    assert added["rows projected"] == 1 and added["basis drift (deg)"] < pca_update.DRIFT_DEG
    after = pq.read_table(out / "pca.parquet").to_pandas().set_index("grid_cell")
    assert len(after) == len(before) + 12 and set(after.loc[after["row"] == last].index).isdisjoint(before.index)
    # every old cell keeps its colour: the frozen basis and colour scale did not move
    assert (after.loc[before.index, ["r", "g", "b"]] == before[["r", "g", "b"]]).all().all()
    # the merged moments equal a fit of all rows from scratch
    fresh = StreamingPCA(3).fit_files(data.paths, central_only=True)
    total = PCAMoments.load(out / "state" / "total.npz")
    assert total.count == fresh.n_samples_
    np.testing.assert_allclose(total.mean, fresh.mean_, atol=1e-9)
    np.testing.assert_allclose(total.scatter, fresh.moments.scatter, rtol=1e-8, atol=1e-6)

    reads.clear()
    again = pca_update.update_pca_map(data.paths, out)
    assert reads.embedding_files() == set() and again["rows read"] == 0   # nothing changed: nothing read


def test_pca_map_replacing_and_removing_rows(data, tmp_path, monkeypatch):
    rows = _by_row(data.paths)
    out = tmp_path / "map"
    pca_update.update_pca_map(data.paths, out)
    reads = Reads(monkeypatch)
    victim = min(rows, key=rowcache._row_order)
    _replace_row(rows[victim], 40.0)  # far away: the components must move
    replaced = pca_update.update_pca_map(data.paths, out)
    assert reads.embedding_files() == {str(rows[victim].resolve())}
    assert replaced["rows replaced"] == 1 and replaced["rows read"] == 1
    assert replaced["basis refit"] and ("drifted" in replaced["refit reason"] or "mean moved" in replaced["refit reason"])
    assert replaced["rows projected"] == 4  # a refit recolours every row, from the cached central fragments
    fresh = StreamingPCA(3).fit_files(data.paths, central_only=True)
    total = PCAMoments.load(out / "state" / "total.npz")
    np.testing.assert_allclose(total.scatter, fresh.moments.scatter, rtol=1e-7, atol=1e-4)

    reads.clear()
    keep = [p for r, p in rows.items() if r != victim]
    removed = pca_update.update_pca_map(keep, out)
    assert reads.embedding_files() == set() and removed["rows removed"] == 1
    cells = pq.read_table(out / "pca.parquet", columns=["row"]).column("row").to_pylist()
    assert victim not in cells and len(cells) == 36
    assert not (out / "state" / "central" / f"row={victim}.parquet").exists()


@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_export_adding_a_row_encodes_only_that_row(data, tmp_path, monkeypatch, precision):
    rows = _by_row(data.paths)
    order = sorted(rows, key=rowcache._row_order)
    out = tmp_path / precision
    # a wide margin: 36 cells of 16-d data are too few for their range to hold a new row's
    quantize.update_export([rows[r] for r in order[:-1]], out, precision, model="m", range_margin=0.5)
    reads = Reads(monkeypatch)
    manifest = quantize.update_export(data.paths, out, precision, model="m", range_margin=0.5)
    opened = reads.embedding_files()
    if precision == "int8" and manifest["update"]["scale refit"]:
        pytest.fail("the new row fell outside the fitted int8 range plus margin")
    assert opened == {str(rows[order[-1]].resolve())}
    assert manifest["update"]["rows encoded"] == 1 and manifest["count"] == sum(
        pq.read_metadata(p).num_rows for p in data.paths)
    assert manifest["decoding"].startswith("x = ") and manifest["dtype"] in ("<f2", "|i1")
    monkeypatch.undo()
    # identical to a from-scratch build (same fitted scale for int8, as no refit happened)
    check = quantize.verify_export(out)
    assert check.ok and check.max_error_over_bound <= 1.0, check.problems
    flat = quantize.FlatEmbeddings.open(out)
    x = np.concatenate([geoparquet.embedding_matrix(pq.read_table(rows[r])) for r in order])
    if precision == "float16":
        np.testing.assert_array_equal(flat[:], x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(flat[[0, len(x) - 1]], flat[:][[0, len(x) - 1]])
    # the per-row metadata is real GeoParquet (geometry written), in matrix order
    import geopandas as gpd

    meta = pd_concat(gpd.read_parquet(out / e["metadata"]) for e in manifest["rows"])
    assert meta.crs is not None and meta.geometry.geom_type.eq("Polygon").all() and len(meta) == len(x)
    assert list(meta["unique_id"]) == flat.metadata(["unique_id"]).column("unique_id").to_pylist()
    # old versions of rewritten files are gone, the new ones named in the manifest remain
    listed = {out / e["file"] for e in manifest["rows"]} | {out / e["metadata"] for e in manifest["rows"]}
    assert set((out / "rows").rglob("*.*")) == listed


def pd_concat(frames):
    import pandas as pd

    return pd.concat(list(frames), ignore_index=True)


def test_int8_new_row_outside_the_range_refits_and_reencodes(data, tmp_path):
    rows = _by_row(data.paths)
    order = sorted(rows, key=rowcache._row_order)
    out = tmp_path / "int8"
    quantize.update_export([rows[r] for r in order[:-1]], out, "int8")
    _replace_row(rows[order[-1]], 100.0)
    manifest = quantize.update_export(data.paths, out, "int8")
    assert manifest["update"]["scale refit"] and manifest["update"]["rows encoded"] == 4
    check = quantize.verify_export(out)
    assert check.ok and check.max_error_over_bound <= 1.0, check.problems


def test_flat_export_metadata_is_geoparquet(data, tmp_path):
    import geopandas as gpd

    quantize.export(data.paths, tmp_path / "flat", "float16")
    gdf = gpd.read_parquet(tmp_path / "flat" / "metadata.parquet")
    assert gdf.crs.to_string() == "OGC:CRS84" and gdf.geometry.is_valid.all()
    geo = json.loads(pq.read_schema(tmp_path / "flat" / "metadata.parquet").metadata[b"geo"])
    assert set(geo["columns"]) == {"geometry"} and "covering" not in geo["columns"]["geometry"]
    manifest = json.loads((tmp_path / "flat" / "manifest.json").read_text())
    assert manifest["byte_order"] == "little-endian" and manifest["dtype"] == "<f2"


def test_change_adding_a_row_reads_only_that_row(data, tmp_path, monkeypatch):
    rows = _by_row(data.paths)
    order = sorted(rows, key=rowcache._row_order)
    out = tmp_path / "change"
    timeseries.update_change([rows[r] for r in order[:-1]], out)
    reads = Reads(monkeypatch)
    result = timeseries.update_change(data.paths, out)
    assert reads.embedding_files() == {str(rows[order[-1]].resolve())}
    assert result["update"]["rows read"] == 1 and result["update"]["rows unchanged"] == 3
    monkeypatch.undo()
    scratch = tmp_path / "scratch"
    timeseries.update_change(data.paths, scratch)
    for sub in ("cells", "fragments"):
        a = pq.read_table(out / sub).to_pandas().sort_values(["grid_cell", "t0"]).reset_index(drop=True)
        b = pq.read_table(scratch / sub).to_pandas().sort_values(["grid_cell", "t0"]).reset_index(drop=True)
        assert len(a) and a.drop(columns="row").equals(b.drop(columns="row"))
    totals = timeseries.change_totals(result["summaries"])
    cells = pq.read_table(out / "cells").to_pandas()
    assert totals["pairs"] == len(cells) and totals["max"] == pytest.approx(cells["cosine_distance"].max())
    assert totals["mean"] == pytest.approx(cells["cosine_distance"].mean())
    top = cells.sort_values("cosine_distance", ascending=False)["grid_cell"].iloc[0]
    assert totals["top"][0]["grid_cell"] == top
    changed = set(data.changed_cells)
    assert {t["grid_cell"] for t in totals["top"][:len(changed)]} == changed  # the true changes rank first


def test_evaluation_features_are_a_fixed_sample_cached_per_row(data, tmp_path, monkeypatch):
    from majortom_assets.vectors import evaluate

    rows = _by_row(data.paths)
    order = sorted(rows, key=rowcache._row_order)
    by_cell = evaluate.labels_by_cell(data.labels)
    sample = evaluate.sample_cells(by_cell.index, 30)
    assert len(sample) == 30 and list(sample) == list(evaluate.sample_cells(reversed(by_cell.index), 30))
    cache = tmp_path / "features"
    evaluate.update_features([rows[r] for r in order[:-1]], sample, cache, identity="s30")
    reads = Reads(monkeypatch)
    x, cells, update = evaluate.update_features(data.paths, sample, cache, identity="s30")
    assert reads.embedding_files() == {str(rows[order[-1]].resolve())} and update["rows read"] == 1
    monkeypatch.undo()
    ref_x, ref_cells = evaluate.labelled_features([rows[r] for r in order], sample)
    np.testing.assert_array_equal(x, ref_x)
    assert list(cells) == list(ref_cells) and set(cells) == set(sample)
    scores = evaluate.score_features("m", x, cells, by_cell, evaluate.EvalConfig(folds=3))
    assert scores.cells == 30 and scores.knn_accuracy > scores.chance
    # another sample (or labels) is another identity: every row is read again
    _, _, again = evaluate.update_features(data.paths, sample[:20], cache, identity="s20")
    assert again["rows read"] == 4


def test_int8_row_slightly_outside_the_range_is_clipped_not_refitted(data, tmp_path):
    rows = _by_row(data.paths)
    order = sorted(rows, key=rowcache._row_order)
    out = tmp_path / "int8"
    quantize.update_export([rows[r] for r in order[:-1]], out, "int8")
    lo, hi = (np.asarray(v) for v in rowcache.load_state(out / "state.json")["int8_range"])
    x = geoparquet.embedding_matrix(pq.read_table(rows[order[-1]]))
    shift = float((hi - x.max(axis=0)).min() + 0.1 * (hi - lo).min())  # some values just beyond the range
    _replace_row(rows[order[-1]], shift)
    manifest = quantize.update_export(data.paths, out, "int8")
    assert not manifest["update"]["scale refit"] and manifest["update"]["rows encoded"] == 1
    clipped = {e["row"]: e["clipped"] for e in manifest["rows"]}
    assert clipped[order[-1]] > 0 and all(v == 0 for r, v in clipped.items() if r != order[-1])
    check = quantize.verify_export(out)  # the bound of a clipped value grows by its distance outside
    assert check.ok and check.max_error_over_bound <= 1.0, check.problems


def test_pca_map_takes_rows_without_samples(data, tmp_path):
    """Every grid row is a partition, so a row file may hold no rows (no samples, or every sample
    failed on a first run): the map skips it, on a first build and when it arrives later."""
    rows = _by_row(data.paths)
    source = rows[max(rows, key=rowcache._row_order)]
    empty = tmp_path / "home2" / "row=80U" / "embeddings.parquet"
    empty.parent.mkdir(parents=True)
    table = pq.read_table(source)
    pq.write_table(table.slice(0, 0).replace_schema_metadata(table.schema.metadata), empty)
    out = tmp_path / "map"
    full = pca_update.update_pca_map([*data.paths, empty], out)
    reference = pca_update.update_pca_map(data.paths, tmp_path / "reference")
    assert full["cells"] == reference["cells"] and full["rows"] == len(data.paths) + 1
    added = pca_update.update_pca_map([*data.paths, empty], out)
    assert added["rows read"] == 0
    later = pca_update.update_pca_map(data.paths, tmp_path / "later")
    assert later["rows read"] == len(data.paths)
    grown = pca_update.update_pca_map([*data.paths, empty], tmp_path / "later")
    assert grown["rows read"] == 1 and grown["cells"] == later["cells"] and not grown["basis refit"]
