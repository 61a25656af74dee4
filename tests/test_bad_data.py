"""Bad data never loses output and is never accepted silently (issue 11, the data half).

Each test is one attack that succeeded before: a rerun whose every sample fails emptied a good
row file; a killed index/export left its temp directory forever; bands of the wrong dtype were
wrapped into uint16; non-cells and row/col that disagree with the name were written; duplicate
metadata rows gave duplicate unique_ids; row files of different weights were indexed together;
a georeference shifted 200 km passed `majortom embed`; `verify_file` passed edited files; one
bad timestamp aborted a whole collection and a missing column ended in KeyError. Library calls
and the CLI as a user runs it (subprocess, with PYTHONPATH passed through).

Names introduced by the fix are imported inside the tests, so on the code before it each test
fails on its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from majortom_assets import geoparquet, geotiff, synthetic
from majortom_assets.core import CoreCollection, SampleError, decode_bands
from majortom_assets.engine import EngineConfig, embed_to_file
from majortom_assets.models import load_embedder
from majortom_assets.vectors import files

SIZE = 240                      # 6 x 40: every band resolution divides it; 4 fragments of 224 px
CELLS = ["136U_10R", "136U_11R", "137U_10R"]
MODEL = "ssl4eo-s2"


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def collection_dir(tmp_path_factory) -> Path:
    return synthetic.generate_collection(tmp_path_factory.mktemp("bad") / "Core-S2L1C", "S2L1C", cells=CELLS,
                                         size=SIZE, seed=5, samples_per_shard=2)


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(MODEL, "random", tiny=True, seed=0)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "majortom_assets.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy(), check=False)


def _embed_cli(collection: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("embed", "--collection", str(collection), "--model", MODEL, "--tiny", "--weights", "random",
                "--image-size", str(SIZE), "--out", str(out), "--no-progress", "--device", "cpu", *extra)


def _set_band(collection: Path, cell: str, band: str, make) -> None:
    """Replace one band of one sample (by cell) with make(pixels, info) -> GeoTIFF bytes."""
    meta = pd.read_parquet(collection / "metadata.parquet")
    row = meta[meta["grid_cell"] == cell].iloc[0]
    shard = collection / row["parquet_url"]
    table = pq.read_table(shard)
    values = table.column(band).to_pylist()
    pixels, info = geotiff.decode_band(values[int(row["parquet_row"])])
    values[int(row["parquet_row"])] = make(pixels, info)
    table = table.set_column(table.schema.get_field_index(band), band, pa.array(values, pa.binary()))
    pq.write_table(table, shard, row_group_size=1)


def _epsg(info) -> int:
    return int(info.crs.split(":")[1])


def _rewrite_metadata(collection: Path, edit) -> None:
    meta = pq.read_table(collection / "metadata.parquet").to_pandas()
    pq.write_table(pa.Table.from_pandas(edit(meta), preserve_index=False), collection / "metadata.parquet")


# ------------------------------------------------------------------------------ 1. data lost
def test_rerun_where_every_sample_fails_keeps_the_existing_row_file(collection_dir, embedder, tmp_path):
    collection = CoreCollection(str(collection_dir))
    meta = collection.metadata()
    row = meta[meta["grid_row_u"] == 136]
    out = tmp_path / "row=136U" / "embeddings.parquet"
    first = embed_to_file(collection, row, embedder, EngineConfig(image_size=SIZE, device="cpu"), out)
    assert first.samples == 2 and not first.kept_existing
    good = out.read_bytes()
    # a wrong image size fails every sample (every band has the wrong size)
    again = embed_to_file(collection, row, embedder, EngineConfig(image_size=SIZE + 12, device="cpu"), out)
    assert again.samples == 0 and len(again.failures) == 2 and again.kept_existing
    assert out.read_bytes() == good and geoparquet.verify_file(out).ok
    assert [p.name for p in out.parent.iterdir()] == ["embeddings.parquet"]   # no temp file left
    # without an earlier file the partition still gets its (empty) result
    fresh = tmp_path / "row=137U" / "embeddings.parquet"
    none = embed_to_file(collection, row, embedder, EngineConfig(image_size=SIZE + 12, device="cpu"), fresh)
    assert not none.kept_existing and pq.ParquetFile(fresh).metadata.num_rows == 0


def test_cli_rerun_with_unreadable_shard_keeps_the_row_file_and_says_so(collection_dir, tmp_path):
    collection = _copy(collection_dir, tmp_path / "Core-S2L1C")
    out = tmp_path / "out"
    done = _embed_cli(collection, out, "--rows", "137U")
    assert done.returncode == 0, done.stderr
    path = out / MODEL / "row=137U" / "embeddings.parquet"
    good = path.read_bytes()
    shard = collection / pd.read_parquet(collection / "metadata.parquet").query("grid_row_u == 137")["parquet_url"].iloc[0]
    shard.write_bytes(b"not parquet any more")
    again = _embed_cli(collection, out, "--rows", "137U")
    assert again.returncode == 1
    assert f"row 137U: every one of its 1 sample(s) failed; the existing {path} was left untouched" in again.stdout
    assert path.read_bytes() == good


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from majortom_assets.vectors import files
with files.atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "index.faiss").write_bytes(b"x" * 100_000)   # a partial index
    print(tmp, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_index_writer_leaves_a_temp_directory_that_the_next_run_sweeps(tmp_path):
    final = tmp_path / "indexes" / MODEL
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(final)], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL
    partial = Path(done.stdout.strip())
    assert partial.is_dir() and partial.name.startswith(f".{final.name}.tmp-")
    # an old-style temp directory (no writer in its name) is swept by age, a live one is kept
    old = final.parent / f".{final.name}.tmp-abc123xy"
    old.mkdir()
    past = time.time() - 2 * geoparquet.STALE_TEMP_AGE_S
    os.utime(old, (past, past))
    young = final.parent / f".{final.name}.tmp-zzz999qq"
    young.mkdir()
    with files.atomic_directory(final) as tmp:
        assert tmp.is_dir() and not partial.exists() and not old.exists() and young.exists()
        (tmp / "index.faiss").write_bytes(b"complete")
    assert (final / "index.faiss").read_bytes() == b"complete"
    assert sorted(p.name for p in final.parent.iterdir()) == sorted([final.name, young.name])


def test_a_live_writers_temp_directory_is_never_swept(tmp_path):
    from majortom_assets.vectors.files import sweep_stale_temp_dirs

    final = tmp_path / "exports"
    with files.atomic_directory(final) as tmp:
        assert sweep_stale_temp_dirs(final, max_age_s=0.0) == [] and tmp.is_dir()


# ------------------------------------------------------------------------------ 2. bad bands
def _band_bytes(values: np.ndarray) -> bytes:
    return synthetic.encode_geotiff(values, (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), 32633, nodata=None)


@pytest.mark.parametrize("values, reason", [
    (np.full((24, 24), -5, np.int16), "values -5..-5 lie outside uint16's 0..65535"),
    (np.full((24, 24), 70000.0, np.float64), "values 70000.0..70000.0 lie outside uint16's 0..65535"),
    (np.where(np.eye(24, dtype=bool), np.nan, 100.0).astype(np.float32), "24 pixel(s) are NaN or infinite"),
    (np.full((24, 24), 0.25, np.float32), "non-integer values"),
])
def test_s2_band_of_the_wrong_dtype_or_range_is_rejected(values, reason):
    with pytest.raises(SampleError) as err:
        decode_bands({"B04": _band_bytes(values)}, ["B04"], 24, product_id="P", grid_cell="136U_10R", file="f.parquet")
    text = str(err.value)
    assert reason in text and f"band B04 is stored as {values.dtype}, not uint16" in text
    assert "band=B04" in text and "grid_cell=136U_10R" in text and "file=f.parquet" in text


def test_lossless_other_dtypes_and_s1_nan_still_decode():
    ints = np.arange(576, dtype=np.int16).reshape(24, 24)
    pixels, _, _ = decode_bands({"B04": _band_bytes(ints)}, ["B04"], 24, product_id="P", grid_cell="136U_10R")
    np.testing.assert_array_equal(pixels[0], ints.astype(np.uint16))
    s1 = np.full((24, 24), 0.05, np.float32)
    s1[0, :3] = np.nan   # S1 no-data, kept as NaN
    pixels, _, _ = decode_bands({"vv": _band_bytes(s1)}, ["vv"], 24, product_id="P", grid_cell="136U_10R")
    assert np.isnan(pixels[0, 0, :3]).all() and pixels.dtype == np.float32


def test_cli_skips_only_the_sample_with_a_wrapped_band(collection_dir, tmp_path):
    collection = _copy(collection_dir, tmp_path / "Core-S2L1C")
    _set_band(collection, "136U_11R", "B04",
              lambda px, info: synthetic.encode_geotiff(px.astype(np.int16) - 2000, info.transform, _epsg(info)))
    done = _embed_cli(collection, tmp_path / "out", "--rows", "136U")
    assert done.returncode == 0, done.stderr
    assert "embedded 1 cells" in done.stdout and "skipped 1 sample(s)" in done.stdout
    line = next(ln for ln in done.stdout.splitlines() if "136U_11R" in ln)
    assert "band B04 is stored as int16, not uint16" in line and "would wrap" in line and "file=" in line


# ----------------------------------------------------------------- 3/4/8. metadata, up front
def test_non_cells_and_disagreeing_row_col_are_rejected_per_row(collection_dir, tmp_path):
    collection = _copy(collection_dir, tmp_path / "Core-S2L1C")

    def edit(meta):
        extra = pd.concat([meta.iloc[[0]]] * 4, ignore_index=True)
        extra["grid_cell"] = ["", "999Z_1R", "arbitrary text", "999U_1R"]   # last: no such row
        extra["product_id"] = [f"X{i}" for i in range(4)]
        meta = pd.concat([meta, extra], ignore_index=True)
        meta.loc[1, "grid_row_u"] = 137   # 136U_11R filed under the wrong row
        return meta

    _rewrite_metadata(collection, edit)
    selection = CoreCollection(str(collection)).select()
    assert sorted(selection.frame["grid_cell"]) == ["136U_10R", "137U_10R"]
    reasons = dict(zip(selection.dropped["product_id"], selection.dropped["reason"], strict=True))
    for i, cell in enumerate(["", "999Z_1R", "arbitrary text", "999U_1R"]):
        assert f"grid_cell {cell!r} is not a cell of the 10 km grid" in reasons[f"X{i}"]
    moved = selection.dropped[selection.dropped["grid_cell"] == "136U_11R"]
    assert "grid_row_u/grid_col_r (137, 11) disagree with grid_cell 136U_11R (row 136, col 11)" in moved["reason"].iloc[0]


def test_library_writer_refuses_row_col_that_disagree_with_the_name():
    boxes = np.array([[0, 0, 224, 224]])
    with pytest.raises(ValueError, match="disagree with the cell's name"):
        geoparquet.sample_table(np.zeros((1, 4), np.float32), grid_cell="136U_10R", grid_row_u=137, grid_col_r=10,
                                product_id="P", timestamp="2020-01-01", crs="EPSG:32633",
                                transform=(10.0, 0, 500000.0, 0, -10.0, 5000000.0), boxes=boxes)
    with pytest.raises(ValueError, match="grid_cell is not a grid cell"):
        geoparquet.sample_table(np.zeros((1, 4), np.float32), grid_cell="999Z_1R", grid_row_u=1, grid_col_r=1,
                                product_id="P", timestamp="2020-01-01", crs="EPSG:32633",
                                transform=(10.0, 0, 500000.0, 0, -10.0, 5000000.0), boxes=boxes)


def test_duplicate_metadata_rows_are_dropped_once_and_counted_per_row(collection_dir, tmp_path):
    collection = _copy(collection_dir, tmp_path / "Core-S2L1C")
    _rewrite_metadata(collection, lambda m: pd.concat([m, m.iloc[[0, 0, 2]]], ignore_index=True))
    selection = CoreCollection(str(collection)).select()
    assert len(selection.frame) == 3 and selection.duplicates == 3 and selection.rejected == 0
    per_row = selection.per_row().set_index("row")
    assert per_row.loc["136U", "duplicates dropped"] == 2 and per_row.loc["137U", "duplicates dropped"] == 1
    done = _embed_cli(collection, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert ("metadata: dropped 3 duplicate row(s) (first kept) and rejected 0 bad row(s) "
            "(136U: 2 duplicate(s), 0 rejected, 137U: 1 duplicate(s), 0 rejected)") in done.stdout
    ids = pa.concat_tables([pq.read_table(p, columns=["unique_id"]) for p in
                            sorted((tmp_path / "out" / MODEL).glob("row=*/embeddings.parquet"))])["unique_id"]
    assert len(ids) == 3 * 4 and len(set(ids.to_pylist())) == len(ids)


def test_one_malformed_timestamp_costs_one_row_named(collection_dir, tmp_path):
    collection = _copy(collection_dir, tmp_path / "Core-S2L1C")

    def edit(meta):
        meta["timestamp"] = meta["timestamp"].astype(str)
        meta.loc[1, "timestamp"] = "2023-13-45 whenever"
        return meta

    _rewrite_metadata(collection, edit)
    done = _embed_cli(collection, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "embedded 2 cells" in done.stdout and "format='ISO8601'" not in done.stdout + done.stderr
    line = next(ln for ln in done.stdout.splitlines() if "2023-13-45" in ln)
    meta = pd.read_parquet(collection / "metadata.parquet")
    assert meta["grid_cell"].iloc[1] in line and meta["product_id"].iloc[1] in line
    assert "timestamp '2023-13-45 whenever' is missing or not a time" in line


@pytest.mark.parametrize("column", ["timestamp", "grid_row_u"])
def test_missing_required_column_fails_at_once_naming_it(collection_dir, tmp_path, column):
    collection = _copy(collection_dir, tmp_path / "Core-S2L1C")
    _rewrite_metadata(collection, lambda m: m.drop(columns=[column]))
    with pytest.raises(ValueError, match=rf"lacks required column\(s\) \['{column}'\]"):
        CoreCollection(str(collection)).metadata()
    done = _embed_cli(collection, tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "KeyError" not in done.stderr
    assert f"lacks required column(s) ['{column}']" in done.stderr
    assert not (tmp_path / "out" / MODEL).exists() or not any((tmp_path / "out" / MODEL).glob("row=*"))


# --------------------------------------------------------------------------- 5. mixed weights
def test_global_products_refuse_rows_of_different_weights(collection_dir, tmp_path):
    from majortom_assets.vectors.files import MixedWeightsError

    root = tmp_path / "home"
    for row, seed in (("136U", "0"), ("137U", "1")):
        done = _embed_cli(collection_dir, root / "embeddings", "--rows", row, "--seed", seed)
        assert done.returncode == 0, done.stderr
    paths = files.model_paths(root, MODEL)
    from majortom_assets.vectors import pca, quantize, search

    for build in (lambda: search.build_index(paths, tmp_path / "index"),
                  lambda: quantize.export(paths, tmp_path / "export"),
                  lambda: pca.StreamingPCA(3).fit_files(paths)):
        with pytest.raises(MixedWeightsError) as err:
            build()
        text = str(err.value)
        assert "tiny-random(seed=0)" in text and "rows 136U" in text
        assert "tiny-random(seed=1)" in text and "rows 137U" in text
    done = _cli("index", "--root", str(root), "--model", MODEL)
    assert done.returncode == 2 and "different weights" in done.stderr and "137U" in done.stderr
    assert not (tmp_path / "index").exists()


# ------------------------------------------------------- 6. the CLI runs the assets' checks
def _shift(px: np.ndarray, info) -> bytes:
    a, b, c, d, e, f = info.transform
    return synthetic.encode_geotiff(px, (a, b, c + 200_000.0, d, e, f), _epsg(info))


def test_cli_fails_a_georeference_shifted_200_km_naming_the_cell(collection_dir, tmp_path):
    from majortom_assets.standard import S2L1C_BANDS

    collection = _copy(collection_dir, tmp_path / "Core-S2L1C")
    for band in S2L1C_BANDS:
        _set_band(collection, "136U_10R", band, _shift)
    done = _embed_cli(collection, tmp_path / "out", "--rows", "136U")
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(ln for ln in done.stderr.splitlines() if ln.startswith("file check failed"))
    assert "row 136U: inside_grid_cell" in line and "136U_10R" in line and "136U_11R" not in line


# ---------------------------------------------------------- 7. what verify_file guarantees
@pytest.fixture(scope="module")
def row_file(collection_dir, embedder, tmp_path_factory) -> Path:
    collection = CoreCollection(str(collection_dir))
    meta = collection.metadata()
    out = tmp_path_factory.mktemp("verify") / "row=136U" / "embeddings.parquet"
    embed_to_file(collection, meta[meta["grid_row_u"] == 136], embedder, EngineConfig(image_size=SIZE, device="cpu"), out)
    return out


def _edited(path: Path, out: Path, edit, footer_edit=None) -> Path:
    table = pq.read_table(path)
    footer = dict(pq.read_schema(path).metadata)
    table = edit(table)
    if footer_edit is not None:
        footer = footer_edit(footer)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(footer), out)
    return out


def _set(table: pa.Table, name: str, index: int, value) -> pa.Table:
    values = table.column(name).to_pylist()
    values[index] = value
    return table.set_column(table.schema.get_field_index(name), table.schema.field(name),
                            pa.array(values, table.schema.field(name).type))


def _flip_random(footer: dict) -> dict:
    import json

    info = json.loads(footer[b"majortom"])
    info["random_weights"] = False
    footer = {**footer, b"majortom": json.dumps(info).encode(), b"majortom:random_weights": b"false"}
    footer.pop(b"majortom:warning", None)
    return footer


EDITS = {
    "grid_cell": (lambda t: _set(t, "grid_cell", 0, "999Z_1R"), None, "not a grid cell"),
    "centre_lat": (lambda t: _set(t, "centre_lat", 1, t["centre_lat"][1].as_py() + 0.01), None,
                   "centre_lat/centre_lon is not the centre of their footprint"),
    "pixel_bbox": (lambda t: _set(t, "pixel_bbox", 2, [0, 0, 200, 200]), None, "not a 224 px fragment"),
    "grid_row_u": (lambda t: _set(t, "grid_row_u", 0, 9999), None, "disagree with grid_cell"),
    "dropped row": (lambda t: t.slice(1), None, "rows dropped or added after writing"),
    "duplicated row": (lambda t: pa.concat_tables([t, t.slice(0, 1)]), None, "rows dropped or added after writing"),
    "random_weights flipped": (lambda t: t, _flip_random, "the provenance (weights, random_weights) changed"),
    "reordered rows": (lambda t: t.take(list(range(t.num_rows))[::-1]), None, "content digest differs"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_verify_file_finds_each_edit(row_file, tmp_path, edit):
    change, footer_change, message = EDITS[edit]
    assert geoparquet.verify_file(row_file).ok
    tampered = _edited(row_file, tmp_path / "tampered.parquet", change, footer_change)
    report = geoparquet.verify_file(tampered, batch_size=3)
    assert not report.ok and any(message in p for p in report.problems), report.problems


def test_check_file_turns_a_crash_into_a_failed_check(row_file, tmp_path):
    from majortom_assets.file_check import CHECK_NAMES, check_file

    assert all(r.passed for r in check_file(row_file))
    tampered = _edited(row_file, tmp_path / "row=136U" / "embeddings.parquet",
                       lambda t: _set(t, "grid_row_u", 0, 9999))
    results = {r.name: r for r in check_file(tampered)}
    assert list(results) == list(CHECK_NAMES)
    assert not results["unique_ids"].passed and not results["inside_grid_cell"].passed
    assert "136U_10R" in results["inside_grid_cell"].problems[0]
    # a file so damaged that a check cannot even run still gives a result, not an exception
    broken = _edited(row_file, tmp_path / "broken.parquet", lambda t: t.drop_columns(["pixel_bbox"]))
    results = {r.name: r for r in check_file(broken)}
    assert not results["fragments_per_cell"].passed
    assert "check could not run" in results["fragments_per_cell"].problems[0]
