"""Flat exports: exact float32 round trip, stated float16 / int8 bounds, manifest integrity."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from majortom_assets import geoparquet
from majortom_assets.standard import EXPORT_PRECISIONS
from majortom_assets.vectors import quantize, testdata


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cells = testdata.cells_in_rows([-2, 5, 40], 4)
    return testdata.write_synthetic(tmp_path_factory.mktemp("q"), cells=cells, dim=48, timestamps=2,
                                    class_scale=5.0, seed=5)


@pytest.fixture(scope="module")
def source(data):
    table = pa.concat_tables([pq.read_table(p) for p in data.paths])
    return table, geoparquet.embedding_matrix(table)


@pytest.mark.parametrize("precision", EXPORT_PRECISIONS)
def test_round_trip(data, source, tmp_path, precision):
    table, x = source
    out = tmp_path / precision
    manifest = quantize.export(data.paths, out, precision, model=data.model, batch_rows=113)
    flat = quantize.FlatEmbeddings.open(out)
    assert isinstance(flat.codes, np.memmap) and flat.codes.dtype == np.dtype(manifest["dtype"])
    assert (out / f"embeddings.{precision}.bin").stat().st_size == x.size * flat.codes.itemsize
    assert len(flat) == len(x) and flat.dim == x.shape[1]
    np.testing.assert_array_equal(flat.metadata(["unique_id"]).column("unique_id").to_numpy(zero_copy_only=False),
                                  table.column("unique_id").to_numpy(zero_copy_only=False))
    back = flat[:]
    if precision == "float32":
        assert back.tobytes() == x.tobytes()
    elif precision == "float16":
        bound = np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)
        assert (np.abs(back - x) <= bound).all()
        assert np.abs(back - x).max() > 0
    else:  # independent per-dimension range -> step, error at most half a step
        lo, hi = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
        step = (hi - lo) / 254
        np.testing.assert_allclose(manifest["scale"], step, rtol=1e-6)
        err = np.abs(back.astype(np.float64) - x)
        assert (err <= step / 2 * (1 + 1e-5) + 1e-6).all()
        assert (np.abs(np.asarray(flat.codes)) <= 127).all()
        i = np.abs(back - x).argmax()
        assert err.flat[i] > step[i % x.shape[1]] / 4  # it really is quantised
    check = quantize.verify_export(out)
    assert check.ok and check.rows == len(x), check.problems
    assert check.max_error_over_bound <= 1.0
    for src in manifest["sources"]:
        with open(src["path"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == src["sha256"]
    batches = list(flat.iter_batches(100))
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), back)


def test_verify_detects_changed_source(data, tmp_path):
    import shutil

    copy = tmp_path / "src" / "row=0U" / "embeddings.parquet"
    copy.parent.mkdir(parents=True)
    shutil.copy(data.paths[0], copy)
    quantize.export([copy], tmp_path / "e", "float32")
    t = pq.read_table(copy)
    geoparquet.write_embeddings(copy, t.slice(1), geoparquet.read_info(copy))
    check = quantize.verify_export(tmp_path / "e")
    assert not check.ok and any("sha256" in p for p in check.problems)


def test_errors(data, tmp_path):
    with pytest.raises(ValueError, match="bfloat3"):
        quantize.export(data.paths, tmp_path / "x", "bfloat3")
    assert not (tmp_path / "x").exists()
    out = tmp_path / "f"
    quantize.export(data.paths, out, "float16")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["count"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="bytes"):
        quantize.FlatEmbeddings.open(out)
    with pytest.raises(FileNotFoundError, match="not an embedding export"):
        quantize.FlatEmbeddings.open(tmp_path)
    with pytest.raises(ValueError, match="float16"):
        quantize.encode(np.array([[1e6]], np.float32), "float16", where="file.parquet")
