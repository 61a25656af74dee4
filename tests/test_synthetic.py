"""Synthetic Core collections: layout, resolutions, labels, content, determinism, CLI, atomicity.

Checks read the files with pyarrow and rasterio directly, never through core.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from rasterio.io import MemoryFile

from majortom_assets import synthetic

S2L2A_COLUMNS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
S2L1C_COLUMNS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
METADATA = ["grid_cell", "grid_row_u", "grid_col_r", "product_id", "timestamp", "cloud_cover", "nodata",
            "centre_lat", "centre_lon", "crs", "parquet_url", "parquet_row"]
REPO = Path(__file__).resolve().parents[1]


def _decode(blob: bytes):
    with MemoryFile(blob) as mem, mem.open() as ds:
        return ds.read(1), ds.transform, ds.crs.to_string() if ds.crs else None


def _row_group(collection: Path, meta_row, columns=None):
    return pq.ParquetFile(collection / meta_row["parquet_url"]).read_row_group(
        int(meta_row["parquet_row"]), columns=columns)


@pytest.mark.parametrize("source, bands", [("S2L1C", S2L1C_COLUMNS + ["cloud_mask"]),
                                           ("S2L2A", S2L2A_COLUMNS + ["cloud_mask"]),
                                           ("S1RTC", ["vv", "vh"])])
def test_core_layout(source, bands, request):
    collection = request.getfixturevalue(f"{source.lower()}_collection")
    meta = pq.read_table(collection / "metadata.parquet").to_pandas()
    expected_meta = [c for c in METADATA if not (source == "S1RTC" and c == "cloud_cover")]
    assert list(meta.columns) == expected_meta
    labels = pq.read_table(collection / "labels.parquet").to_pandas()
    assert list(labels.columns) == ["grid_cell", "class_id", "class_name"]
    assert set(labels["grid_cell"]) == set(meta["grid_cell"])
    shards = sorted((collection / "images").glob("part_*.parquet"))
    assert len(shards) >= 2 and not list(collection.rglob("*.tmp"))
    rows_seen = 0
    for shard in shards:
        parquet = pq.ParquetFile(shard)
        assert parquet.schema_arrow.names == ["product_id", "grid_cell", "product_datetime", "thumbnail", *bands]
        assert all(parquet.metadata.row_group(i).num_rows == 1 for i in range(parquet.num_row_groups))
        rows_seen += parquet.num_row_groups
    assert rows_seen == len(meta)
    for _, row in meta.iterrows():   # every metadata row points at its own sample
        table = _row_group(collection, row, ["product_id", "grid_cell", "product_datetime"])
        assert table.column("product_id")[0].as_py() == row["product_id"]
        assert table.column("grid_cell")[0].as_py() == row["grid_cell"]
        assert table.column("product_datetime")[0].as_py() == row["timestamp"]
        r, c = row["grid_cell"].split("_")
        assert row["grid_row_u"] == (int(r[:-1]) if r[-1] == "U" else -int(r[:-1]))
        assert row["grid_col_r"] == (int(c[:-1]) if c[-1] == "R" else -int(c[:-1]))
        assert row["parquet_url"].startswith("images/part_")


def test_s2_band_resolutions_dtypes_and_alignment(s2l1c_collection):
    meta = pq.read_table(s2l1c_collection / "metadata.parquet").to_pandas()
    row = meta.iloc[0]
    table = _row_group(s2l1c_collection, row)
    sizes = {**{b: 1068 for b in ("B02", "B03", "B04", "B08", "cloud_mask")},
             **{b: 534 for b in ("B05", "B06", "B07", "B8A", "B11", "B12")},
             **{b: 178 for b in ("B01", "B09", "B10")}}
    _, ref_transform, ref_crs = _decode(table.column("B04")[0].as_py())
    assert ref_crs == row["crs"]
    for band, side in sizes.items():
        pixels, transform, crs = _decode(table.column(band)[0].as_py())
        assert pixels.shape == (side, side), band
        assert pixels.dtype == (np.uint8 if band == "cloud_mask" else np.uint16), band
        assert crs == ref_crs
        assert (transform.c, transform.f) == (ref_transform.c, ref_transform.f)   # same origin
        assert transform.a == pytest.approx(10.0 * 1068 / side)
    thumb = table.column("thumbnail")[0].as_py()
    assert thumb[:8] == b"\x89PNG\r\n\x1a\n"


def test_s1_bands_are_float32_linear(s1rtc_collection):
    meta = pq.read_table(s1rtc_collection / "metadata.parquet").to_pandas()
    table = _row_group(s1rtc_collection, meta.iloc[0])
    vv, _, _ = _decode(table.column("vv")[0].as_py())
    vh, _, _ = _decode(table.column("vh")[0].as_py())
    assert vv.dtype == vh.dtype == np.float32 and vv.shape == (1068, 1068)
    valid = vv > 0
    assert 1e-4 < np.median(vv[valid]) < 1.0 and np.median(vh[valid]) < np.median(vv[valid])


def test_cloud_cover_and_nodata_match_the_pixels(s2l2a_collection):
    meta = pq.read_table(s2l2a_collection / "metadata.parquet").to_pandas()
    assert meta["cloud_cover"].max() > 0 and (meta["cloud_cover"] == 0).any()
    assert meta["nodata"].max() > 0
    for _, row in meta.iterrows():
        table = _row_group(s2l2a_collection, row, ["B04", "B02", "cloud_mask"])
        b04, _, _ = _decode(table.column("B04")[0].as_py())
        b02, _, _ = _decode(table.column("B02")[0].as_py())
        mask, _, _ = _decode(table.column("cloud_mask")[0].as_py())
        assert row["cloud_cover"] == pytest.approx(100 * (mask == 1).mean(), abs=1e-3)
        assert row["nodata"] == pytest.approx(((b04 == 0) & (b02 == 0)).mean(), abs=1e-5)
        if row["cloud_cover"] > 0:   # clouds are bright in the blue band
            assert np.median(b02[mask == 1]) > 3 * np.median(b02[(mask == 0) & (b02 > 0)])


def test_labels_shared_between_sources(s2l2a_collection, s1rtc_collection, s2l1c_collection):
    frames = [pq.read_table(c / "labels.parquet").to_pandas().sort_values("grid_cell").reset_index(drop=True)
              for c in (s2l2a_collection, s1rtc_collection, s2l1c_collection)]
    pd.testing.assert_frame_equal(frames[0], frames[1])
    pd.testing.assert_frame_equal(frames[0], frames[2])
    names = [synthetic.LAND_COVER_CLASSES[i] for i in frames[0]["class_id"]]
    assert names == list(frames[0]["class_name"])


def _reference_spectra():
    refs = {k: np.asarray(v, float) for k, v in synthetic.CLASS_REFLECTANCE.items()}
    refs["cropland"] = (np.asarray(synthetic.CROP_GREEN, float) + np.asarray(synthetic.CROP_SOIL, float)) / 2
    return refs


def test_classes_are_separable_by_their_spectra(tmp_path):
    """Nearest reference spectrum (log space) of each sample's median recovers its label: the
    content carries the class. Many small cells, both timestamps, so every class appears."""
    out = synthetic.generate_collection(tmp_path / "many", "S2L2A", rows=["195D", "672U", "870U"],
                                        cells_per_row=8, timestamps=2, size=96, seed=3)
    meta = pq.read_table(out / "metadata.parquet").to_pandas()
    labels = pq.read_table(out / "labels.parquet").to_pandas().set_index("grid_cell")["class_name"]
    assert labels.nunique() >= 5
    refs = _reference_spectra()
    band_index = [synthetic.S2L1C_BANDS.index(b) for b in S2L2A_COLUMNS]
    hits = 0
    for _, row in meta.iterrows():
        table = _row_group(out, row, S2L2A_COLUMNS + ["cloud_mask"])
        mask, _, _ = _decode(table.column("cloud_mask")[0].as_py())
        b04, _, _ = _decode(table.column("B04")[0].as_py())
        clear = (mask == 0) & (b04 > 0)
        median = []
        for band in S2L2A_COLUMNS:
            pixels, _, _ = _decode(table.column(band)[0].as_py())
            f = 96 // pixels.shape[0]
            median.append(np.median(pixels[clear[::f, ::f]]))
        dist = {k: np.linalg.norm(np.log(median) - np.log(v[band_index])) for k, v in refs.items()}
        hits += min(dist, key=dist.get) == labels[row["grid_cell"]]
    assert hits / len(meta) >= 0.95


def test_timestamps_vary_a_little(s2l2a_collection):
    meta = pq.read_table(s2l2a_collection / "metadata.parquet").to_pandas()
    cell = meta["grid_cell"].iloc[0]
    pair = meta[meta["grid_cell"] == cell].sort_values("timestamp")
    assert len(pair) == 2 and pair["timestamp"].is_unique and pair["product_id"].is_unique
    a, b = (_decode(_row_group(s2l2a_collection, r, ["B08"]).column("B08")[0].as_py())[0].astype(float)
            for _, r in pair.iterrows())
    valid = (a > 0) & (b > 0) & (a < 5000) & (b < 5000)   # skip no-data and cloud
    corr = np.corrcoef(a[valid], b[valid])[0, 1]
    assert 0.5 < corr < 0.9999
    # real-style product ids: same tile in both passes
    tiles = {p.split("_")[5] for p in pair["product_id"]}
    assert len(tiles) == 1 and all(p.startswith(("S2A_MSIL2A_", "S2B_MSIL2A_")) for p in pair["product_id"])


def test_deterministic_in_seed(tmp_path):
    kwargs = {"cells": ["136U_496R", "12D_3L"], "timestamps": 2, "size": 96, "samples_per_shard": 3}
    a = synthetic.generate_collection(tmp_path / "a", "S2L1C", seed=5, **kwargs)
    b = synthetic.generate_collection(tmp_path / "b", "S2L1C", seed=5, **kwargs)
    c = synthetic.generate_collection(tmp_path / "c", "S2L1C", seed=6, **kwargs)
    for name in ("metadata.parquet", "images/part_00000.parquet", "images/part_00001.parquet"):
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
    assert not pq.read_table(a / "images/part_00000.parquet").equals(pq.read_table(c / "images/part_00000.parquet"))


def test_failed_generation_leaves_no_partial_files(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic._render

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_render", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        synthetic.generate_collection(tmp_path / "x", "S2L2A", cells=["136U_496R", "12D_3L"], size=96)
    leftovers = [p for p in (tmp_path / "x").rglob("*") if p.is_file()]
    assert leftovers == []


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValidationError, match="13X"):
        synthetic.generate_collection("/nonexistent", "S2L2A", rows=["13X"])
    with pytest.raises(ValidationError, match="136U_496"):
        synthetic.generate_collection("/nonexistent", "S2L2A", cells=["136U_496"])
    with pytest.raises(ValidationError, match="multiple of 6"):
        synthetic.generate_collection("/nonexistent", "S2L2A", size=100)
    with pytest.raises(ValidationError):
        synthetic.generate_collection("/nonexistent", "S3OLCI")


def test_rows_pick_both_ends_of_the_row():
    cells = synthetic.cells_for_rows(["195D"], 4)
    assert len(cells) == 4 and cells[0] == "195D_1911L" and cells[-1] == "195D_1910R"


def test_cli_round_trip(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "majortom_assets.synthetic", str(out), "--source", "S1RTC",
                           "--cells", "136U_496R", "--rows", "12D", "--cells-per-row", "2",
                           "--timestamps", "2", "--size", "96", "--seed", "4"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    meta = pq.read_table(out / "metadata.parquet").to_pandas()
    assert len(meta) == 3 * 2 and set(meta["grid_cell"]) >= {"136U_496R"}
    assert (meta["grid_row_u"] == -12).sum() == 4
    table = _row_group(out, meta.iloc[0], ["vv"])
    assert _decode(table.column("vv")[0].as_py())[0].shape == (96, 96)
    bad = subprocess.run([sys.executable, "-m", "majortom_assets.synthetic", str(tmp_path / "bad"),
                          "--source", "S2L2A", "--rows", "99Q"], capture_output=True, text=True,
                         timeout=120, cwd=REPO, check=False)
    assert bad.returncode == 2 and "99Q" in bad.stderr
    assert not (tmp_path / "bad").exists()
